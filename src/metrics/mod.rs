//! Machine metrics: a sampler task takes a [`Sample`] every 5 seconds into a small
//! ring, so `GET /metrics` answers at once from the latest one (contract §5.2).
//!
//! Readings come from a [`Source`] (the real one reads `/proc`, `statfs` and the
//! cgroup guestd runs in); time comes from tokio's clock, so tests drive the cadence
//! with a paused clock instead of sleeping.

pub mod prometheus;
pub mod source;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use source::{CpuTimes, MemInfo, Source, SystemSource};

/// How often the sampler runs.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// How many samples the ring keeps (10 minutes at the default interval).
pub const RING: usize = 120;

/// One reading of the machine, in the units of the `/metrics` JSON.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Unix seconds when the sample was taken.
    pub ts: i64,
    pub cpu_count: u32,
    /// Busy share of all CPUs since the previous sample, 0–100, two decimals.
    pub cpu_used_pct: f64,
    pub mem_total: u64,
    pub mem_used: u64,
    pub mem_cache: u64,
    pub mem_total_mib: u64,
    pub mem_used_mib: u64,
    pub disk_total: u64,
    pub disk_used: u64,
}

/// The latest samples, newest last.
#[derive(Default)]
pub struct Ring {
    samples: Mutex<VecDeque<Sample>>,
}

impl Ring {
    pub fn latest(&self) -> Option<Sample> {
        self.lock().back().cloned()
    }

    pub fn all(&self) -> Vec<Sample> {
        self.lock().iter().cloned().collect()
    }

    fn push(&self, s: Sample) {
        let mut q = self.lock();
        if q.len() == RING {
            q.pop_front();
        }
        q.push_back(s);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Takes samples from a [`Source`], computing CPU use between consecutive readings.
pub struct Sampler<S: Source> {
    source: S,
    prev_cpu: Option<CpuTimes>,
    pub ring: Arc<Ring>,
}

impl<S: Source> Sampler<S> {
    pub fn new(source: S) -> Self {
        Sampler {
            source,
            prev_cpu: None,
            ring: Arc::new(Ring::default()),
        }
    }

    /// Takes one sample now and stores it in the ring.
    pub fn sample(&mut self) -> Sample {
        let cpu = self.source.cpu_times();
        let cpu_used_pct = match (&self.prev_cpu, &cpu) {
            (Some(prev), Some(cur)) => cur.busy_pct_since(prev),
            _ => 0.0,
        };
        if cpu.is_some() {
            self.prev_cpu = cpu;
        }
        let mem = self.source.mem_info();
        let (disk_total, disk_used) = self.source.disk_usage();
        let s = Sample {
            ts: self.source.now_unix(),
            cpu_count: self.source.cpu_count(),
            cpu_used_pct,
            mem_total: mem.total,
            mem_used: mem.used,
            mem_cache: mem.cache,
            mem_total_mib: mem.total >> 20,
            mem_used_mib: mem.used >> 20,
            disk_total,
            disk_used,
        };
        self.ring.push(s.clone());
        s
    }

    /// Samples at once, then every [`INTERVAL`] until the task is dropped.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample();
        }
    }
}

/// Starts the sampler task on the real machine and returns its ring.
pub fn start() -> Arc<Ring> {
    let mut sampler = Sampler::new(SystemSource::detect());
    // The first reading is taken synchronously so `/metrics` has data from the start.
    sampler.sample();
    let ring = sampler.ring.clone();
    tokio::spawn(sampler.run());
    ring
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A scripted machine: CPU counters advance by fixed steps per reading.
    #[derive(Clone, Default)]
    struct Fake {
        readings: Arc<AtomicU64>,
    }

    impl Source for Fake {
        fn now_unix(&self) -> i64 {
            1_700_000_000 + self.readings.load(Ordering::SeqCst) as i64
        }
        fn cpu_count(&self) -> u32 {
            4
        }
        fn cpu_times(&self) -> Option<CpuTimes> {
            let n = self.readings.fetch_add(1, Ordering::SeqCst);
            // 25 busy + 75 idle jiffies per reading: 25 %.
            Some(CpuTimes {
                busy: 25 * n,
                total: 100 * n,
            })
        }
        fn mem_info(&self) -> MemInfo {
            MemInfo {
                total: 8 << 30,
                used: 3 << 30,
                cache: 1 << 30,
            }
        }
        fn disk_usage(&self) -> (u64, u64) {
            (100 << 30, 40 << 30)
        }
    }

    #[test]
    fn sample_fields_and_cpu_between_readings() {
        let mut s = Sampler::new(Fake::default());
        let first = s.sample();
        assert_eq!(
            first.cpu_used_pct, 0.0,
            "no interval before the first reading"
        );
        let second = s.sample();
        assert_eq!(second.cpu_used_pct, 25.0);
        assert_eq!(second.cpu_count, 4);
        assert_eq!(second.mem_total_mib, 8192);
        assert_eq!(second.mem_used_mib, 3072);
        assert_eq!((second.disk_total, second.disk_used), (100 << 30, 40 << 30));
        assert_eq!(s.ring.latest(), Some(second));
    }

    #[tokio::test(start_paused = true)]
    async fn samples_every_five_seconds_on_the_clock() {
        let fake = Fake::default();
        let sampler = Sampler::new(fake.clone());
        let ring = sampler.ring.clone();
        let task = tokio::spawn(sampler.run());
        tokio::task::yield_now().await;
        assert_eq!(ring.all().len(), 1, "a sample at start");
        tokio::time::advance(Duration::from_millis(4_999)).await;
        tokio::task::yield_now().await;
        assert_eq!(ring.all().len(), 1, "nothing before 5 s");
        tokio::time::advance(Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(ring.all().len(), 2, "one at 5 s");
        for _ in 0..3 {
            tokio::time::advance(INTERVAL).await;
            tokio::task::yield_now().await;
        }
        assert_eq!(ring.all().len(), 5, "one per 5 s");
        task.abort();
    }

    #[test]
    fn ring_is_bounded() {
        let mut s = Sampler::new(Fake::default());
        for _ in 0..RING + 10 {
            s.sample();
        }
        assert_eq!(s.ring.all().len(), RING);
    }
}
