//! The per-process output hub: serialized publishing, bounded per-subscriber queues with
//! stall detection, and the replay ring.
//!
//! * Publishing is serialized (the stdout and stderr readers take turns on
//!   `publish_turn`), so every subscriber sees the chunks in one order and the byte
//!   offsets (all streams combined, in publish order) mean the same for everyone.
//! * A chunk is offered to every subscriber without waiting; a subscriber whose queue is
//!   full makes the publisher wait (the process is paced by its slowest live subscriber,
//!   like a pipe, and no chunk is dropped for a live subscriber), but only until its
//!   queue has made no progress for `stall_timeout`: then it is dropped, its
//!   [`Subscription::next`] returns [`SubscriptionError::Stalled`] after the chunks it
//!   already had, and everyone else continues. A subscriber whose receiver is gone is
//!   removed at the next offer and never waited for.
//! * The ring keeps the last `replay_buffer_bytes` of output for Connect-with-replay.
//!   Subscribing takes the ring snapshot and joins the subscriber list under the same
//!   lock that a publish holds while appending to the ring and offering the chunk, so a
//!   chunk is either replayed or delivered live, never both, never neither.
//!
//! Memory per process: the ring plus at most `subscriber_queue_chunks` chunks per
//! subscriber (chunks are shared `Bytes`, each with its own exact-size allocation).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::error::SubscriptionError;
use super::{Event, ExitInfo, OutputKind};

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

/// The last `cap` bytes of output, as chunks with their offsets.
#[derive(Debug)]
pub(crate) struct Ring {
    cap: usize,
    chunks: VecDeque<(u64, OutputKind, Bytes)>,
    retained: usize,
    next: u64,
}

impl Ring {
    pub(crate) fn new(cap: usize) -> Self {
        Ring {
            cap,
            chunks: VecDeque::new(),
            retained: 0,
            next: 0,
        }
    }

    /// The offset the next published byte will get (= total bytes published).
    pub(crate) fn next_offset(&self) -> u64 {
        self.next
    }

    /// The offset of the oldest retained byte (= `next_offset` when nothing is retained).
    pub(crate) fn oldest_offset(&self) -> u64 {
        self.chunks.front().map_or(self.next, |c| c.0)
    }

    pub(crate) fn push(&mut self, kind: OutputKind, data: Bytes) {
        let offset = self.next;
        self.next += data.len() as u64;
        if self.cap == 0 || data.is_empty() {
            return;
        }
        self.retained += data.len();
        self.chunks.push_back((offset, kind, data));
        while self.retained > self.cap {
            let excess = self.retained - self.cap;
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if front.2.len() <= excess {
                self.retained -= front.2.len();
                self.chunks.pop_front();
            } else {
                // Keep exactly the last `cap` bytes: trim the head of the oldest chunk.
                front.2 = front.2.slice(excess..);
                front.0 += excess as u64;
                self.retained -= excess;
            }
        }
    }

    /// The retained output from `from` on (clamped to what is retained), as chunks
    /// (the first one cut if `from` falls inside it). Returns the offset where the
    /// returned data begins.
    pub(crate) fn since(&self, from: u64) -> (u64, Vec<(OutputKind, Bytes)>) {
        let start = from.clamp(self.oldest_offset(), self.next);
        let mut out = Vec::new();
        for (offset, kind, data) in &self.chunks {
            let end = offset + data.len() as u64;
            if end <= start {
                continue;
            }
            if *offset < start {
                // start - offset < data.len(), so this fits in usize.
                let skip = usize::try_from(start - offset).unwrap_or(data.len());
                out.push((*kind, data.slice(skip..)));
            } else {
                out.push((*kind, data.clone()));
            }
        }
        (start, out)
    }
}

#[derive(Clone)]
struct Slot {
    id: u64,
    tx: mpsc::Sender<Event>,
    stalled: Arc<AtomicBool>,
}

struct HubState {
    ring: Ring,
    subs: Vec<Slot>,
    next_id: u64,
    end: Option<ExitInfo>,
    counts: ByteCounts,
}

/// The output fan-out of one process.
pub(crate) struct Hub {
    pid: AtomicU32,
    publish_turn: tokio::sync::Mutex<()>,
    state: Mutex<HubState>,
    queue_chunks: usize,
    stall_timeout: Duration,
}

impl Hub {
    pub(crate) fn new(replay_bytes: usize, queue_chunks: usize, stall_timeout: Duration) -> Self {
        Hub {
            pid: AtomicU32::new(0),
            publish_turn: tokio::sync::Mutex::new(()),
            state: Mutex::new(HubState {
                ring: Ring::new(replay_bytes),
                subs: Vec::new(),
                next_id: 0,
                end: None,
                counts: ByteCounts::default(),
            }),
            queue_chunks: queue_chunks.max(1),
            stall_timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // Every critical section is a few field updates that cannot be left half-done
        // by a panic, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the pid (known only after the fork) for logs.
    pub(crate) fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    pub(crate) fn counts(&self) -> ByteCounts {
        self.lock().counts
    }

    /// Number of subscribers currently attached (for tests and diagnostics).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn subscriber_count(&self) -> usize {
        self.lock().subs.len()
    }

    /// Subscribes: `replay_from` `None` = live output only; `Some(from)` = the retained
    /// output from `from` first. After the end, the subscription yields the replayed
    /// data (if asked) and the End.
    pub(crate) fn subscribe(&self, pid: u32, replay_from: Option<u64>) -> Subscription {
        let mut st = self.lock();
        let mut pending = VecDeque::new();
        let replay_offset = replay_from.map(|from| {
            let (start, chunks) = st.ring.since(from);
            pending.extend(chunks.into_iter().map(|(k, b)| Event::Data(k, b)));
            start
        });
        let offset = replay_offset.unwrap_or_else(|| st.ring.next_offset());
        let (rx, stalled) = match &st.end {
            Some(end) => {
                pending.push_back(Event::End(end.clone()));
                (None, None)
            }
            None => {
                let (tx, rx) = mpsc::channel(self.queue_chunks);
                let stalled = Arc::new(AtomicBool::new(false));
                let id = st.next_id;
                st.next_id += 1;
                st.subs.push(Slot {
                    id,
                    tx,
                    stalled: stalled.clone(),
                });
                (Some(rx), Some(stalled))
            }
        };
        Subscription {
            pid,
            replay_offset,
            offset,
            pending,
            rx,
            stalled,
            stall_ms: u64::try_from(self.stall_timeout.as_millis()).unwrap_or(u64::MAX),
            done: false,
        }
    }

    /// Publishes one chunk to the ring and every subscriber. Returns once every live
    /// subscriber has the chunk queued (or was dropped for stalling).
    pub(crate) async fn publish(&self, kind: OutputKind, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let _turn = self.publish_turn.lock().await;
        let event = Event::Data(kind, data.clone());
        let full = {
            let mut st = self.lock();
            st.counts.add(kind, data.len() as u64);
            st.ring.push(kind, data);
            offer(&mut st.subs, &event)
        };
        self.wait_for_room(full, event).await;
    }

    /// Publishes the End after all data (callers stop the readers first). Later
    /// subscribers get it straight away.
    pub(crate) async fn finish(&self, info: ExitInfo) {
        let _turn = self.publish_turn.lock().await;
        let event = Event::End(info.clone());
        let (full, delivered) = {
            let mut st = self.lock();
            st.end = Some(info);
            let full = offer(&mut st.subs, &event);
            (full, std::mem::take(&mut st.subs))
        };
        // Subscribers that have the End queued need nothing more from us.
        drop(delivered);
        self.wait_for_room(full, event).await;
    }

    /// Waits (concurrently) for room in each full queue, for at most the stall timeout
    /// per queue; drops subscribers that stalled or went away.
    async fn wait_for_room(&self, full: Vec<Slot>, event: Event) {
        if full.is_empty() {
            return;
        }
        let stall = self.stall_timeout;
        let outcomes = futures_util::future::join_all(full.iter().map(|slot| {
            let event = event.clone();
            async move {
                match tokio::time::timeout(stall, slot.tx.reserve()).await {
                    Ok(Ok(permit)) => {
                        permit.send(event);
                        None
                    }
                    Ok(Err(_closed)) => Some((slot, false)),
                    Err(_elapsed) => Some((slot, true)),
                }
            }
        }))
        .await;
        let mut remove = Vec::new();
        for (slot, stalled) in outcomes.into_iter().flatten() {
            if stalled {
                // Set before the senders are dropped: the receiver reads it after its
                // queue drains and reports the stall instead of a silent end.
                slot.stalled.store(true, Ordering::SeqCst);
                tracing::warn!(
                    pid = self.pid.load(Ordering::Relaxed),
                    stall_ms = stall.as_millis() as u64,
                    "output subscriber dropped: its queue stayed full without progress"
                );
            }
            remove.push(slot.id);
        }
        if !remove.is_empty() {
            self.lock().subs.retain(|s| !remove.contains(&s.id));
        }
        drop(full);
    }
}

/// Offers `event` to every subscriber without waiting: returns the ones whose queue is
/// full; removes the ones whose receiver is gone.
fn offer(subs: &mut Vec<Slot>, event: &Event) -> Vec<Slot> {
    let mut full = Vec::new();
    subs.retain(|slot| match slot.tx.try_send(event.clone()) {
        Ok(()) => true,
        Err(TrySendError::Closed(_)) => false,
        Err(TrySendError::Full(_)) => {
            full.push(slot.clone());
            true
        }
    });
    full
}

/// One subscriber's view of a process's events: Data chunks, then one End.
#[derive(Debug)]
pub struct Subscription {
    pid: u32,
    replay_offset: Option<u64>,
    offset: u64,
    pending: VecDeque<Event>,
    rx: Option<mpsc::Receiver<Event>>,
    stalled: Option<Arc<AtomicBool>>,
    stall_ms: u64,
    done: bool,
}

impl Subscription {
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
        let event = match self.pending.pop_front() {
            Some(ev) => ev,
            None => {
                let rx = match self.rx.as_mut() {
                    Some(rx) => rx,
                    None => {
                        self.done = true;
                        return None;
                    }
                };
                match rx.recv().await {
                    Some(ev) => ev,
                    None => {
                        self.done = true;
                        self.rx = None;
                        let stalled = self
                            .stalled
                            .as_ref()
                            .is_some_and(|s| s.load(Ordering::SeqCst));
                        // Otherwise the hub went away without an End (shutdown).
                        return stalled.then_some(Err(SubscriptionError::Stalled {
                            stall_ms: self.stall_ms,
                            next_offset: self.offset,
                        }));
                    }
                }
            }
        };
        match &event {
            Event::Data(_, data) => self.offset += data.len() as u64,
            Event::End(_) => {
                self.done = true;
                self.rx = None;
            }
        }
        Some(Ok(event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn ring_keeps_exactly_the_last_cap_bytes() {
        let mut r = Ring::new(5);
        r.push(OutputKind::Stdout, b("aaaa"));
        r.push(OutputKind::Stderr, b("bbbb"));
        r.push(OutputKind::Stdout, b("cc"));
        assert_eq!(r.next_offset(), 10);
        assert_eq!(r.oldest_offset(), 5);
        let (start, chunks) = r.since(0);
        assert_eq!(start, 5);
        assert_eq!(
            chunks,
            vec![
                (OutputKind::Stderr, b("bbb")),
                (OutputKind::Stdout, b("cc"))
            ]
        );
        let (start, chunks) = r.since(9);
        assert_eq!((start, chunks), (9, vec![(OutputKind::Stdout, b("c"))]));
        let (start, chunks) = r.since(99);
        assert_eq!((start, chunks), (10, vec![]));
    }

    #[test]
    fn ring_with_zero_capacity_only_counts() {
        let mut r = Ring::new(0);
        r.push(OutputKind::Pty, b("xyz"));
        assert_eq!(r.since(0), (3, vec![]));
    }

    #[tokio::test]
    async fn replay_then_live_then_end_with_offsets() {
        let hub = Hub::new(1 << 20, 4, Duration::from_millis(100));
        hub.publish(OutputKind::Stdout, b("hello")).await;
        let mut live = hub.subscribe(1, None);
        let mut replay = hub.subscribe(1, Some(2));
        assert_eq!(live.offset(), 5);
        assert_eq!(replay.replay_offset(), Some(2));
        hub.publish(OutputKind::Stderr, b("!")).await;
        hub.finish(ExitInfo::from_status(
            std::os::unix::process::ExitStatusExt::from_raw(0),
        ))
        .await;
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
    }

    #[tokio::test]
    async fn a_stalled_subscriber_is_dropped_and_the_others_continue() {
        let hub = Arc::new(Hub::new(0, 2, Duration::from_millis(100)));
        let mut stuck = hub.subscribe(1, None);
        let mut reader = hub.subscribe(1, None);
        let dropped = hub.subscribe(1, None);
        drop(dropped);
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    hub.publish(OutputKind::Stdout, b(&format!("{i}"))).await;
                }
                hub.finish(ExitInfo::from_status(
                    std::os::unix::process::ExitStatusExt::from_raw(0),
                ))
                .await;
            })
        };
        let mut n = 0;
        while let Some(ev) = reader.next().await {
            if let Event::Data(..) = ev.unwrap() {
                n += 1;
            }
        }
        assert_eq!(n, 10);
        publisher.await.unwrap();
        assert_eq!(
            stuck.next().await,
            Some(Ok(Event::Data(OutputKind::Stdout, b("0"))))
        );
        assert_eq!(
            stuck.next().await,
            Some(Ok(Event::Data(OutputKind::Stdout, b("1"))))
        );
        assert_eq!(
            stuck.next().await,
            Some(Err(SubscriptionError::Stalled {
                stall_ms: 100,
                next_offset: 2
            }))
        );
        assert_eq!(stuck.next().await, None);
        assert_eq!(hub.subscriber_count(), 0);
    }
}
