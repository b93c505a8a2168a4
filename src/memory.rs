//! Process memory: keeping the allocator's footprint flat, and reading the peak.

/// Fixes glibc's mmap threshold at its default of 128 KiB.
///
/// glibc raises the threshold each time a large mmapped block is freed, after which
/// every batch-sized buffer (megabytes) comes from the heap arenas instead, where freed
/// space fragments across threads and resident memory creeps up with the file's length.
/// A fixed threshold keeps those buffers in their own mappings, returned on free, so
/// peak memory stays the same for a 100 MB and a 5 GB import.
pub fn keep_allocator_footprint_flat() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tuning; it is called before the
        // runtime starts any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
}

/// Peak resident set size of this process, from the kernel's own accounting.
///
/// `VmHWM` belongs to this process's address space, which `exec` makes new. The other
/// source, `getrusage`, keeps the larger of it and whatever the process held before
/// `exec`: a child spawned with vfork (as `std::process::Command` does) would report
/// its parent's peak. `getrusage` is the fallback where `/proc` is missing.
pub fn peak_rss_bytes() -> u64 {
    if let Some(kib) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
    {
        return kib * 1024;
    }
    // SAFETY: getrusage only writes into the struct we pass, which is zeroed and owned.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let status = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if status == 0 {
        usage.ru_maxrss.max(0) as u64 * 1024
    } else {
        0
    }
}
