//! Seeded random draws for the simulator: one `fastrand` generator per stream, and the few
//! distributions the workload needs. Nothing here reads the clock or the OS, so a seed
//! replays the same run.

#[derive(Debug, Clone)]
pub struct Rng(fastrand::Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    /// A generator for one purpose, so adding draws to one stream leaves the others alone.
    pub fn fork(&mut self, salt: u64) -> Self {
        Self::new(self.0.u64(..) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        self.0.f64()
    }

    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    pub fn usize(&mut self, n: usize) -> usize {
        self.0.usize(..n)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        self.0.shuffle(v);
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.f64();
        let v = self.f64();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Log-normal with the given median and shape (sigma of the underlying normal).
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    /// Exponential with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.f64()).ln()
    }

    /// Poisson count with mean `lambda`: exact (Knuth) below 30, normal approximation above.
    pub fn poisson(&mut self, lambda: f64) -> u64 {
        if lambda <= 0.0 {
            return 0;
        }
        if lambda < 30.0 {
            let limit = (-lambda).exp();
            let (mut k, mut p) = (0u64, 1.0);
            loop {
                p *= self.f64();
                if p <= limit {
                    return k;
                }
                k += 1;
            }
        }
        (lambda + lambda.sqrt() * self.normal()).round().max(0.0) as u64
    }

    /// Rounds `x` up or down at random so that the mean is `x` (fluid quantities to counts).
    pub fn round(&mut self, x: f64) -> u64 {
        let f = x.floor();
        f as u64 + u64::from(self.f64() < x - f)
    }
}

/// Zipf weights for ranks 1..=n with exponent `s`, summing to 1.
pub fn zipf(n: usize, s: f64) -> Vec<f64> {
    let w: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|x| x / sum).collect()
}

/// The `p` quantile (0..=1) of `v` by nearest rank; NaN for an empty slice.
pub fn quantile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_have_the_moments_they_claim() {
        let mut r = Rng::new(7);
        let n = 200_000;
        let mean = |f: &mut dyn FnMut() -> f64| (0..n).map(|_| f()).sum::<f64>() / n as f64;
        assert!((mean(&mut || r.poisson(4.0) as f64) - 4.0).abs() < 0.05);
        assert!((mean(&mut || r.poisson(100.0) as f64) - 100.0).abs() < 0.3);
        assert!((mean(&mut || r.exp(3.0)) - 3.0).abs() < 0.05);
        assert!((mean(&mut || r.round(2.25) as f64) - 2.25).abs() < 0.01);
        let mut ln: Vec<f64> = (0..n).map(|_| r.lognormal(1.0, 0.94)).collect();
        // p10 of a log-normal with median 1 and sigma 0.94 is exp(-1.2816 x 0.94) = 0.30.
        assert!((quantile(&mut ln, 0.10) - 0.30).abs() < 0.01);
        assert!((quantile(&mut ln, 0.5) - 1.0).abs() < 0.02);
        let z = zipf(200, 1.0);
        assert!((z.iter().sum::<f64>() - 1.0).abs() < 1e-9 && z[0] > z[1] && (z[0] / z[1] - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_seed_replays_and_forks_are_independent() {
        let (mut a, mut b) = (Rng::new(1), Rng::new(1));
        assert_eq!((0..10).map(|_| a.usize(1000)).collect::<Vec<_>>(), (0..10).map(|_| b.usize(1000)).collect::<Vec<_>>());
        let (mut fa, mut fb) = (a.fork(1), a.fork(2));
        assert_ne!(fa.usize(1 << 30), fb.usize(1 << 30));
    }
}
