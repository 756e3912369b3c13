//! Keeps the allocator from holding on to memory the server no longer uses.
//!
//! Bursts of work (dozens of connections, uploads in flight) leave freed
//! memory spread over glibc's per-thread arenas, where it stays resident:
//! after a burst the resident set would stay near its peak for the life of
//! the process. Both measures here are glibc-specific and do nothing
//! elsewhere.

use std::time::Duration;

/// How often freed memory is handed back to the kernel. A trim walks the
/// allocator's free lists (well under a millisecond for the tens of MiB a
/// busy Trow allocates), so a few seconds keeps the cost negligible while
/// the resident set follows the load down soon after a burst.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// glibc raises its mmap threshold each time a large block is freed, after
/// which large transient buffers come from the per-thread arenas and stay
/// resident once freed. A fixed threshold keeps blocks of 128 KiB and more
/// in their own mappings, returned to the OS on free (measured: peak RSS of
/// a mixed run 37 MiB instead of 47 to 49 MiB; docs/PERFORMANCE.md).
///
///
/// glibc also gives threads up to eight arenas per core, and each keeps its
/// own free memory: with the blocking threads of busy uploads and
/// downloads, the freed memory in all of them added up. One arena per core
/// (one per async worker) is enough for a server whose allocations are
/// short (measured: peak RSS of small pushes, manifest pushes and 64
/// clients reading manifests 21.6 MiB instead of 23.6 MiB, with the same
/// throughput; docs/PERFORMANCE.md).
///
/// Call first thing in `main`, before any other thread exists.
pub fn limit_malloc_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let arenas = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets allocator parameters; the caller runs
        // it before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Returns freed memory to the kernel every [`TRIM_INTERVAL`], for as long as
/// the runtime runs: the uploads' spare buffers once unused for an interval
/// (`crate::storage::release_idle_buffers`), and with glibc `malloc_trim`,
/// which also releases whole free pages inside the arenas (with
/// `MADV_DONTNEED`), which glibc never does on its own.
pub fn spawn_trimmer() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            crate::storage::release_idle_buffers();
            // It takes the arenas' locks: run it off the async workers.
            // SAFETY: malloc_trim is thread-safe and takes no pointers.
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            if let Err(e) = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await {
                tracing::debug!(error = %e, "malloc_trim did not run");
            }
        }
    });
}
