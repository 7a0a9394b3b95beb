//! Bench builds only (`--features alloc-count`): the system allocator, with every allocation
//! counted in [`outrigger::telemetry::metrics::HEAP_ALLOCATIONS`] (exported on `/metrics` as
//! `outrigger_heap_allocations_total`), so that `bench/proxy-instructions.sh` can report heap
//! allocations per proxied request. In the binary crate because a global allocator is an
//! `unsafe impl` and the library forbids unsafe code.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::Ordering;

use outrigger::telemetry::metrics::HEAP_ALLOCATIONS;

pub struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; the counter is an atomic
// that never allocates.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        HEAP_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A reallocation is an allocation too (it may move the block).
        HEAP_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}
