//! Memory back to the system after a download. A download churns through hundreds of MiB
//! of part buffers on many threads; glibc keeps what they free in per-thread arenas for
//! reuse, so an agent that just prefetched a model would sit near its peak under its
//! DaemonSet memory limit. `malloc_trim` hands the free pages back.

/// Returns the allocator's free memory to the system (glibc; elsewhere nothing to do).
/// Blocking: it walks every arena.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointers and only works on glibc's own arenas, under
    // their locks; it may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}
