//! How close one set of embeddings is to another: cosine similarity row by row, and whether
//! the nearest neighbours of a set of queries stay the same ("retrieval agreement").

use candle_core::{DType, Tensor};
use qcl_tensor::{check_finite, Error, Result};

use crate::pooling::l2_normalize;

/// Queries per GEMM in [`nearest_neighbours`]: bounds the similarity block to
/// `256 × rows` floats.
const QUERY_BLOCK: usize = 256;

fn matrix(name: &str, x: &Tensor) -> Result<(usize, usize)> {
    let dims = x.dims();
    if dims.len() != 2 || x.dtype() != DType::F32 {
        return Err(Error::ShapeMismatch {
            context: format!("{name} (an f32 matrix, got {:?})", x.dtype()),
            expected: "[n, dim]".into(),
            actual: dims.to_vec(),
        });
    }
    check_finite(name, x)?;
    Ok((dims[0], dims[1]))
}

/// Cosine similarity of row `i` of `a` with row `i` of `b`, for every row, computed in `f64`:
/// `a_i·b_i / (‖a_i‖·‖b_i‖)`, and 0 where either row is zero.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let a = Tensor::new(&[[1f32, 0.0], [0.0, 2.0]], &Device::Cpu)?;
/// let b = Tensor::new(&[[2f32, 0.0], [0.0, -1.0]], &Device::Cpu)?;
/// assert_eq!(qcl_text::row_cosines(&a, &b)?, [1.0, -1.0]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] unless both are `f32` matrices of one shape;
/// [`Error::NonFinite`].
pub fn row_cosines(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let shape = matrix("a", a)?;
    if matrix("b", b)? != shape {
        return Err(Error::ShapeMismatch {
            context: "b (the shape of a)".into(),
            expected: format!("{:?}", [shape.0, shape.1]),
            actual: b.dims().to_vec(),
        });
    }
    let (a, b) = (a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let (mut dot, mut xx, mut yy) = (0f64, 0f64, 0f64);
            for (&p, &q) in x.iter().zip(y) {
                let (p, q) = (f64::from(p), f64::from(q));
                dot += p * q;
                xx += p * p;
                yy += q * q;
            }
            if xx == 0.0 || yy == 0.0 {
                0.0
            } else {
                dot / (xx.sqrt() * yy.sqrt())
            }
        })
        .collect())
}

/// The `q`-th percentile (`q` in `[0, 100]`) with linear interpolation between order
/// statistics, as NumPy's default: position `q/100·(n−1)` in the sorted values.
///
/// ```
/// assert_eq!(qcl_text::percentile(&[4.0, 1.0, 3.0, 2.0], 50.0)?, 2.5);
/// assert_eq!(qcl_text::percentile(&[4.0, 1.0, 3.0, 2.0], 0.0)?, 1.0);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::EmptyInput`] for no values; [`Error::InvalidParameter`] for `q` outside
/// `[0, 100]`; [`Error::NonFinite`] for a NaN or infinite value.
pub fn percentile(values: &[f64], q: f64) -> Result<f64> {
    if values.is_empty() {
        return Err(Error::EmptyInput("percentile of no values".into()));
    }
    if !(0.0..=100.0).contains(&q) {
        return Err(Error::invalid_parameter(
            "q",
            format!("{q} is outside [0, 100]"),
        ));
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            context: "percentile values".into(),
            index,
            value: values[index],
        });
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let position = q / 100.0 * (sorted.len() - 1) as f64;
    let low = position.floor() as usize;
    let high = position.ceil() as usize;
    let t = position - low as f64;
    Ok(sorted[low] + (sorted[high] - sorted[low]) * t)
}

/// Mean, 1st percentile and minimum of [`row_cosines`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSummary {
    /// Rows compared.
    pub rows: usize,
    /// Mean cosine.
    pub mean: f64,
    /// 1st percentile ([`percentile`] at 1).
    pub p1: f64,
    /// Smallest cosine.
    pub min: f64,
}

/// [`CosineSummary`] of the rows of `a` against those of `b`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let a = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu)?;
/// let s = qcl_text::cosine_summary(&a, &a)?;
/// assert!((s.mean - 1.0).abs() < 1e-12 && s.rows == 2);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// As [`row_cosines`]; [`Error::EmptyInput`] for matrices without rows.
pub fn cosine_summary(a: &Tensor, b: &Tensor) -> Result<CosineSummary> {
    let cos = row_cosines(a, b)?;
    let p1 = percentile(&cos, 1.0)?;
    Ok(CosineSummary {
        rows: cos.len(),
        mean: cos.iter().sum::<f64>() / cos.len() as f64,
        p1,
        min: cos.iter().copied().fold(f64::INFINITY, f64::min),
    })
}

/// For each query row, the `k` other rows of `embeddings` with the highest cosine similarity,
/// best first (ties: lower index first). Rows are L2-normalised, then the similarities of a
/// block of queries with every row are one matrix product; the query itself is excluded.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let e = Tensor::new(&[[1f32, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]], &Device::Cpu)?;
/// assert_eq!(qcl_text::nearest_neighbours(&e, &[0, 2], 2)?, [vec![1, 2], vec![1, 0]]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] unless `embeddings` is an `f32` matrix; [`Error::NonFinite`];
/// [`Error::InvalidParameter`] for `k` of 0 or above `rows − 1`, or a query out of range.
pub fn nearest_neighbours(
    embeddings: &Tensor,
    queries: &[usize],
    k: usize,
) -> Result<Vec<Vec<usize>>> {
    let (rows, _) = matrix("embeddings", embeddings)?;
    if k == 0 || k >= rows {
        return Err(Error::invalid_parameter(
            "k",
            format!("must be in 1..={} for {rows} rows", rows.saturating_sub(1)),
        ));
    }
    if let Some(&q) = queries.iter().find(|&&q| q >= rows) {
        return Err(Error::invalid_parameter(
            "queries",
            format!("row {q} is out of range for {rows} rows"),
        ));
    }
    let unit = l2_normalize(embeddings)?;
    let unit_t = unit.t()?;
    let mut out = Vec::with_capacity(queries.len());
    for block in queries.chunks(QUERY_BLOCK) {
        let ids: Vec<u32> = block.iter().map(|&q| q as u32).collect();
        let ids = Tensor::from_vec(ids, block.len(), unit.device())?;
        let sims = unit
            .index_select(&ids, 0)?
            .matmul(&unit_t)?
            .to_vec2::<f32>()?;
        for (&q, row) in block.iter().zip(&sims) {
            out.push(top_k_excluding(row, q, k));
        }
    }
    Ok(out)
}

/// Indices of the `k` largest values of `row` other than `skip`, largest first, ties by index.
fn top_k_excluding(row: &[f32], skip: usize, k: usize) -> Vec<usize> {
    let better = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    let mut candidates: Vec<usize> = (0..row.len()).filter(|&i| i != skip).collect();
    candidates.select_nth_unstable_by(k - 1, better);
    candidates.truncate(k);
    candidates.sort_unstable_by(better);
    candidates
}

/// Overlap of the top-`k` neighbour sets of the same queries under two embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalAgreement {
    /// Neighbours compared per query.
    pub k: usize,
    /// Mean over the queries of `|N_ref ∩ N_other| / k`.
    pub mean: f64,
    /// That fraction for each query, in query order.
    pub per_query: Vec<f64>,
}

/// Retrieval agreement: for each query row, the fraction of its `k` nearest neighbours (by
/// cosine, itself excluded; [`nearest_neighbours`]) under `reference` that are also among its
/// `k` nearest under `other`, and their mean.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let e = Tensor::new(&[[1f32, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]], &Device::Cpu)?;
/// let agreement = qcl_text::retrieval_agreement(&e, &(&e * 3.0)?, &[0, 1, 2, 3], 2)?;
/// assert_eq!(agreement.mean, 1.0); // cosine ignores the scale
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] when the two do not have the same number of rows; as
/// [`nearest_neighbours`]; [`Error::EmptyInput`] for no queries.
pub fn retrieval_agreement(
    reference: &Tensor,
    other: &Tensor,
    queries: &[usize],
    k: usize,
) -> Result<RetrievalAgreement> {
    if queries.is_empty() {
        return Err(Error::EmptyInput(
            "retrieval agreement of no queries".into(),
        ));
    }
    let rows = reference.dims().first().copied().unwrap_or(0);
    if other.dims().first() != Some(&rows) {
        return Err(Error::ShapeMismatch {
            context: "other (the rows of reference)".into(),
            expected: format!("[{rows}, *]"),
            actual: other.dims().to_vec(),
        });
    }
    let a = nearest_neighbours(reference, queries, k)?;
    let b = nearest_neighbours(other, queries, k)?;
    let per_query: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.iter().filter(|i| y.contains(i)).count() as f64 / k as f64)
        .collect();
    Ok(RetrievalAgreement {
        k,
        mean: per_query.iter().sum::<f64>() / per_query.len() as f64,
        per_query,
    })
}
