//! How the process's allocator returns freed memory to the system. Every layer's activations are fresh
//! buffers of a few MiB (a 512-token prefill of the `base` shape: 12 MiB for the gate/up product alone).
//! glibc's defaults give buffers that size pages from the system that are handed back on `free`, so each
//! one is faulted in and zeroed again on its next use: ~25 % of a wide matrix product's time on the CPU
//! backend, and prefill 590 → 745 tokens/s, vision tower 224 → 196 ms once they are kept (BENCHMARKS.md).
//!
//! Weights, which every decoding step streams whole, are also asked to be backed by 2 MiB pages
//! ([`zeroed_on_huge_pages`]): read through 4 KiB pages the same bytes cost a page-table walk every 4 KiB.

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

/// Size of the huge pages asked for (x86-64 and most arm64 kernels' transparent huge pages).
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

/// Whether weights are to be put on huge pages (`LLAVA_MED_HUGE_PAGES`, on by default; read once).
#[cfg(target_os = "linux")]
fn huge_pages_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| {
        crate::kernels::switch_on(std::env::var("LLAVA_MED_HUGE_PAGES").ok().as_deref())
    })
}

/// `len` zeros in a buffer whose whole 2 MiB stretches the kernel is asked to back with huge pages
/// (Linux's transparent huge pages, which most distributions grant only where asked: `madvise` mode).
/// The advice is given before the buffer is first written, so its pages are huge from their first fault
/// instead of waiting for the kernel's background collapsing; where it is refused or unsupported the
/// buffer is an ordinary one. For weights, which decoding streams whole at every step.
/// `LLAVA_MED_HUGE_PAGES=0` turns the advice off: on a VM whose host takes free memory back, a huge
/// page's first fault costs the host's backing it afresh (loading `base` on the Intel CI machine: up to
/// 1.8–2.8 s instead of 1.1–1.3 until the memory has been used once; BENCHMARKS.md).
pub fn zeroed_on_huge_pages<T: Copy + Default>(len: usize) -> Vec<T> {
    // Zeroed by the allocator: fresh memory is left untouched (calloc), so the pages are first faulted
    // in by whoever fills the buffer, on as many threads as fill it.
    let values = vec![T::default(); len];
    #[cfg(target_os = "linux")]
    if huge_pages_wanted() {
        let start = values.as_ptr() as usize;
        let end = start + len * std::mem::size_of::<T>();
        let (first, last) = (
            start.next_multiple_of(HUGE_PAGE),
            end / HUGE_PAGE * HUGE_PAGE,
        );
        if first < last {
            // SAFETY: the range lies inside `values`' allocation; the advice changes only how its pages
            // are backed, never their contents, and a refusal leaves ordinary pages.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    values
}

/// `out[i]` = `value` of the `i`th `width` bytes of `input`, on all cores in runs of whole huge pages:
/// filling fresh memory is mostly the kernel zeroing its pages on first touch, which goes as many times
/// faster as there are cores touching them (loading a checkpoint converts every weight this way).
pub fn convert_in_parallel<T: Send>(
    input: &[u8],
    width: usize,
    out: &mut [T],
    value: impl Fn(&[u8]) -> T + Sync,
) {
    assert_eq!(
        input.len(),
        out.len() * width,
        "input and output sizes differ"
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Runs of 2 MiB (a huge page on Linux), so small parts take no extra threads.
    const RUN_BYTES: usize = 2 << 20;
    let chunk = out
        .len()
        .div_ceil(threads)
        .next_multiple_of(RUN_BYTES / std::mem::size_of::<T>().max(1))
        .max(1);
    let value = &value;
    std::thread::scope(|scope| {
        for (o, b) in out.chunks_mut(chunk).zip(input.chunks(chunk * width)) {
            scope.spawn(move || {
                for (v, b) in o.iter_mut().zip(b.chunks_exact(width)) {
                    *v = value(b);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_setting() {
        assert!(super::keep_freed_blocks());
    }

    /// The buffer holds zeros, and once written its aligned 2 MiB stretches are on huge pages where the
    /// kernel grants them (checked through `/proc/self/smaps` when the system's setting allows them).
    #[test]
    fn huge_page_buffers_are_zeroed_and_advised() {
        // 40 MiB: past glibc's largest mmap threshold, so the buffer is fresh memory, not heap memory
        // that another test's buffer has already faulted in on ordinary pages.
        let mut values: Vec<f32> = super::zeroed_on_huge_pages(10 << 20);
        assert_eq!(values.len(), 10 << 20);
        assert!(values.iter().all(|&v| v == 0.0));
        // Filled, as weights are: the first writes fault the pages in.
        values
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32);
        let empty: Vec<u8> = super::zeroed_on_huge_pages(0);
        assert!(empty.is_empty());
        #[cfg(target_os = "linux")]
        {
            let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
                .unwrap_or_default();
            if setting.contains("[never]") || setting.is_empty() || !super::huge_pages_wanted() {
                eprintln!(
                    "skipped the page check: huge pages are off (system setting or LLAVA_MED_HUGE_PAGES)"
                );
                return;
            }
            // The advice splits the mapping: its aligned middle is a mapping of its own.
            let middle = (values.as_ptr() as usize).next_multiple_of(super::HUGE_PAGE);
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
            let huge_kb = smaps_huge_kb(&smaps, middle);
            assert!(
                huge_kb >= 2048,
                "no huge page backs the 40 MiB buffer ({huge_kb} kB)"
            );
        }
    }

    /// Every value converted from its own bytes, across the threads' run boundaries and a ragged end.
    #[test]
    fn parallel_conversion_is_the_sequential_one() {
        for len in [0, 1, 5, 3 * (1 << 19) + 7] {
            let bytes: Vec<u8> = (0..len * 2).map(|i| (i * 7 % 251) as u8).collect();
            let mut out = vec![0u32; len];
            super::convert_in_parallel(&bytes, 2, &mut out, |b| {
                u32::from(b[0]) << 8 | u32::from(b[1])
            });
            let want: Vec<u32> = bytes
                .chunks_exact(2)
                .map(|b| u32::from(b[0]) << 8 | u32::from(b[1]))
                .collect();
            assert!(out == want, "{len} values");
        }
    }

    /// `AnonHugePages` of the mapping holding `address` in `smaps`.
    #[cfg(target_os = "linux")]
    fn smaps_huge_kb(smaps: &str, address: usize) -> usize {
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-')
                && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                inside = (a..b).contains(&address);
            } else if inside && let Some(kb) = line.strip_prefix("AnonHugePages:") {
                return kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            }
        }
        0
    }
}
