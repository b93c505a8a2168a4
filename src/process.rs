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

/// `dsa-ingest@host/boot:pid`: who holds a lease, readable by a person and by
/// [`owner_is_dead_local_process`]. The boot id tells apart machines or containers
/// that share a host name, and a host before and after a restart.
pub fn worker_identity() -> String {
    format!("dsa-ingest@{}:{}", this_host(), std::process::id())
}

fn this_host() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().chars().take(8).collect::<String>())
        .unwrap_or_default();
    format!("{}/{boot}", hostname())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

/// True when `owner` names a process on this host that no longer runs, so its lease can
/// be taken at once instead of after it expires (the usual case after `kill -9` and a
/// `--resume` on the same machine). Other hosts' leases always run out by time.
pub fn owner_is_dead_local_process(owner: &str) -> bool {
    let Some((host, pid)) = owner
        .strip_prefix("dsa-ingest@")
        .and_then(|rest| rest.rsplit_once(':'))
    else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    host == this_host()
        && pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_or_foreign_owner_is_not_taken_over() {
        assert!(!owner_is_dead_local_process(&worker_identity()));
        assert!(!owner_is_dead_local_process(
            "dsa-ingest@elsewhere.example:1"
        ));
        assert!(!owner_is_dead_local_process("someone"));
        let dead = format!("dsa-ingest@{}:{}", this_host(), u32::MAX - 1);
        assert!(owner_is_dead_local_process(&dead));
    }
}
