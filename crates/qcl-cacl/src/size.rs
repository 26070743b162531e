//! Model-size accounting in MB, exactly as the reference's `mode_comp`
//! (docs/methods/cacl.md § Model size).

use qcl_tensor::{Error, Result};

/// One factored layer for the size count: its matrix shape and the final used rank `K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FactoredLayerSize {
    /// Columns `d` (`c_in·k²` for a convolution).
    pub d: usize,
    /// Rows `n_out`.
    pub n_out: usize,
    /// Components in use after the last task, `K = k_{T−1}` (free slots are not counted).
    pub used: usize,
}

/// Everything the size count needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SizeInputs {
    /// The factored layers.
    pub layers: Vec<FactoredLayerSize>,
    /// Every task head as `(in_features, out_features)`, with bias.
    pub heads: Vec<(usize, usize)>,
    /// Channels of every BatchNorm layer (none in Net_SVD).
    pub batch_norm_channels: Vec<usize>,
    /// Number of tasks `T` (one stored rank per layer per task).
    pub tasks: usize,
    /// Whether to count the task identifiers `T·L` (the current formula; the stored
    /// 5-sequence result predates them; docs/methods/cacl.md § Model size).
    pub count_task_ids: bool,
}

/// Parameter count of `mode_comp` (docs/methods/cacl.md § Model size):
/// `Σ_l (d_l + n_out,l + 1)·K_l + Σ_heads (in·out + out) + Σ_BN 4·20·channels + T·L`.
///
/// ```
/// use qcl_cacl::{parameter_count, FactoredLayerSize, SizeInputs};
/// let inputs = SizeInputs {
///     layers: vec![FactoredLayerSize { d: 9, n_out: 16, used: 3 }],
///     heads: vec![(64, 2); 5],
///     batch_norm_channels: vec![],
///     tasks: 5,
///     count_task_ids: true,
/// };
/// assert_eq!(parameter_count(&inputs), 26 * 3 + 5 * 130 + 5);
/// ```
pub fn parameter_count(inputs: &SizeInputs) -> u64 {
    let factored: u64 = inputs
        .layers
        .iter()
        .map(|l| ((l.d + l.n_out + 1) * l.used) as u64)
        .sum();
    let heads: u64 = inputs.heads.iter().map(|&(i, o)| (i * o + o) as u64).sum();
    // The reference counts BN as 4·20·channels (20 tasks of stored statistics;
    // docs/methods/cacl.md § Model size).
    let bn: u64 = inputs
        .batch_norm_channels
        .iter()
        .map(|&c| (4 * 20 * c) as u64)
        .sum();
    let ids = if inputs.count_task_ids {
        (inputs.tasks * inputs.layers.len()) as u64
    } else {
        0
    };
    factored + heads + bn + ids
}

/// `MB = 4·params / 10⁶` (float32).
///
/// ```
/// assert_eq!(qcl_cacl::megabytes(2_133_766), 8.535064);
/// ```
pub fn megabytes(params: u64) -> f64 {
    4.0 * params as f64 / 1e6
}

/// Model size in MB of [`SizeInputs`].
///
/// # Errors
/// [`Error::InvalidParameter`] for a layer with a zero dimension.
pub fn model_size_mb(inputs: &SizeInputs) -> Result<f64> {
    if let Some(bad) = inputs.layers.iter().find(|l| l.d == 0 || l.n_out == 0) {
        return Err(Error::invalid_parameter(
            "layers",
            format!("a factored layer has a zero dimension: {bad:?}"),
        ));
    }
    Ok(megabytes(parameter_count(inputs)))
}

/// Parameters of a dense convolution stack with bias, `Σ (c_in·k²·c_out + c_out)`.
///
/// ```
/// // The dense twin of Net_SVD-S.
/// let convs = [(1, 16, 3), (16, 16, 3), (16, 32, 3), (32, 32, 3), (32, 64, 2)];
/// assert_eq!(qcl_cacl::dense_conv_parameters(&convs), 24_624);
/// ```
pub fn dense_conv_parameters(convs: &[(usize, usize, usize)]) -> u64 {
    convs
        .iter()
        .map(|&(c_in, c_out, k)| (c_in * k * k * c_out + c_out) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NET_SVD: [(usize, usize); 5] = [(27, 64), (576, 64), (576, 128), (1152, 128), (512, 256)];

    fn net_svd(used: [usize; 5], head_in: usize, tasks: usize, classes: usize) -> SizeInputs {
        SizeInputs {
            layers: NET_SVD
                .iter()
                .zip(used)
                .map(|(&(d, n_out), used)| FactoredLayerSize { d, n_out, used })
                .collect(),
            heads: vec![(head_in, classes); tasks],
            batch_norm_channels: vec![],
            tasks,
            count_task_ids: true,
        }
    }

    #[test]
    fn golden_sizes_of_the_saved_runs() {
        let cases = [
            ([181, 519, 546, 597, 692], 1024, 2_133_766, 8.535064),
            ([100, 234, 125, 171, 105], 1024, 649_715, 2.598860),
            ([138, 422, 420, 413, 665], 16384, 3_258_336, 13.033344),
            ([66, 135, 86, 63, 151], 16384, 1_988_659, 7.954636),
        ];
        for (used, head_in, params, mb) in cases {
            let inputs = net_svd(used, head_in, 20, 5);
            assert_eq!(parameter_count(&inputs), params);
            assert!((model_size_mb(&inputs).unwrap() - mb).abs() < 1e-9);
        }
        // 5-sequence: 5 heads of 10 classes, with and without the task identifiers
        // (docs/methods/cacl.md § Model size).
        let mut five = net_svd([42, 70, 46, 99, 147], 1024, 5, 10);
        assert!((model_size_mb(&five).unwrap() - 1.489204).abs() < 1e-9);
        five.count_task_ids = false;
        assert!((model_size_mb(&five).unwrap() - 1.489104).abs() < 1e-9);
    }

    #[test]
    fn dense_references() {
        let net = [
            (3, 64, 3),
            (64, 64, 3),
            (64, 128, 3),
            (128, 128, 3),
            (128, 256, 2),
        ];
        assert_eq!(dense_conv_parameters(&net), 391_488);
        let cifar = 20 * (391_488 + 5_125);
        assert!((megabytes(cifar) - 31.72904).abs() < 1e-9);
        let small = [
            (1, 16, 3),
            (16, 16, 3),
            (16, 32, 3),
            (32, 32, 3),
            (32, 64, 2),
        ];
        assert_eq!(5 * (dense_conv_parameters(&small) + 130), 123_770);
        assert!((megabytes(123_770) - 0.49508).abs() < 1e-12);
        let bad = SizeInputs {
            layers: vec![FactoredLayerSize {
                d: 0,
                n_out: 3,
                used: 1,
            }],
            ..Default::default()
        };
        assert!(model_size_mb(&bad).is_err());
    }

    proptest! {
        #[test]
        fn size_is_affine_and_increasing_in_every_rank(
            used in proptest::array::uniform5(0usize..500),
            layer in 0usize..5,
            extra in 1usize..50,
        ) {
            let base = net_svd(used, 1024, 20, 5);
            let mut more = base.clone();
            more.layers[layer].used += extra;
            let (d, n_out) = NET_SVD[layer];
            prop_assert_eq!(
                parameter_count(&more) - parameter_count(&base),
                ((d + n_out + 1) * extra) as u64
            );
            prop_assert!(model_size_mb(&more).unwrap() > model_size_mb(&base).unwrap());
        }
    }
}
