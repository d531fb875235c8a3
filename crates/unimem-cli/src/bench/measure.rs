//! Timing: a warm-up, then repeated samples, reported as the median with the min–max spread.

use std::time::{Duration, Instant};

use serde::Serialize;

/// One measured quantity in nanoseconds per operation: the median of the samples, with
/// their spread.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Figure {
    pub median_ns: f64,
    pub min_ns: f64,
    pub max_ns: f64,
    pub samples: usize,
}

impl Figure {
    /// The figure of `samples` (nanoseconds per operation each); `None` if there are none.
    pub fn of(mut samples: Vec<f64>) -> Option<Figure> {
        samples.retain(|s| s.is_finite());
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = if n % 2 == 1 { samples[n / 2] } else { (samples[n / 2 - 1] + samples[n / 2]) / 2.0 };
        Some(Figure { median_ns: median, min_ns: samples[0], max_ns: samples[n - 1], samples: n })
    }

    /// Bytes per second at the median, for an operation that moves `bytes`.
    pub fn bytes_per_second(&self, bytes: u64) -> f64 {
        bytes as f64 / (self.median_ns / 1e9)
    }

    /// How many times faster this is than `baseline`: above 1 when this takes less time.
    pub fn speedup_over(&self, baseline: &Figure) -> f64 {
        baseline.median_ns / self.median_ns
    }
}

/// "2.3x faster" / "4.1x slower" for a speedup (baseline time ÷ unimem time).
pub fn ratio_text(speedup: f64) -> String {
    if !speedup.is_finite() || speedup <= 0.0 {
        return "-".into();
    }
    let (factor, word) = if speedup >= 1.0 { (speedup, "faster") } else { (1.0 / speedup, "slower") };
    if factor < 1.05 {
        return "same".into();
    }
    if factor >= 100.0 { format!("{factor:.0}x {word}") } else { format!("{factor:.1}x {word}") }
}

/// How long to warm up and how many samples to take.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sampling {
    /// Time spent on each measurement's warm-up.
    #[serde(serialize_with = "millis")]
    pub warmup: Duration,
    /// Time aimed at for each sample: fast operations run in batches that fill it.
    #[serde(serialize_with = "millis")]
    pub sample: Duration,
    /// Samples per measurement.
    pub samples: usize,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

impl Sampling {
    /// Times `op`, one call being one operation: warm-up, then samples of as many calls as
    /// fill a sample's time. Setup and teardown that must not be timed belong in `per_run`.
    pub fn per_op(&self, mut op: impl FnMut()) -> Figure {
        let start = Instant::now();
        let mut calls = 0u64;
        while calls < 2 || start.elapsed() < self.warmup {
            op();
            calls += 1;
        }
        let per_call = start.elapsed().as_secs_f64() / calls as f64;
        let batch = ((self.sample.as_secs_f64() / per_call.max(1e-9)) as u64).clamp(1, 1 << 24);
        let samples = (0..self.samples)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..batch {
                    op();
                }
                t.elapsed().as_nanos() as f64 / batch as f64
            })
            .collect();
        Figure::of(samples).expect("at least one sample")
    }

    /// Times runs that measure themselves: `run` does one sample's work and returns the
    /// time that counts and the operations it covered (setup outside that time is not
    /// counted). One warm-up run, then `samples` runs.
    pub fn per_run<E>(&self, mut run: impl FnMut() -> Result<(Duration, u64), E>) -> Result<Figure, E> {
        let start = Instant::now();
        run()?;
        while start.elapsed() < self.warmup {
            run()?;
        }
        let mut samples = Vec::with_capacity(self.samples);
        for _ in 0..self.samples {
            let (time, ops) = run()?;
            samples.push(time.as_nanos() as f64 / ops.max(1) as f64);
        }
        Ok(Figure::of(samples).expect("at least one sample"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_spread() {
        let f = Figure::of(vec![5.0, 1.0, 3.0]).unwrap();
        assert_eq!((f.median_ns, f.min_ns, f.max_ns, f.samples), (3.0, 1.0, 5.0, 3));
        assert_eq!(Figure::of(vec![4.0, 2.0]).unwrap().median_ns, 3.0);
        assert_eq!(Figure::of(vec![f64::NAN]), None);
    }

    #[test]
    fn ratios_read_as_faster_or_slower() {
        assert_eq!(ratio_text(2.34), "2.3x faster");
        assert_eq!(ratio_text(1.0 / 4.1), "4.1x slower");
        assert_eq!(ratio_text(1.01), "same");
        assert_eq!(ratio_text(1.0 / 260.0), "260x slower");
        assert_eq!(ratio_text(0.0), "-");
    }
}
