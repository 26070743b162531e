//! Process-wide allocator tuning for programs that run numeric loops.

/// Keeps large freed blocks in the process instead of returning them to the kernel.
///
/// Kernels and training loops allocate and free multi-megabyte buffers at every step; with
/// glibc's defaults each one is a fresh `mmap`, whose pages the kernel zeroes again on first
/// touch (measured: a third of a training step's time). This raises glibc's mmap and trim
/// thresholds and its top padding to 1 GiB. It changes the whole process, so it is for
/// programs (our `qcl` and `xtask` call it first thing), never called by the libraries
/// themselves. On other platforms it does nothing. Returns whether the tuning was applied.
///
/// ```
/// let _applied = qcl_tensor::tune_allocator_for_numeric_loops();
/// ```
pub fn tune_allocator_for_numeric_loops() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const ONE_GIB: libc::c_int = 1 << 30;
        // SAFETY: mallopt only adjusts glibc's allocator parameters; any value is accepted or
        // refused (return 0), never undefined behaviour.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, ONE_GIB) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_GIB) == 1
                && libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
