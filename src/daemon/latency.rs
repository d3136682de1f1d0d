//! What the first-packet fast path costs, for `status`: how long a new socket waits between the
//! kernel reporting it and its decision being in the classifier's maps (the last
//! [`SAMPLES`] sockets, in a fixed ring so that recording allocates nothing), how many sockets it
//! handled, and the CPU time it spent on them.

use std::time::Duration;

use rustix::time::{ClockId, clock_gettime};
use serde::{Deserialize, Serialize};

/// Latencies kept for the percentiles: the last this many sockets.
pub const SAMPLES: usize = 4096;

/// The fast path's figures as `status --json` shows them (`fast_path`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FastPathStatus {
    /// New sockets the fast path shaped since the daemon started.
    pub sockets: u64,
    /// Median time from the kernel's report to the decision in the maps, over the last
    /// [`SAMPLES`] sockets, in microseconds (`None` before the first).
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    /// The fast path's thread CPU time divided by the sockets it handled.
    pub cpu_us_per_socket: Option<f64>,
    /// New sockets of processes that had a class, not reported while the kernel's queue to the
    /// daemon was filling (a flood of new sockets): classified by their process's class and
    /// found by the next scan.
    #[serde(default)]
    pub deferred: u64,
    /// New sockets whose report found the queue full (each reported again on a later packet).
    #[serde(default)]
    pub lost: u64,
    /// Closed sockets whose final counts found the queue full or filling (a flood): their
    /// bytes are unattributed.
    #[serde(default)]
    pub close_lost: u64,
}

/// The fast path's running figures.
pub struct FastPathStats {
    sockets: u64,
    cpu: Duration,
    /// Latencies in microseconds; `next` is where the next one goes.
    ring: Box<[u32; SAMPLES]>,
    next: usize,
    filled: usize,
}

impl Default for FastPathStats {
    fn default() -> Self {
        FastPathStats {
            sockets: 0,
            cpu: Duration::ZERO,
            ring: Box::new([0; SAMPLES]),
            next: 0,
            filled: 0,
        }
    }
}

/// CLOCK_MONOTONIC: the clock the kernel stamps [`crate::classify::NewSocket::reported_at`] with.
pub fn monotonic() -> Duration {
    timespec(clock_gettime(ClockId::Monotonic))
}

/// The calling thread's CPU time (user + system).
pub fn thread_cpu() -> Duration {
    timespec(clock_gettime(ClockId::ThreadCPUTime))
}

fn timespec(t: rustix::time::Timespec) -> Duration {
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

impl FastPathStats {
    /// One socket's wait from report to decision (saturating at about 71 minutes).
    pub fn record(&mut self, latency: Duration) {
        self.ring[self.next] = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self.next = (self.next + 1) % SAMPLES;
        self.filled = (self.filled + 1).min(SAMPLES);
    }

    /// A fast-path round: `sockets` handled in `cpu` of thread CPU time.
    pub fn add_round(&mut self, sockets: usize, cpu: Duration) {
        self.sockets += sockets as u64;
        self.cpu += cpu;
    }

    /// The `p`th percentile (0–100, nearest rank) of the kept latencies, in microseconds.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        let mut kept = self.ring[..self.filled].to_vec();
        let last = kept.len().checked_sub(1)?;
        let rank = ((p.clamp(0.0, 100.0) / 100.0 * kept.len() as f64).ceil() as usize)
            .saturating_sub(1)
            .min(last);
        Some(u64::from(*kept.select_nth_unstable(rank).1))
    }

    pub fn status(&self, reports: crate::classify::ReportStats) -> FastPathStatus {
        FastPathStatus {
            deferred: reports.deferred,
            lost: reports.lost + reports.exec_lost,
            close_lost: reports.close_lost,
            sockets: self.sockets,
            p50_us: self.percentile(50.0),
            p99_us: self.percentile(99.0),
            cpu_us_per_socket: (self.sockets > 0)
                .then(|| self.cpu.as_secs_f64() * 1e6 / self.sockets as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn nothing_recorded_has_no_percentiles() {
        let s = FastPathStats::default().status(Default::default());
        assert_eq!(
            s,
            FastPathStatus {
                sockets: 0,
                p50_us: None,
                p99_us: None,
                cpu_us_per_socket: None,
                deferred: 0,
                lost: 0,
                close_lost: 0,
            }
        );
    }

    #[test]
    fn percentiles_are_nearest_rank_whatever_the_order() {
        let mut s = FastPathStats::default();
        // 1..=100 µs, shuffled by a stride coprime with 100.
        for i in 0..100u64 {
            s.record(us((i * 37) % 100 + 1));
        }
        assert_eq!(s.percentile(50.0), Some(50));
        assert_eq!(s.percentile(99.0), Some(99));
        assert_eq!(s.percentile(100.0), Some(100));
        assert_eq!(s.percentile(0.0), Some(1));
        let mut one = FastPathStats::default();
        one.record(us(7));
        assert_eq!(
            (one.percentile(50.0), one.percentile(99.0)),
            (Some(7), Some(7))
        );
    }

    #[test]
    fn only_the_last_samples_count() {
        let mut s = FastPathStats::default();
        // A slow start, then a full ring of fast sockets: the slow ones are forgotten.
        for _ in 0..SAMPLES {
            s.record(us(90_000));
        }
        for _ in 0..SAMPLES {
            s.record(us(200));
        }
        assert_eq!(s.percentile(99.0), Some(200));
        s.record(Duration::from_secs(1 << 40));
        assert_eq!(s.percentile(100.0), Some(u64::from(u32::MAX)));
        assert_eq!(s.percentile(99.0), Some(200));
    }

    #[test]
    fn cpu_is_per_socket_over_all_rounds() {
        let mut s = FastPathStats::default();
        s.add_round(3, us(300));
        s.add_round(1, us(100));
        let st = s.status(Default::default());
        assert_eq!(st.sockets, 4);
        assert_eq!(st.cpu_us_per_socket, Some(100.0));
    }

    #[test]
    fn the_clocks_move_forward() {
        let (m0, c0) = (monotonic(), thread_cpu());
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(monotonic() > m0 && thread_cpu() > c0, "{x}");
    }
}
