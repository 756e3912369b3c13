//! Latency histograms and `/proc` sampling of the server under test.
//!
//! Each worker owns its histograms (no locking on the hot path); they are
//! merged once the workload ends. Server CPU and memory come from `/proc`
//! because that works the same for any registry process we did not build.

use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

/// A latency histogram in microseconds, from 1 µs to one hour at 3 significant
/// digits (0.1 % resolution), which is plenty for p99 of network calls.
#[derive(Clone)]
pub struct Lat(Histogram<u64>);

impl Default for Lat {
    fn default() -> Self {
        Self::new()
    }
}

impl Lat {
    pub fn new() -> Self {
        // Bounds are constants that hdrhistogram accepts; failure is a bug.
        Self(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"))
    }

    pub fn record(&mut self, d: Duration) {
        self.0.saturating_record(d.as_micros().max(1) as u64);
    }

    pub fn merge(&mut self, other: &Lat) {
        // Same bounds on both sides, so adding cannot fail except on overflow
        // of counts, which saturates instead.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile (0..=1) in milliseconds, or 0 when nothing was recorded.
    pub fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            0.0
        } else {
            self.0.value_at_quantile(q) as f64 / 1000.0
        }
    }

    pub fn max_ms(&self) -> f64 {
        if self.0.is_empty() {
            0.0
        } else {
            self.0.max() as f64 / 1000.0
        }
    }
}

/// CPU and memory of one process at one instant.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    /// utime + stime of all threads, in seconds.
    pub cpu_s: f64,
    /// Resident set size now (VmRSS), KiB.
    pub rss_kib: u64,
    /// Peak resident set size (VmHWM), KiB.
    pub hwm_kib: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime in seconds from the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) may contain spaces and parentheses, so fields
/// are counted from the last `)`.
pub fn parse_stat_cpu(stat: &str) -> Result<f64> {
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("no ')' in /proc stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // After ')' the first field is field 3 (state); utime is 14, stime 15.
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) as f64 / clock_ticks())
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Samples `pid` ("self" for this process).
pub fn sample(pid: &str) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(ProcSample {
        cpu_s: parse_stat_cpu(&stat)?,
        rss_kib: status_kib(&status, "VmRSS:"),
        hwm_kib: status_kib(&status, "VmHWM:"),
    })
}

/// Resets the kernel's peak-RSS mark of `pid` so VmHWM afterwards is the peak
/// of the next workload alone rather than of the whole process lifetime.
/// Needs permission over the process (we start the servers ourselves); returns
/// whether it worked.
pub fn reset_peak(pid: &str) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_handles_odd_names() {
        let line =
            "1234 (we ird) name)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 0 0";
        let cpu = parse_stat_cpu(line).unwrap();
        assert!((cpu - 300.0 / clock_ticks()).abs() < 1e-9);
    }

    #[test]
    fn percentiles() {
        let mut l = Lat::new();
        for i in 1..=100u64 {
            l.record(Duration::from_millis(i));
        }
        assert_eq!(l.count(), 100);
        assert!((l.ms(0.5) - 50.0).abs() < 0.1);
        assert!((l.ms(0.99) - 99.0).abs() < 0.1);
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_kib(s, "VmRSS:"), 1024);
        assert_eq!(status_kib(s, "VmHWM:"), 2048);
        assert_eq!(status_kib(s, "VmSwap:"), 0);
    }
}
