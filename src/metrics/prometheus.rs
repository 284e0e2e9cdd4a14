//! Prometheus text exposition (format 0.0.4) of a sample plus guestd's own gauges.

use std::fmt::Write as _;

use super::Sample;

/// guestd's own state, next to the machine sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentGauges {
    pub rss_bytes: u64,
    pub processes: usize,
    pub watchers: usize,
    pub connections: usize,
    pub reaped_orphans: u64,
}

impl AgentGauges {
    /// guestd's resident set size from `/proc/self/status`.
    pub fn own_rss_bytes() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
            .saturating_mul(1024)
    }
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the sample and gauges.
pub fn render(s: &Sample, g: &AgentGauges) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    };
    metric(
        "guestd_sample_timestamp_seconds",
        "gauge",
        "Unix time of the sample.",
        s.ts.to_string(),
    );
    metric(
        "guestd_cpu_count",
        "gauge",
        "Logical CPUs available.",
        s.cpu_count.to_string(),
    );
    metric(
        "guestd_cpu_used_percent",
        "gauge",
        "Busy share of all CPUs over the last sampling interval.",
        format!("{}", s.cpu_used_pct),
    );
    metric(
        "guestd_memory_total_bytes",
        "gauge",
        "Total memory.",
        s.mem_total.to_string(),
    );
    metric(
        "guestd_memory_used_bytes",
        "gauge",
        "Used memory (without cache).",
        s.mem_used.to_string(),
    );
    metric(
        "guestd_memory_cache_bytes",
        "gauge",
        "Page cache and reclaimable slab.",
        s.mem_cache.to_string(),
    );
    metric(
        "guestd_disk_total_bytes",
        "gauge",
        "Size of the root filesystem.",
        s.disk_total.to_string(),
    );
    metric(
        "guestd_disk_used_bytes",
        "gauge",
        "Used space of the root filesystem.",
        s.disk_used.to_string(),
    );
    metric(
        "guestd_process_resident_memory_bytes",
        "gauge",
        "Resident memory of guestd itself.",
        g.rss_bytes.to_string(),
    );
    metric(
        "guestd_processes",
        "gauge",
        "User processes guestd is running.",
        g.processes.to_string(),
    );
    metric(
        "guestd_watchers",
        "gauge",
        "Active filesystem watchers.",
        g.watchers.to_string(),
    );
    metric(
        "guestd_connections",
        "gauge",
        "Open client connections.",
        g.connections.to_string(),
    );
    metric(
        "guestd_reaped_orphans_total",
        "counter",
        "Orphaned descendants reaped by guestd as subreaper.",
        g.reaped_orphans.to_string(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_type_and_one_sample() {
        let s = Sample {
            ts: 1,
            cpu_count: 2,
            cpu_used_pct: 12.5,
            mem_total: 3,
            mem_used: 4,
            mem_cache: 5,
            mem_total_mib: 0,
            mem_used_mib: 0,
            disk_total: 6,
            disk_used: 7,
        };
        let text = render(&s, &AgentGauges::default());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() % 3, 0);
        for chunk in lines.chunks(3) {
            let name = chunk[0].split_whitespace().nth(2).unwrap();
            assert!(chunk[0].starts_with("# HELP "));
            assert_eq!(
                chunk[1],
                format!(
                    "# TYPE {name} {}",
                    chunk[1].split_whitespace().last().unwrap()
                )
            );
            assert!(chunk[2].starts_with(&format!("{name} ")));
        }
        assert!(text.contains("guestd_cpu_used_percent 12.5\n"));
    }
}
