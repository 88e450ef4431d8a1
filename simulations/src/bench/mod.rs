//! The measurements behind `starling-bench`, one module per subject; each prints its figures as JSON
//! lines (one object per measurement, with peak RSS).
//! What must never live here: assertions about speed (benchmarks report, tests decide correctness).

pub mod aggregate;
pub mod client;
pub mod model;
pub mod privacy;
pub mod procs;
pub mod secagg;
pub mod sim;
pub mod transport;

/// Peak resident set size of this process in bytes (Linux VmHWM; 0 where unavailable).
pub fn peak_rss() -> u64 {
    peak_rss_in("/proc/self/status")
}

/// Peak resident set size in bytes from a Linux `/proc/<pid>/status` file (0 where unavailable).
pub fn peak_rss_in(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
