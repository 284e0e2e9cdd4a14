//! A small cache of freed large blocks in front of the C allocator (D74).
//!
//! musl's allocator (mallocng) gives memory back as soon as a group of blocks is free:
//! a block of more than a few KiB is `mmap`ed when allocated and `munmap`ed when freed.
//! Streaming output allocates and frees such blocks for every chunk (the 32 KiB read, its
//! base64 text, the encoded message), so the musl build made ~4 `mmap`/`munmap` pairs per
//! chunk: page faults on every fresh block and a TLB shootdown on every unmap (1 GiB of
//! stdout as Connect JSON: 0.16 of a pipe copy, against 0.31 for the glibc build).
//!
//! [`BlockCache`] keeps up to [`CACHE_BYTES`] of freed blocks between 8 KiB and 1 MiB,
//! in power-of-two size classes, and hands them out again; everything else goes straight
//! to the system allocator. [`BlockCache::release`] returns the cached blocks (the memory
//! janitor calls it, before `malloc_trim` on glibc). It is guestd's global allocator in
//! both builds: glibc's allocator needs it less (it serves such blocks from its heap), but
//! the whole test suite then runs on the allocator that ships, and streaming gains a
//! little there too (docs/BENCHMARKS.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Smallest cached size class: 16 KiB (sizes above 8 KiB round up to it).
const MIN_SHIFT: u32 = 14;
/// Largest cached size class: 1 MiB.
const MAX_SHIFT: u32 = 20;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Blocks kept per class at most.
const SLOTS: usize = 16;
/// Bytes kept in the cache at most, over all classes.
pub const CACHE_BYTES: usize = 4 << 20;
/// Alignment every cached block has (what the C allocator guarantees).
const ALIGN: usize = 16;

struct Stack {
    blocks: [usize; SLOTS],
    len: usize,
}

/// guestd's allocator (both builds: the tests exercise what ships).
#[global_allocator]
pub static GLOBAL: BlockCache = BlockCache::new();

/// The caching allocator (see the module documentation).
pub struct BlockCache {
    classes: [Mutex<Stack>; CLASSES],
    cached: AtomicUsize,
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

/// The size class of a layout, if blocks of it are cached.
fn class_of(size: usize, align: usize) -> Option<usize> {
    if align > ALIGN || size <= 8 << 10 || size > 1 << MAX_SHIFT {
        return None;
    }
    let shift = size.next_power_of_two().trailing_zeros().max(MIN_SHIFT);
    Some((shift - MIN_SHIFT) as usize)
}

fn class_size(class: usize) -> usize {
    1 << (MIN_SHIFT as usize + class)
}

fn class_layout(class: usize) -> Layout {
    // A power of two up to 1 MiB with alignment 16 is always a valid layout.
    Layout::from_size_align(class_size(class), ALIGN).unwrap_or(Layout::new::<u8>())
}

impl BlockCache {
    pub const fn new() -> BlockCache {
        BlockCache {
            classes: [const {
                Mutex::new(Stack {
                    blocks: [0; SLOTS],
                    len: 0,
                })
            }; CLASSES],
            cached: AtomicUsize::new(0),
        }
    }

    /// Bytes currently held in the cache.
    pub fn cached_bytes(&self) -> usize {
        self.cached.load(Ordering::Relaxed)
    }

    fn pop(&self, class: usize) -> Option<*mut u8> {
        let mut s = self.classes[class]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if s.len == 0 {
            return None;
        }
        s.len -= 1;
        let p = s.blocks[s.len];
        self.cached.fetch_sub(class_size(class), Ordering::Relaxed);
        Some(p as *mut u8)
    }

    /// Keeps a freed block; false when the class or the cache is full.
    fn push(&self, class: usize, p: *mut u8) -> bool {
        let size = class_size(class);
        let mut s = self.classes[class]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if s.len == SLOTS {
            return false;
        }
        // Reserve the bytes first: classes are locked separately, the cap is shared.
        let mut cur = self.cached.load(Ordering::Relaxed);
        loop {
            if cur + size > CACHE_BYTES {
                return false;
            }
            match self.cached.compare_exchange_weak(
                cur,
                cur + size,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        let len = s.len;
        s.blocks[len] = p as usize;
        s.len += 1;
        true
    }

    /// Gives every cached block back to the system allocator.
    pub fn release(&self) {
        for class in 0..CLASSES {
            while let Some(p) = self.pop(class) {
                // SAFETY: p came from System.alloc with this class's layout.
                unsafe { System.dealloc(p, class_layout(class)) };
            }
        }
    }
}

// SAFETY: blocks of cached classes are always allocated and freed with their class's
// layout (a power of two, alignment 16), which satisfies every layout mapped to that
// class (size ≤ class size, alignment ≤ 16); all other layouts go to the system
// allocator unchanged. The cache only stores pointers it was given back and hands each
// out once (under its class's lock). Nothing here allocates or panics.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout.size(), layout.align()) {
            // SAFETY: forwarded with the caller's layout.
            None => unsafe { System.alloc(layout) },
            Some(c) => match self.pop(c) {
                Some(p) => p,
                // SAFETY: a valid non-zero layout.
                None => unsafe { System.alloc(class_layout(c)) },
            },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout.size(), layout.align()) {
            // SAFETY: forwarded with the caller's layout.
            None => unsafe { System.alloc_zeroed(layout) },
            Some(c) => match self.pop(c) {
                Some(p) => {
                    // SAFETY: the block has at least layout.size() bytes.
                    unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                    p
                }
                // SAFETY: a valid non-zero layout.
                None => unsafe { System.alloc_zeroed(class_layout(c)) },
            },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_of(layout.size(), layout.align()) {
            // SAFETY: allocated by the system allocator with this layout.
            None => unsafe { System.dealloc(ptr, layout) },
            Some(c) => {
                if !self.push(c, ptr) {
                    // SAFETY: blocks of this class are allocated with its layout.
                    unsafe { System.dealloc(ptr, class_layout(c)) };
                }
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = class_of(layout.size(), layout.align());
        let new = class_of(new_size, layout.align());
        match (old, new) {
            // SAFETY: the caller's contract, forwarded.
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            // The block already has room for any size of its class.
            (Some(a), Some(b)) if a == b => ptr,
            _ => {
                let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
                    return std::ptr::null_mut();
                };
                // SAFETY: a valid layout; the old block is live for layout.size() bytes
                // and the new one has new_size; they do not overlap.
                unsafe {
                    let q = self.alloc(new_layout);
                    if !q.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    q
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    #[test]
    fn classes_cover_8_kib_to_1_mib() {
        assert_eq!(class_of(8 << 10, 8), None);
        assert_eq!(class_of((8 << 10) + 1, 8), Some(0));
        assert_eq!(class_of(16 << 10, 8), Some(0));
        assert_eq!(class_of((16 << 10) + 1, 8), Some(1));
        assert_eq!(class_of(32 << 10, 8), Some(1));
        assert_eq!(class_of(1 << 20, 8), Some(CLASSES - 1));
        assert_eq!(class_of((1 << 20) + 1, 8), None);
        assert_eq!(class_of(32 << 10, 64), None, "over-aligned: not cached");
    }

    #[test]
    fn a_freed_block_is_handed_out_again_and_released() {
        let a = BlockCache::new();
        // SAFETY: layouts are valid; every block is freed with the layout it was
        // allocated with.
        unsafe {
            let p = a.alloc(l(40_000));
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 7, 40_000);
            a.dealloc(p, l(40_000));
            assert_eq!(a.cached_bytes(), 64 << 10);
            // Any size of the same class gets the same block.
            let q = a.alloc(l(50_000));
            assert_eq!(q, p);
            assert_eq!(a.cached_bytes(), 0);
            a.dealloc(q, l(50_000));
            // Zeroed allocations from the cache are zeroed.
            let z = a.alloc_zeroed(l(60_000));
            assert_eq!(z, p);
            assert!(
                std::slice::from_raw_parts(z, 60_000)
                    .iter()
                    .all(|&b| b == 0)
            );
            a.dealloc(z, l(60_000));
            a.release();
            assert_eq!(a.cached_bytes(), 0);
        }
    }

    #[test]
    fn the_cache_never_holds_more_than_its_cap() {
        let a = BlockCache::new();
        // SAFETY: as above.
        unsafe {
            let blocks: Vec<_> = (0..16).map(|_| a.alloc(l(1 << 20))).collect();
            for p in &blocks {
                assert!(!p.is_null());
                a.dealloc(*p, l(1 << 20));
            }
            assert_eq!(a.cached_bytes(), CACHE_BYTES, "4 of 16 MiB kept");
            a.release();
        }
    }

    #[test]
    fn realloc_keeps_contents_across_classes_and_the_system_allocator() {
        let a = BlockCache::new();
        // SAFETY: as above; each realloc is given the block's current layout.
        unsafe {
            let mut p = a.alloc(l(100));
            let mut size = 100;
            std::ptr::write_bytes(p, 1, size);
            // Grow through small (system), cached classes, and past 1 MiB (system).
            for next in [5_000, 20_000, 30_000, 300_000, 3 << 20, 50_000, 64] {
                p = a.realloc(p, l(size), next);
                assert!(!p.is_null());
                let keep = size.min(next);
                assert!(
                    std::slice::from_raw_parts(p, keep).iter().all(|&b| b == 1),
                    "contents lost growing {size} -> {next}"
                );
                std::ptr::write_bytes(p, 1, next);
                size = next;
            }
            a.dealloc(p, l(size));
            a.release();
        }
    }

    #[test]
    fn threads_share_it_without_losing_blocks() {
        static A: BlockCache = BlockCache::new();
        let handles: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        let size = 10_000 + (i * 7919 + t * 104_729) % 500_000;
                        // SAFETY: as above.
                        unsafe {
                            let p = A.alloc(l(size));
                            assert!(!p.is_null());
                            *p = t as u8;
                            *p.add(size - 1) = t as u8;
                            assert_eq!((*p, *p.add(size - 1)), (t as u8, t as u8));
                            A.dealloc(p, l(size));
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(A.cached_bytes() <= CACHE_BYTES);
        A.release();
        assert_eq!(A.cached_bytes(), 0);
    }
}
