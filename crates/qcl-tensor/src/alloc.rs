//! Process-wide set-up for programs that run numeric loops: allocator tuning, thread pools.

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

/// Everything a numeric program should set up first: [`tune_allocator_for_numeric_loops`],
/// and candle's CPU thread pool limited to the calling thread (`CANDLE_NUM_THREADS=1`, unless
/// the variable is already set).
///
/// candle 0.11 runs its elementwise ops on a pool of its own whose workers spin between ops;
/// qcl's kernels run on rayon's pool, so with both active, three or more busy threads share
/// the cores and each pool's waits stretch. Measured on 2 cores (ResNet-20 training, batch
/// 128): 8–10% more samples per second with candle's pool off. Call it before any tensor
/// work, from `main`, while the process has one thread; libraries never call it.
/// Returns whether the allocator tuning was applied.
///
/// ```
/// let _applied = qcl_tensor::tune_process_for_numeric_loops();
/// ```
pub fn tune_process_for_numeric_loops() -> bool {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Read by candle when its pool first starts, i.e. after this call.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    tune_allocator_for_numeric_loops()
}

/// Runs `work` on a fresh rayon pool of `threads` threads: qcl's parallel code follows the
/// pool it runs in, so this is how a test (or a user) checks that a result does not depend
/// on the thread count.
///
/// ```
/// let one = qcl_tensor::on_threads(1, || rayon::current_num_threads())?;
/// let two = qcl_tensor::on_threads(2, || rayon::current_num_threads())?;
/// assert_eq!((one, two), (1, 2));
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidParameter`](crate::Error::InvalidParameter) when the pool cannot be built
/// (no thread could be started).
pub fn on_threads<T: Send>(threads: usize, work: impl FnOnce() -> T + Send) -> crate::Result<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| crate::Error::invalid_parameter("threads", format!("no thread pool: {e}")))?;
    Ok(pool.install(work))
}
