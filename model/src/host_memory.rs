//! How the process's allocator returns freed memory to the system. Every layer's activations are fresh
//! buffers of a few MiB (a 512-token prefill of the `base` shape: 12 MiB for the gate/up product alone).
//! glibc's defaults give buffers that size pages from the system that are handed back on `free`, so each
//! one is faulted in and zeroed again on its next use: ~25 % of a wide matrix product's time on the CPU
//! backend, and prefill 590 → 745 tokens/s, vision tower 224 → 196 ms once they are kept (BENCHMARKS.md).

/// Largest block kept for reuse: glibc's own ceiling for its mmap threshold on 64-bit systems (larger
/// values are refused). Bigger blocks still come from and go back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEEP_BLOCKS_UP_TO: i32 = 32 << 20;

/// Keeps freed blocks of up to 32 MiB for reuse instead of returning their pages to the system (glibc on
/// Linux; elsewhere the allocator is left as it is). The process then holds on to its peak working set
/// of activations, which its peak memory already counts. Returns whether the setting took. Call it once,
/// at start, before the model runs.
pub fn keep_freed_blocks() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Both are needed: with only the threshold raised the heap's top is still trimmed back to the
        // system after each free, and with only trimming off blocks over 128 KiB are still mapped and
        // unmapped one by one (each alone measured slower than glibc's adaptive default).
        // SAFETY: mallopt only changes the allocator's parameters; callable at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_setting() {
        assert!(super::keep_freed_blocks());
    }
}
