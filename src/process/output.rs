//! The per-process output hub: one shared log of output chunks, read by every
//! subscriber at its own cursor.
//!
//! * Publishing is serialized (the stdout and stderr readers take turns on
//!   `publish_turn`), so every subscriber sees the chunks in one order and the byte
//!   offsets (all streams combined, in publish order) mean the same for everyone.
//! * **Paced by the fastest reader.** Before the next chunk is read from the child, the
//!   publisher waits while *every* attached subscriber is at least
//!   a pace window behind ([`OutputPolicy::pace_bytes`], less when many processes run:
//!   `OutputPolicy::pace_window`) — like a pipe whose reader is the quickest
//!   client, so no live subscriber that keeps reading loses a byte — but it waits at most
//!   [`OutputPolicy::stall_timeout`] without any subscriber making progress; after that
//!   the process runs free until one reads again. A slow subscriber therefore never
//!   holds up the process or a faster subscriber for longer than the stall timeout.
//! * **Dropped when too far behind.** A subscriber more than
//!   [`OutputPolicy::subscriber_buffer`] bytes behind the newest output is dropped: its
//!   [`Subscription::next`] returns [`SubscriptionError::Lagged`] with the offset to
//!   reconnect from (Connect with `replay_from`).
//! * **Retention.** The log keeps what attached subscribers have not read yet and the
//!   last `replay_cap` bytes for replay, where the replay cap is
//!   [`OutputPolicy::replay_bytes`] but shrinks so that all live processes together keep
//!   about [`OutputPolicy::replay_budget`] (never below 64 KiB each). Subscribing takes the
//!   cursor under the same lock a publish holds while appending, so a chunk is either
//!   replayed or delivered live, never both, never neither.
//! * **Batched wakeups.** The reader drains the pipe and appends each read as a chunk,
//!   then flushes once ([`Hub::flush`]); subscribers are woken per flush (or every
//!   128 KiB), so a burst of reads reaches a client as one socket write, not one per
//!   4 KiB read.
//!
//! Memory per process: at most `max(replay cap, subscriber buffer)` plus one chunk;
//! chunks are shared `Bytes` with their own exact-size allocation.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::error::SubscriptionError;
use super::{Event, ExitInfo, OutputKind};

/// The smallest replay share a live process keeps, however many processes run.
const MIN_REPLAY_SHARE: usize = 64 * 1024;

/// The smallest pace window a live process gets, however many processes run.
const MIN_PACE_WINDOW: usize = 32 * 1024;

/// Appended bytes that wake the subscribers even before the reader drains the pipe (a
/// writer faster than guestd never lets the pipe run dry).
const FLUSH_BYTES: usize = 128 * 1024;

/// Output byte counts per stream (for logs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ByteCounts {
    pub stdout: u64,
    pub stderr: u64,
    pub pty: u64,
}

impl ByteCounts {
    fn add(&mut self, kind: OutputKind, n: u64) {
        match kind {
            OutputKind::Stdout => self.stdout += n,
            OutputKind::Stderr => self.stderr += n,
            OutputKind::Pty => self.pty += n,
        }
    }
}

/// Fan-out and retention rules, shared by every process of a manager.
#[derive(Debug)]
pub(crate) struct OutputPolicy {
    /// Most output a process keeps for replay.
    pub replay_bytes: usize,
    /// About how much replay output all live processes keep together.
    pub replay_budget: usize,
    /// The process waits while every subscriber is at least this far behind.
    pub pace_bytes: usize,
    /// A subscriber further behind than this is dropped.
    pub subscriber_buffer: usize,
    /// Longest wait for a subscriber to make progress before the process runs free.
    pub stall_timeout: Duration,
    /// Hubs whose process has not ended.
    live: AtomicUsize,
}

impl OutputPolicy {
    pub(crate) fn new(
        replay_bytes: usize,
        replay_budget: usize,
        pace_bytes: usize,
        subscriber_buffer: usize,
        stall_timeout: Duration,
    ) -> Arc<OutputPolicy> {
        let pace_bytes = pace_bytes.max(1);
        Arc::new(OutputPolicy {
            replay_bytes,
            replay_budget,
            pace_bytes,
            subscriber_buffer: subscriber_buffer.max(pace_bytes),
            stall_timeout,
            live: AtomicUsize::new(0),
        })
    }

    /// What one live process keeps for replay now.
    fn replay_cap(&self) -> usize {
        let n = self.live.load(Ordering::Relaxed).max(1);
        (self.replay_budget / n)
            .max(MIN_REPLAY_SHARE)
            .min(self.replay_bytes)
    }

    /// How far the fastest subscriber may fall behind before the process waits:
    /// [`OutputPolicy::pace_bytes`], but shrinking like the replay cap so that all live
    /// processes together read ahead of their clients by about the replay budget
    /// (never under 32 KiB each: a thousand streaming processes would otherwise hold a
    /// full window each, 256 MiB at the defaults).
    fn pace_window(&self) -> u64 {
        let n = self.live.load(Ordering::Relaxed).max(1);
        (self.replay_budget / n)
            .max(MIN_PACE_WINDOW)
            .min(self.pace_bytes) as u64
    }

    /// Live processes (for tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

/// Output chunks with their offsets (all streams combined).
#[derive(Debug, Default)]
pub(crate) struct Log {
    chunks: VecDeque<(u64, OutputKind, Bytes)>,
    retained: usize,
    next: u64,
}

impl Log {
    /// The offset the next published byte will get (= total bytes published).
    pub(crate) fn next_offset(&self) -> u64 {
        self.next
    }

    /// The offset of the oldest retained byte (= `next_offset` when nothing is retained).
    pub(crate) fn oldest_offset(&self) -> u64 {
        self.chunks.front().map_or(self.next, |c| c.0)
    }

    pub(crate) fn retained(&self) -> usize {
        self.retained
    }

    pub(crate) fn push(&mut self, kind: OutputKind, data: Bytes) {
        let offset = self.next;
        self.next += data.len() as u64;
        if data.is_empty() {
            return;
        }
        self.retained += data.len();
        self.chunks.push_back((offset, kind, data));
    }

    /// Forgets everything before `keep_from` (cutting into a chunk if needed).
    pub(crate) fn trim_to(&mut self, keep_from: u64) {
        while let Some(front) = self.chunks.front_mut() {
            let end = front.0 + front.2.len() as u64;
            if end <= keep_from {
                self.retained -= front.2.len();
                self.chunks.pop_front();
            } else {
                if front.0 < keep_from {
                    // keep_from - front.0 < len, so this fits in usize.
                    let cut = usize::try_from(keep_from - front.0).unwrap_or(0);
                    front.2 = front.2.slice(cut..);
                    front.0 = keep_from;
                    self.retained -= cut;
                }
                break;
            }
        }
        if self.chunks.is_empty() {
            // Nothing retained; keep the allocation small.
            self.chunks.shrink_to(4);
        }
    }

    /// The retained output from `cursor` to the end of the chunk holding it.
    pub(crate) fn read_at(&self, cursor: u64) -> Option<(OutputKind, Bytes)> {
        let i = self
            .chunks
            .partition_point(|(off, _, d)| off + d.len() as u64 <= cursor);
        let (off, kind, data) = self.chunks.get(i)?;
        let skip = usize::try_from(cursor.saturating_sub(*off)).unwrap_or(data.len());
        Some((*kind, data.slice(skip..)))
    }
}

#[derive(Debug, Clone, Copy)]
struct Sub {
    id: u64,
    cursor: u64,
}

#[derive(Debug, Default)]
struct HubState {
    log: Log,
    subs: Vec<Sub>,
    /// Subscribers that were dropped, until their subscription reads the error.
    dropped: Vec<(u64, SubscriptionError)>,
    next_id: u64,
    end: Option<ExitInfo>,
    counts: ByteCounts,
    /// Chunks delivered to subscribers so far (progress, for pacing).
    reads: u64,
    /// The publisher waits for progress.
    publisher_waiting: bool,
    /// Pacing is off until `reads` moves past this (a stall timeout expired).
    stalled_at: Option<u64>,
    /// Bytes appended since subscribers were last woken.
    unflushed: usize,
}

/// The output fan-out of one process.
pub(crate) struct Hub {
    pid: AtomicU32,
    policy: Arc<OutputPolicy>,
    publish_turn: tokio::sync::Mutex<()>,
    state: Mutex<HubState>,
    /// Woken on new data, the end, and drops.
    data_ready: Notify,
    /// Woken when a subscriber makes progress or leaves while the publisher waits.
    progress: Notify,
    finished: AtomicBool,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("pid", &self.pid.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub(crate) fn new(policy: Arc<OutputPolicy>) -> Self {
        policy.live.fetch_add(1, Ordering::Relaxed);
        Hub {
            pid: AtomicU32::new(0),
            policy,
            publish_turn: tokio::sync::Mutex::new(()),
            state: Mutex::new(HubState::default()),
            data_ready: Notify::new(),
            progress: Notify::new(),
            finished: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // Every critical section is a few field updates that cannot be left half-done
        // by a panic, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the pid (known only after the clone) for logs.
    pub(crate) fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    pub(crate) fn counts(&self) -> ByteCounts {
        self.lock().counts
    }

    /// Bytes of output this hub retains.
    pub(crate) fn retained_bytes(&self) -> usize {
        self.lock().log.retained()
    }

    /// Offset after the last published byte.
    pub(crate) fn next_offset(&self) -> u64 {
        self.lock().log.next_offset()
    }

    /// Number of subscribers currently attached (for tests and diagnostics).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn subscriber_count(&self) -> usize {
        self.lock().subs.len()
    }

    /// Subscribes: `replay_from` `None` = live output only; `Some(from)` = the retained
    /// output from `from` first. After the end, the subscription yields the replayed
    /// data (if asked) and the End.
    pub(crate) fn subscribe(self: &Arc<Self>, pid: u32, replay_from: Option<u64>) -> Subscription {
        let mut st = self.lock();
        let cursor = match replay_from {
            Some(from) => from.clamp(st.log.oldest_offset(), st.log.next_offset()),
            None => st.log.next_offset(),
        };
        let id = st.next_id;
        st.next_id += 1;
        st.subs.push(Sub { id, cursor });
        Subscription {
            pid,
            replay_offset: replay_from.map(|_| cursor),
            offset: cursor,
            source: Source::Hub {
                hub: self.clone(),
                id,
            },
            end: None,
            done: false,
        }
    }

    /// Publishes one chunk and wakes the subscribers. Returns when the chunk is in the
    /// log (after pacing: see the module docs).
    #[cfg(test)]
    pub(crate) async fn publish(&self, kind: OutputKind, data: Bytes) {
        self.append(kind, data).await;
        self.flush();
    }

    /// Appends one chunk without waking the subscribers unless [`FLUSH_BYTES`] have
    /// piled up since the last [`Hub::flush`]: the reader drains a pipe as a batch and
    /// flushes once, so a burst of reads reaches a client as one socket write. Returns
    /// when the chunk is in the log (after pacing: see the module docs).
    pub(crate) async fn append(&self, kind: OutputKind, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let _turn = self.publish_turn.lock().await;
        self.pace().await;
        let len = data.len();
        let mut wake;
        {
            let mut st = self.lock();
            st.counts.add(kind, len as u64);
            st.log.push(kind, data);
            let next = st.log.next_offset();
            let buffer = self.policy.subscriber_buffer;
            let mut lagged = Vec::new();
            st.subs.retain(|s| {
                let behind = next - s.cursor;
                if behind > buffer as u64 {
                    lagged.push((
                        s.id,
                        SubscriptionError::Lagged {
                            behind,
                            buffer,
                            next_offset: s.cursor,
                        },
                    ));
                    false
                } else {
                    true
                }
            });
            wake = !lagged.is_empty();
            if !lagged.is_empty() {
                tracing::warn!(
                    pid = self.pid.load(Ordering::Relaxed),
                    dropped = lagged.len(),
                    buffer,
                    "output subscribers dropped: they fell further behind than their buffer"
                );
                st.dropped.extend(lagged);
            }
            self.trim(&mut st);
            st.unflushed += len;
            if st.unflushed >= FLUSH_BYTES {
                st.unflushed = 0;
                wake = true;
            }
        }
        if wake {
            self.data_ready.notify_waiters();
        }
    }

    /// Wakes subscribers waiting for output appended since the last flush. The reader
    /// calls it when the pipe is drained, and pacing before the process waits.
    pub(crate) fn flush(&self) {
        let pending = std::mem::take(&mut self.lock().unflushed);
        if pending > 0 {
            self.data_ready.notify_waiters();
        }
    }

    /// Keeps what attached subscribers have not read and the replay cap, nothing more.
    fn trim(&self, st: &mut HubState) {
        let replay_keep = st
            .log
            .next_offset()
            .saturating_sub(self.policy.replay_cap() as u64);
        let keep = st
            .subs
            .iter()
            .map(|s| s.cursor)
            .min()
            .map_or(replay_keep, |c| c.min(replay_keep));
        st.log.trim_to(keep);
    }

    /// Waits while every subscriber is at least `pace_bytes` behind, but gives up after
    /// `stall_timeout` without progress (and does not wait again until someone reads).
    async fn pace(&self) {
        loop {
            if !self.must_wait() {
                return;
            }
            // Subscribers must see everything published before the process waits for them.
            self.flush();
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let reads_before = {
                let mut st = self.lock();
                if !self.must_wait_locked(&st) {
                    st.publisher_waiting = false;
                    return;
                }
                st.publisher_waiting = true;
                st.reads
            };
            if tokio::time::timeout(self.policy.stall_timeout, notified)
                .await
                .is_err()
            {
                let mut st = self.lock();
                if st.reads == reads_before {
                    st.stalled_at = Some(reads_before);
                    st.publisher_waiting = false;
                    tracing::debug!(
                        pid = self.pid.load(Ordering::Relaxed),
                        stall_ms = self.policy.stall_timeout.as_millis() as u64,
                        "no subscriber read for the stall timeout: the process runs free"
                    );
                    return;
                }
            }
        }
    }

    fn must_wait(&self) -> bool {
        let st = self.lock();
        self.must_wait_locked(&st)
    }

    /// Every subscriber is a pace window behind, and no stall suspended pacing.
    fn must_wait_locked(&self, st: &HubState) -> bool {
        let next = st.log.next_offset();
        let closest = st.subs.iter().map(|s| next - s.cursor).min();
        closest.is_some_and(|lag| lag >= self.policy.pace_window())
            && st.stalled_at != Some(st.reads)
    }

    /// Publishes the End after all data (callers stop the readers first). Later
    /// subscribers get it straight away.
    pub(crate) async fn finish(&self, info: ExitInfo) {
        let _turn = self.publish_turn.lock().await;
        {
            let mut st = self.lock();
            st.end = Some(info);
            st.unflushed = 0;
        }
        if !self.finished.swap(true, Ordering::SeqCst) {
            self.policy.live.fetch_sub(1, Ordering::Relaxed);
        }
        self.data_ready.notify_waiters();
    }

    /// The next event for subscriber `id` at `cursor`, or `None` when there is none yet.
    fn poll_next(&self, id: u64, cursor: u64) -> Option<Result<Event, SubscriptionError>> {
        let mut st = self.lock();
        if let Some(i) = st.dropped.iter().position(|(d, _)| *d == id) {
            let (_, err) = st.dropped.swap_remove(i);
            return Some(Err(err));
        }
        if cursor < st.log.next_offset() {
            let Some((kind, data)) = st.log.read_at(cursor) else {
                // Evicted under us (cannot happen for an attached subscriber).
                return Some(Err(SubscriptionError::Lagged {
                    behind: st.log.next_offset() - cursor,
                    buffer: self.policy.subscriber_buffer,
                    next_offset: cursor,
                }));
            };
            let new_cursor = cursor + data.len() as u64;
            if let Some(s) = st.subs.iter_mut().find(|s| s.id == id) {
                s.cursor = new_cursor;
            }
            st.reads += 1;
            // Wake a waiting publisher only once this reader is half a window behind,
            // so it appends a batch per wakeup instead of ping-ponging chunk by chunk.
            if st.publisher_waiting
                && st.log.next_offset() - new_cursor <= self.policy.pace_window() / 2
            {
                self.progress.notify_one();
            }
            return Some(Ok(Event::Data(kind, data)));
        }
        st.end.clone().map(|end| Ok(Event::End(end)))
    }

    fn detach(&self, id: u64) {
        let mut st = self.lock();
        st.subs.retain(|s| s.id != id);
        st.dropped.retain(|(d, _)| *d != id);
        // What only this subscriber still needed can go now.
        self.trim(&mut st);
        if st.publisher_waiting {
            // The pacing set changed: let the publisher look again.
            self.progress.notify_one();
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if !self.finished.load(Ordering::SeqCst) {
            self.policy.live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
enum Source {
    Hub {
        hub: Arc<Hub>,
        id: u64,
    },
    /// An ended process whose output is no longer retained: only its End.
    Gone,
}

/// One subscriber's view of a process's events: Data chunks, then one End.
#[derive(Debug)]
pub struct Subscription {
    pid: u32,
    replay_offset: Option<u64>,
    offset: u64,
    source: Source,
    /// The End, for a [`Source::Gone`] subscription.
    end: Option<ExitInfo>,
    done: bool,
}

impl Subscription {
    /// A subscription to an ended process whose output was not retained: yields the End.
    pub(crate) fn ended(pid: u32, offset: u64, replay: bool, info: ExitInfo) -> Subscription {
        Subscription {
            pid,
            replay_offset: replay.then_some(offset),
            offset,
            source: Source::Gone,
            end: Some(info),
            done: false,
        }
    }

    /// The process's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn set_pid(&mut self, pid: u32) {
        self.pid = pid;
    }

    /// `Some` only when replay was requested: the output offset at which the replayed
    /// data begins (later than requested when that output was already evicted).
    pub fn replay_offset(&self) -> Option<u64> {
        self.replay_offset
    }

    /// The output offset of the next byte this subscription will deliver (all streams
    /// combined): a client that reconnects with `replay_from` = this loses nothing
    /// (as long as it is still retained).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next event; `None` after the End was returned (or after an error).
    /// Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<Event, SubscriptionError>> {
        if self.done {
            return None;
        }
        let (hub, id) = match &self.source {
            Source::Hub { hub, id } => (hub.clone(), *id),
            Source::Gone => {
                self.done = true;
                return self.end.take().map(|e| Ok(Event::End(e)));
            }
        };
        loop {
            // Fast path first: a subscriber that has data never registers for a wakeup
            // (a registered waiter would be woken by every publish).
            if let Some(ev) = hub.poll_next(id, self.offset) {
                return Some(self.take(ev, &hub, id));
            }
            let notified = hub.data_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(ev) = hub.poll_next(id, self.offset) {
                return Some(self.take(ev, &hub, id));
            }
            notified.await;
        }
    }

    fn take(
        &mut self,
        ev: Result<Event, SubscriptionError>,
        hub: &Hub,
        id: u64,
    ) -> Result<Event, SubscriptionError> {
        match &ev {
            Ok(Event::Data(_, data)) => self.offset += data.len() as u64,
            Ok(Event::End(_)) | Err(_) => {
                self.done = true;
                hub.detach(id);
                self.source = Source::Gone;
            }
        }
        ev
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Source::Hub { hub, id } = &self.source {
            hub.detach(*id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_window_is_shared_out_when_many_processes_run() {
        let p = OutputPolicy::new(
            1 << 20,
            4 << 20,
            256 << 10,
            4 << 20,
            Duration::from_millis(100),
        );
        let mut hubs = vec![Hub::new(p.clone())];
        assert_eq!(p.pace_window(), 256 << 10, "one process: the full window");
        hubs.extend((1..16).map(|_| Hub::new(p.clone())));
        assert_eq!(
            p.pace_window(),
            256 << 10,
            "16 × 256 KiB fit the 4 MiB budget"
        );
        hubs.extend((16..64).map(|_| Hub::new(p.clone())));
        assert_eq!(p.pace_window(), 64 << 10, "64 processes share 4 MiB");
        hubs.extend((64..1000).map(|_| Hub::new(p.clone())));
        assert_eq!(p.pace_window(), 32 << 10, "never under 32 KiB");
        drop(hubs);
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn exit0() -> ExitInfo {
        ExitInfo::from_status(std::os::unix::process::ExitStatusExt::from_raw(0))
    }

    fn policy(replay: usize, pace: usize, buffer: usize, stall_ms: u64) -> Arc<OutputPolicy> {
        OutputPolicy::new(
            replay,
            usize::MAX,
            pace,
            buffer,
            Duration::from_millis(stall_ms),
        )
    }

    #[test]
    fn the_log_trims_exactly_and_reads_from_any_offset() {
        let mut l = Log::default();
        l.push(OutputKind::Stdout, b("aaaa"));
        l.push(OutputKind::Stderr, b("bbbb"));
        l.push(OutputKind::Stdout, b("cc"));
        l.trim_to(5);
        assert_eq!(
            (l.oldest_offset(), l.next_offset(), l.retained()),
            (5, 10, 5)
        );
        assert_eq!(l.read_at(5), Some((OutputKind::Stderr, b("bbb"))));
        assert_eq!(l.read_at(8), Some((OutputKind::Stdout, b("cc"))));
        assert_eq!(l.read_at(9), Some((OutputKind::Stdout, b("c"))));
        assert_eq!(l.read_at(10), None);
        l.trim_to(10);
        assert_eq!((l.oldest_offset(), l.retained()), (10, 0));
    }

    #[tokio::test]
    async fn replay_then_live_then_end_with_offsets() {
        let hub = Arc::new(Hub::new(policy(1 << 20, 1 << 20, 1 << 20, 100)));
        hub.publish(OutputKind::Stdout, b("hello")).await;
        let mut live = hub.subscribe(1, None);
        let mut replay = hub.subscribe(1, Some(2));
        assert_eq!(live.offset(), 5);
        assert_eq!(replay.replay_offset(), Some(2));
        hub.publish(OutputKind::Stderr, b("!")).await;
        hub.finish(exit0()).await;
        let mut got = Vec::new();
        while let Some(ev) = replay.next().await {
            got.push(ev.unwrap());
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], Event::Data(OutputKind::Stdout, b("llo")));
        assert_eq!(got[1], Event::Data(OutputKind::Stderr, b("!")));
        assert!(matches!(got[2], Event::End(_)));
        assert_eq!(replay.offset(), 6);
        assert_eq!(
            live.next().await,
            Some(Ok(Event::Data(OutputKind::Stderr, b("!"))))
        );
        assert!(matches!(live.next().await, Some(Ok(Event::End(_)))));
        assert_eq!(live.next().await, None);
        assert_eq!(hub.subscriber_count(), 0);
    }

    /// A subscriber that stops reading is dropped once a buffer behind; the fast one
    /// never waits for it, and the laggard's error says where to resume.
    #[tokio::test]
    async fn a_laggard_is_dropped_and_never_paces_a_faster_reader() {
        let hub = Arc::new(Hub::new(policy(0, 4, 8, 60_000)));
        let mut stuck = hub.subscribe(1, None);
        let mut reader = hub.subscribe(1, None);
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    hub.publish(OutputKind::Stdout, b(&format!("{i}{i}"))).await;
                }
                hub.finish(exit0()).await;
            })
        };
        let mut n = 0;
        while let Some(ev) = reader.next().await {
            if let Event::Data(..) = ev.unwrap() {
                n += 1;
            }
        }
        assert_eq!(n, 10);
        // With a 60 s stall timeout, finishing at all proves the stuck subscriber was
        // not waited for.
        publisher.await.unwrap();
        assert_eq!(
            stuck.next().await,
            Some(Err(SubscriptionError::Lagged {
                behind: 10,
                buffer: 8,
                next_offset: 0
            }))
        );
        assert_eq!(stuck.next().await, None);
        assert_eq!(hub.subscriber_count(), 0);
    }

    /// A sole subscriber paces the process (nothing is lost) while it keeps reading.
    #[tokio::test]
    async fn a_slow_sole_reader_paces_the_process_and_loses_nothing() {
        let hub = Arc::new(Hub::new(policy(0, 4, 8, 60_000)));
        let mut reader = hub.subscribe(1, None);
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                for i in 0..100u32 {
                    hub.publish(OutputKind::Stdout, b(&format!("{:03}", i)))
                        .await;
                }
                hub.finish(exit0()).await;
            })
        };
        let mut all = Vec::new();
        while let Some(ev) = reader.next().await {
            match ev.unwrap() {
                Event::Data(_, d) => {
                    all.extend_from_slice(&d);
                    tokio::task::yield_now().await;
                }
                Event::End(_) => {}
            }
        }
        publisher.await.unwrap();
        let want: String = (0..100).map(|i| format!("{i:03}")).collect();
        assert_eq!(all, want.into_bytes());
        // Retention follows the reader: nothing is left once it has read everything.
        assert_eq!(hub.retained_bytes(), 0);
    }

    /// A sole subscriber that stops reading holds the process for one stall timeout,
    /// then the process runs free and the subscriber is dropped a buffer behind.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_sole_reader_holds_the_process_for_one_stall_timeout() {
        let hub = Arc::new(Hub::new(policy(0, 2, 6, 100)));
        let mut stuck = hub.subscribe(1, None);
        let started = tokio::time::Instant::now();
        for _ in 0..10 {
            hub.publish(OutputKind::Stdout, b("xx")).await;
        }
        hub.finish(exit0()).await;
        // Paused clock: exactly one stall timeout passed, not one per chunk.
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert!(matches!(
            stuck.next().await,
            Some(Err(SubscriptionError::Lagged { next_offset: 0, .. }))
        ));
    }

    #[tokio::test]
    async fn a_dropped_subscription_stops_pacing_at_once() {
        let hub = Arc::new(Hub::new(policy(0, 2, 4, 60_000)));
        let sub = hub.subscribe(1, None);
        hub.publish(OutputKind::Stdout, b("ab")).await;
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move { hub.publish(OutputKind::Stdout, b("cd")).await })
        };
        tokio::task::yield_now().await;
        drop(sub);
        publisher.await.unwrap();
        assert_eq!(hub.subscriber_count(), 0);
    }

    #[tokio::test]
    async fn replay_shares_shrink_with_the_number_of_live_processes() {
        let p = OutputPolicy::new(1 << 20, 1 << 20, 1 << 16, 1 << 20, Duration::from_secs(1));
        let hubs: Vec<_> = (0..64).map(|_| Arc::new(Hub::new(p.clone()))).collect();
        assert_eq!(p.live(), 64);
        assert_eq!(p.replay_cap(), MIN_REPLAY_SHARE);
        let chunk = Bytes::from(vec![b'z'; 32 * 1024]);
        for _ in 0..8 {
            hubs[0].publish(OutputKind::Stdout, chunk.clone()).await;
        }
        assert_eq!(hubs[0].retained_bytes(), MIN_REPLAY_SHARE);
        for h in &hubs[1..] {
            h.finish(exit0()).await;
        }
        assert_eq!(p.live(), 1);
        assert_eq!(p.replay_cap(), 1 << 20);
        drop(hubs);
        assert_eq!(p.live(), 0);
    }

    #[tokio::test]
    async fn an_ended_subscription_yields_only_the_end() {
        let mut s = Subscription::ended(7, 42, true, exit0());
        assert_eq!(s.replay_offset(), Some(42));
        assert!(matches!(s.next().await, Some(Ok(Event::End(_)))));
        assert_eq!(s.next().await, None);
    }
}

#[cfg(test)]
mod throughput {
    use super::*;

    /// Hub-only throughput (run by hand: `cargo test --release --lib hub_throughput --
    /// --ignored --nocapture`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn hub_throughput() {
        let p = OutputPolicy::new(
            1 << 20,
            64 << 20,
            256 << 10,
            4 << 20,
            Duration::from_millis(100),
        );
        let hub = Arc::new(Hub::new(p));
        let mut sub = hub.subscribe(1, None);
        let chunk = Bytes::from(vec![7u8; 32 * 1024]);
        let n = 32 * 1024; // 1 GiB
        let t = std::time::Instant::now();
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                for _ in 0..n {
                    hub.publish(OutputKind::Stdout, Bytes::copy_from_slice(&chunk))
                        .await;
                }
                hub.finish(ExitInfo::from_status(
                    std::os::unix::process::ExitStatusExt::from_raw(0),
                ))
                .await;
            })
        };
        let mut got = 0usize;
        while let Some(Ok(ev)) = sub.next().await {
            if let Event::Data(_, d) = ev {
                got += d.len();
            }
        }
        publisher.await.unwrap();
        let s = t.elapsed().as_secs_f64();
        println!("hub: {} MB/s", got as f64 / s / 1e6);
    }
}
