//! The C allocator's memory, given back.
//!
//! guestd's working set comes and goes in bursts (the output of thousands of short
//! commands, 200 concurrent streams). glibc's allocator keeps freed memory in its arenas
//! (one per thread that ever allocated, up to eight per core) and returns it to the
//! system only from the top of each heap, so after such a burst the RSS stayed at its
//! peak for good. On glibc guestd therefore limits the arenas to two and, after its
//! retained state shrank, asks the allocator to release every free page
//! (`malloc_trim`). musl's allocator (the static build) unmaps freed memory itself (too
//! eagerly: [`crate::sys::alloc`] keeps a small cache of freed large blocks in front of
//! either allocator), so there only that cache is emptied.

/// Limits glibc's arenas (call once, before the runtime's threads start).
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        const M_ARENA_MAX: libc::c_int = -8;
        // SAFETY: mallopt takes two integers and only changes allocator parameters.
        unsafe { libc::mallopt(M_ARENA_MAX, 2) };
    }
}

/// Returns free allocator memory to the system. Takes about a millisecond per few tens
/// of MiB of heap; call it from a blocking context.
pub fn release_free_memory() {
    // The cache of freed blocks in front of the C allocator (D74).
    crate::sys::alloc::GLOBAL.release();
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes an integer; it only madvises pages the allocator owns
    // and has marked free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// This process's resident set, in bytes (`/proc/self/statm`).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf takes an integer.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Every `period`, gives free memory back while the RSS is more than `slack` above the
/// lowest figure seen after a release (or at start). Compared with the last release
/// instead, a release in the middle of a load set the bar so high that the memory freed
/// when the load ended was never given back (benches/load.rs: +29 MiB 5 s after 20,000
/// commands in one run, +12 in the next). `malloc_trim` costs about a millisecond on a
/// large heap, so trimming every period while memory is legitimately in use is cheap.
pub async fn janitor(period: std::time::Duration, slack: u64) {
    let mut floor = rss_bytes().unwrap_or(0);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(now) = rss_bytes() else { continue };
        if now > floor + slack {
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
            let after = rss_bytes().unwrap_or(now);
            tracing::debug!(before = now, after, "released free allocator memory");
            floor = floor.min(after);
        } else if now < floor {
            floor = now;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rss_is_read() {
        let rss = super::rss_bytes().expect("statm");
        assert!(rss > 1 << 20, "{rss}");
        super::release_free_memory();
    }
}
