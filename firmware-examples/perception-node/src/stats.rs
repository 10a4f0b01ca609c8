//! Latency statistics in fixed memory: totals over the whole run plus the last
//! [`WINDOW`] samples for percentiles, so a node that runs for hours does not grow.

use heapless::HistoryBuffer;

/// Samples kept for percentiles.
pub const WINDOW: usize = 4096;

/// Latency (microseconds) statistics.
pub struct LatencyStats {
    recent: HistoryBuffer<u32, WINDOW>,
    count: u64,
    sum: u64,
    max: u32,
}

impl Default for LatencyStats {
    fn default() -> Self {
        LatencyStats { recent: HistoryBuffer::new(), count: 0, sum: 0, max: 0 }
    }
}

impl LatencyStats {
    /// Records one sample.
    pub fn record(&mut self, us: u32) {
        self.recent.write(us);
        self.count += 1;
        self.sum += u64::from(us);
        self.max = self.max.max(us);
    }

    /// Samples recorded since the start.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean over the whole run (0 without samples).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// Largest sample of the whole run.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Nearest-rank percentiles (`ps` in 0..=1) over the last [`WINDOW`] samples; 0 without
    /// samples. Sorts a copy on the stack.
    pub fn percentiles<const K: usize>(&self, ps: [f64; K]) -> [u32; K] {
        let mut buf = [0u32; WINDOW];
        let n = self.recent.len();
        buf[..n].copy_from_slice(self.recent.as_slice());
        let sorted = &mut buf[..n];
        sorted.sort_unstable();
        ps.map(|p| {
            if n == 0 {
                return 0;
            }
            let rank = (p * n as f64).ceil() as usize;
            sorted[rank.clamp(1, n) - 1]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s = LatencyStats::default();
        assert_eq!(s.percentiles([0.5]), [0]);
        // 1..=100 in a scrambled order: p50 = 50, p90 = 90, p99 = 99, p100 = 100.
        for i in 0..100u32 {
            s.record((i * 37) % 100 + 1);
        }
        assert_eq!(s.percentiles([0.5, 0.9, 0.99, 1.0]), [50, 90, 99, 100]);
        assert_eq!(s.max(), 100);
        assert!((s.mean() - 50.5).abs() < 1e-12);
    }

    #[test]
    fn window_keeps_the_latest_samples() {
        let mut s = LatencyStats::default();
        for _ in 0..WINDOW {
            s.record(1_000_000);
        }
        for _ in 0..WINDOW {
            s.record(5);
        }
        assert_eq!(s.percentiles([1.0]), [5]);
        assert_eq!(s.max(), 1_000_000);
        assert_eq!(s.count(), 2 * WINDOW as u64);
    }
}
