//! The toy sources of the VECVQ experiments, each with exact moments and density.

use std::f64::consts::{E, PI};
use std::fmt;
use std::str::FromStr;

use qcl_tensor::{Error, Result, SeededRng};
use rand::Rng;
use rand_distr::{Open01, StandardNormal};

/// A seeded toy source of `d`-dimensional vectors (`d` = 1 or 2).
///
/// | source | definition | dim | total variance | `h` (bits) |
/// |---|---|---|---|---|
/// | [`Gaussian`](Source::Gaussian) | `N(0, I₂)` | 2 | 2 | `log₂(2πe)` = 4.094 |
/// | [`Laplace`](Source::Laplace) | `Laplace(0, 1)` | 1 | 2 | `log₂(2e)` = 2.443 |
/// | [`Banana`](Source::Banana) | the banana of the *Nonlinear Transform Coding* paper | 2 | 10.87 | `log₂(2πe·1.5)` = 4.679 |
/// | [`BananaVecvq`](Source::BananaVecvq) | the banana of the PyTorch VECVQ port | 2 | 10.87 | 4.679 |
///
/// Both bananas start from `z₀ ~ N(0, 3²)`, `z₁ ~ N(0, 0.5²)` and apply volume-preserving
/// maps (a shear, a rotation, a shift), so their density is the base density at the
/// inverted point and their differential entropy is the base's:
///
/// - **`Banana`** (Ballé et al. 2021): `u = (z₀, z₁ − 0.1·z₀²)`, `v = R(120°)·u`,
///   `x = v − (1, 1)`. Mean `(−0.221, −0.550)`.
/// - **`BananaVecvq`**: `y = (z₀, z₁ + 0.1·(z₀² − 9))`, `x = R(−40°)·y + (−0.75, −1.0)`.
///   Mean `(−0.75, −1.0)`.
///
/// `R(φ) = [[cos φ, −sin φ], [sin φ, cos φ]]` acts on column vectors.
///
/// ```
/// use qcl_ecvq::Source;
/// use qcl_tensor::Seed;
/// let source: Source = "banana".parse()?;
/// let x = source.sample(1000, &mut Seed::new(0).rng());
/// assert_eq!(x.len(), 1000 * source.dim());
/// assert!((source.total_variance() - 10.87).abs() < 1e-12);
/// assert!(source.log_density(&[-0.2, -0.5]).is_finite());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Source {
    /// The 2-D standard normal `N(0, I₂)`.
    Gaussian,
    /// The 1-D Laplace distribution with location 0 and scale 1.
    Laplace,
    /// The banana of `tensorflow/compression` and the paper's figures (the default).
    #[default]
    Banana,
    /// The banana of the PyTorch VECVQ port (a different rotation, shear centring and shift).
    BananaVecvq,
}

/// Standard deviations of the bananas' base Gaussian.
const BANANA_STD: [f64; 2] = [3.0, 0.5];
/// Shear coefficient of both bananas.
const BANANA_CURVATURE: f64 = 0.1;
/// Rotation of the TF banana (degrees) and its shift `x = v − (1, 1)`.
const BANANA_ROTATION_DEG: f64 = 120.0;
const BANANA_SHIFT: [f64; 2] = [-1.0, -1.0];
/// Rotation and shift of the PyTorch banana.
const BANANA_VECVQ_ROTATION_DEG: f64 = -40.0;
const BANANA_VECVQ_SHIFT: [f64; 2] = [-0.75, -1.0];

impl Source {
    /// Every source, in a fixed order.
    pub const ALL: [Source; 4] = [
        Source::Gaussian,
        Source::Laplace,
        Source::Banana,
        Source::BananaVecvq,
    ];

    /// The name used on the command line: `gaussian`, `laplace`, `banana`, `banana-vecvq`.
    pub fn name(self) -> &'static str {
        match self {
            Source::Gaussian => "gaussian",
            Source::Laplace => "laplace",
            Source::Banana => "banana",
            Source::BananaVecvq => "banana-vecvq",
        }
    }

    /// Dimension of one vector.
    pub fn dim(self) -> usize {
        match self {
            Source::Laplace => 1,
            _ => 2,
        }
    }

    /// `n` draws, row-major `[n, dim]`.
    pub fn sample(self, n: usize, rng: &mut SeededRng) -> Vec<f32> {
        let mut out = vec![0f32; n * self.dim()];
        self.sample_into(&mut out, rng);
        out
    }

    /// Fills `out` (a whole number of rows) with draws; a trailing partial row is left as is.
    pub fn sample_into(self, out: &mut [f32], rng: &mut SeededRng) {
        let dim = self.dim();
        for row in out.chunks_exact_mut(dim) {
            match self {
                Source::Gaussian => {
                    row[0] = rng.sample::<f64, _>(StandardNormal) as f32;
                    row[1] = rng.sample::<f64, _>(StandardNormal) as f32;
                }
                Source::Laplace => {
                    // Inverse CDF on the open interval, so that the logarithm stays finite.
                    let u: f64 = rng.sample::<f64, _>(Open01) - 0.5;
                    row[0] = (-u.signum() * (1.0 - 2.0 * u.abs()).ln()) as f32;
                }
                Source::Banana | Source::BananaVecvq => {
                    let z0 = BANANA_STD[0] * rng.sample::<f64, _>(StandardNormal);
                    let z1 = BANANA_STD[1] * rng.sample::<f64, _>(StandardNormal);
                    let x = self.banana_forward([z0, z1]);
                    row[0] = x[0] as f32;
                    row[1] = x[1] as f32;
                }
            }
        }
    }

    /// The banana map from the base point `z` to `x`.
    fn banana_forward(self, z: [f64; 2]) -> [f64; 2] {
        match self {
            Source::BananaVecvq => {
                let y = [
                    z[0],
                    z[1] + BANANA_CURVATURE * (z[0] * z[0] - BANANA_STD[0] * BANANA_STD[0]),
                ];
                let r = rotate(y, BANANA_VECVQ_ROTATION_DEG);
                [r[0] + BANANA_VECVQ_SHIFT[0], r[1] + BANANA_VECVQ_SHIFT[1]]
            }
            _ => {
                let u = [z[0], z[1] - BANANA_CURVATURE * z[0] * z[0]];
                let v = rotate(u, BANANA_ROTATION_DEG);
                [v[0] + BANANA_SHIFT[0], v[1] + BANANA_SHIFT[1]]
            }
        }
    }

    /// The inverse banana map, `x ↦ z`.
    fn banana_inverse(self, x: [f64; 2]) -> [f64; 2] {
        match self {
            Source::BananaVecvq => {
                let r = [x[0] - BANANA_VECVQ_SHIFT[0], x[1] - BANANA_VECVQ_SHIFT[1]];
                let y = rotate(r, -BANANA_VECVQ_ROTATION_DEG);
                [
                    y[0],
                    y[1] - BANANA_CURVATURE * (y[0] * y[0] - BANANA_STD[0] * BANANA_STD[0]),
                ]
            }
            _ => {
                let v = [x[0] - BANANA_SHIFT[0], x[1] - BANANA_SHIFT[1]];
                let u = rotate(v, -BANANA_ROTATION_DEG);
                [u[0], u[1] + BANANA_CURVATURE * u[0] * u[0]]
            }
        }
    }

    /// Natural log of the density at `x` (`dim` coordinates).
    ///
    /// # Panics
    /// Never; a slice shorter than `dim` reads missing coordinates as 0.
    pub fn log_density(self, x: &[f64]) -> f64 {
        let at = |i: usize| x.get(i).copied().unwrap_or(0.0);
        match self {
            Source::Gaussian => log_normal(at(0), 1.0) + log_normal(at(1), 1.0),
            Source::Laplace => -(2f64).ln() - at(0).abs(),
            Source::Banana | Source::BananaVecvq => {
                let z = self.banana_inverse([at(0), at(1)]);
                log_normal(z[0], BANANA_STD[0]) + log_normal(z[1], BANANA_STD[1])
            }
        }
    }

    /// Exact mean.
    pub fn mean(self) -> Vec<f64> {
        match self {
            Source::Gaussian => vec![0.0, 0.0],
            Source::Laplace => vec![0.0],
            // E[u] = (0, −0.1·9): rotate and shift it.
            Source::Banana => {
                let v = rotate(
                    [0.0, -BANANA_CURVATURE * BANANA_STD[0] * BANANA_STD[0]],
                    BANANA_ROTATION_DEG,
                );
                vec![v[0] + BANANA_SHIFT[0], v[1] + BANANA_SHIFT[1]]
            }
            Source::BananaVecvq => BANANA_VECVQ_SHIFT.to_vec(),
        }
    }

    /// Exact covariance, row-major `[dim, dim]`.
    pub fn covariance(self) -> Vec<f64> {
        match self {
            Source::Gaussian => vec![1.0, 0.0, 0.0, 1.0],
            Source::Laplace => vec![2.0],
            Source::Banana | Source::BananaVecvq => {
                // The sheared coordinates are uncorrelated (E[z₀³] = 0), with variances
                // 9 and 0.25 + 0.01·Var(z₀²) = 0.25 + 0.01·2·81; the rotation turns them.
                let s0 = BANANA_STD[0] * BANANA_STD[0];
                let var = [
                    s0,
                    BANANA_STD[1] * BANANA_STD[1] + BANANA_CURVATURE.powi(2) * 2.0 * s0 * s0,
                ];
                let degrees = if self == Source::Banana {
                    BANANA_ROTATION_DEG
                } else {
                    BANANA_VECVQ_ROTATION_DEG
                };
                let (s, c) = degrees.to_radians().sin_cos();
                vec![
                    c * c * var[0] + s * s * var[1],
                    c * s * (var[0] - var[1]),
                    c * s * (var[0] - var[1]),
                    s * s * var[0] + c * c * var[1],
                ]
            }
        }
    }

    /// Total variance `E‖X − EX‖²`: the distortion (squared error summed over dimensions) of
    /// the single code at the mean, i.e. at rate 0.
    pub fn total_variance(self) -> f64 {
        let cov = self.covariance();
        let d = self.dim();
        (0..d).map(|i| cov[i * d + i]).sum()
    }

    /// Differential entropy in bits per vector.
    pub fn differential_entropy_bits(self) -> f64 {
        match self {
            Source::Gaussian => (2.0 * PI * E).log2(),
            Source::Laplace => (2.0 * E).log2(),
            Source::Banana | Source::BananaVecvq => {
                (2.0 * PI * E * BANANA_STD[0] * BANANA_STD[1]).log2()
            }
        }
    }

    /// The rate-distortion reference curve at `rate_bits` (bits per vector), as squared error
    /// summed over dimensions: Shannon's `D(R) = 2·2^(−R)` for the Gaussian (exact); the
    /// Shannon lower bound `d·2^(2(h − R)/d)/(2πe)` for the others (a bound that is tight at
    /// high rate; `3·2^(−R)` for the bananas).
    pub fn distortion_bound(self, rate_bits: f64) -> f64 {
        let d = self.dim() as f64;
        let h = self.differential_entropy_bits();
        d * (2f64).powf(2.0 * (h - rate_bits) / d) / (2.0 * PI * E)
    }

    /// What [`distortion_bound`](Source::distortion_bound) is: `"D(R)"` or `"SLB"`.
    pub fn bound_name(self) -> &'static str {
        match self {
            Source::Gaussian => "D(R)",
            _ => "SLB",
        }
    }

    /// A window `[(x_min, x_max), (y_min, y_max)]` holding nearly all of the mass, for plots
    /// (1-D sources use only the first range).
    pub fn plot_window(self) -> [(f64, f64); 2] {
        match self {
            Source::Gaussian => [(-4.0, 4.0), (-4.0, 4.0)],
            Source::Laplace => [(-8.0, 8.0), (0.0, 0.0)],
            Source::Banana => [(-5.0, 5.0), (-5.0, 5.0)],
            Source::BananaVecvq => [(-5.0, 7.0), (-5.0, 7.0)],
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Source {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Source::ALL
            .into_iter()
            .find(|source| source.name() == s)
            .ok_or_else(|| {
                Error::invalid_parameter(
                    "source",
                    format!(
                        "unknown source `{s}`; expected gaussian, laplace, banana or banana-vecvq"
                    ),
                )
            })
    }
}

/// `R(degrees)·p` for a column vector `p`.
fn rotate(p: [f64; 2], degrees: f64) -> [f64; 2] {
    let (s, c) = degrees.to_radians().sin_cos();
    [c * p[0] - s * p[1], s * p[0] + c * p[1]]
}

/// `ln N(x; 0, σ²)`.
fn log_normal(x: f64, sigma: f64) -> f64 {
    -0.5 * (x / sigma).powi(2) - sigma.ln() - 0.5 * (2.0 * PI).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banana_maps_invert_each_other() {
        for source in [Source::Banana, Source::BananaVecvq] {
            for z in [[0.0, 0.0], [2.5, -0.3], [-4.0, 1.2]] {
                let back = source.banana_inverse(source.banana_forward(z));
                assert!((back[0] - z[0]).abs() < 1e-12 && (back[1] - z[1]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn exact_moments_match_the_definitions() {
        let m = Source::Banana.mean();
        assert!((m[0] + 0.221).abs() < 1e-3 && (m[1] + 0.550).abs() < 1e-3);
        let c = Source::Banana.covariance();
        assert!((c[0] - 3.6525).abs() < 1e-3, "{c:?}");
        assert!((c[1] + 3.0873).abs() < 1e-3, "{c:?}");
        assert!((c[3] - 7.2175).abs() < 1e-3, "{c:?}");
        assert!((Source::Banana.differential_entropy_bits() - 4.679).abs() < 1e-3);
        // The banana's Shannon lower bound is 3·2^(−R); the Gaussian's bound is 2·2^(−R).
        for r in [0.0, 1.5, 6.0] {
            let slb = Source::Banana.distortion_bound(r);
            assert!((slb - 3.0 * (2f64).powf(-r)).abs() < 1e-9 * slb.max(1.0));
            let drf = Source::Gaussian.distortion_bound(r);
            assert!((drf - 2.0 * (2f64).powf(-r)).abs() < 1e-12);
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for source in Source::ALL {
            assert_eq!(source.name().parse::<Source>().unwrap(), source);
        }
        assert!(matches!(
            "bananas".parse::<Source>(),
            Err(Error::InvalidParameter { .. })
        ));
    }
}
