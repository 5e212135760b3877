//! Reading the shared counters: quantiles from the latency histogram, pure and unit-tested.

use crate::shmem::LATENCY_BOUNDS;

/// Estimates quantile `q` (0..1) from per-bucket counts (the last bucket is +Inf), the way
/// Prometheus' histogram_quantile does: linear within the bucket the rank falls in.
pub fn quantile(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (i, c) in counts.iter().enumerate() {
        if *c == 0 {
            continue;
        }
        if (seen + c) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { LATENCY_BOUNDS[i - 1] };
            let Some(upper) = LATENCY_BOUNDS.get(i) else {
                return Some(lower);
            };
            let within = (rank - seen as f64) / *c as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        seen += c;
    }
    LATENCY_BOUNDS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let mut counts = vec![0u64; LATENCY_BOUNDS.len() + 1];
        assert_eq!(quantile(&counts, 0.5), None);
        // 100 calls between 1 ms and 2.5 ms.
        counts[2] = 100;
        let p50 = quantile(&counts, 0.5).unwrap();
        assert!((p50 - 0.00175).abs() < 1e-9, "{p50}");
        // One slow call lands the p99 … no: 1 of 101 is above p99's rank.
        counts[10] = 1;
        assert!(quantile(&counts, 0.99).unwrap() < 0.0025);
        assert!(quantile(&counts, 1.0).unwrap() > 0.5);
    }
}
