//! The index families measured, each built on our side and faiss's with the same knobs.

use std::time::Instant;

use anyhow::Result;
use qcl_pq::index::opq::OpqConfig;
use qcl_pq::index::{
    AnyIndex, IvfPqConfig, IvfPqIndex, Neighbors, PqIndex, PqIndexConfig, Refine, Rotated, Scan,
    SearchConfig, VectorIndex,
};
use serde_json::{json, Value};

use super::data::{AnnData, K};

/// Inverted lists of the IVF families (as the faiss figures).
pub const NLIST: usize = 1024;

/// What is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Flat PQ, 8-bit codes.
    Pq8,
    /// Flat PQ, 4-bit codes (faiss: `IndexPQFastScan`).
    Pq4,
    /// OPQ rotation, IVF with `NLIST` lists, 8-bit residual codes; re-ranking as a knob.
    OpqIvfPq8,
    /// IVF with `NLIST` lists, 4-bit residual codes (faiss: `IndexIVFPQFastScan`).
    IvfPq4,
}

/// One family: its name, our knobs to sweep, faiss's config.
pub struct Family {
    pub kind: Kind,
    pub name: &'static str,
    /// `(nprobe, refine k_factor)` settings; `(0, 0)` for flat indexes.
    pub settings: Vec<(usize, usize)>,
}

/// The families measured, with the sweep of the mode.
pub fn families(quick: bool) -> Vec<Family> {
    let nprobes: Vec<usize> = if quick {
        vec![1, 4, 16, 64]
    } else {
        vec![1, 2, 4, 8, 16, 32, 64]
    };
    let refines: Vec<usize> = if quick {
        vec![0, 4]
    } else {
        vec![0, 2, 4, 8, 16]
    };
    let grid = |refines: &[usize]| -> Vec<(usize, usize)> {
        nprobes
            .iter()
            .flat_map(|&p| refines.iter().map(move |&r| (p, r)))
            .collect()
    };
    vec![
        Family {
            kind: Kind::Pq8,
            name: "PQ, 8-bit",
            settings: vec![(0, 0)],
        },
        Family {
            kind: Kind::Pq4,
            name: "PQ, 4-bit (fast scan)",
            settings: vec![(0, 0)],
        },
        Family {
            kind: Kind::OpqIvfPq8,
            name: "OPQ + IVF1024 + PQ 8-bit (+ re-rank)",
            settings: grid(&refines),
        },
        Family {
            kind: Kind::IvfPq4,
            name: "IVF1024 + PQ 4-bit (fast scan)",
            settings: grid(&[0]),
        },
    ]
}

/// OPQ alternations (faiss's default 50; fewer in quick mode, on both sides).
pub fn opq_iterations(quick: bool) -> usize {
    if quick {
        10
    } else {
        OpqConfig::new(1, 8).iterations
    }
}

/// faiss's description of the same index.
pub fn faiss_config(family: &Family, data: &AnnData, quick: bool) -> Value {
    let m = data.m;
    let nprobe: Vec<usize> = family.settings.iter().map(|s| s.0).collect();
    let refine: Vec<usize> = family.settings.iter().map(|s| s.1).collect();
    match family.kind {
        Kind::Pq8 => json!({"kind": "pq", "m": m, "nbits": 8}),
        Kind::Pq4 => json!({"kind": "pq_fastscan", "m": m}),
        Kind::OpqIvfPq8 => json!({
            "kind": "ivf_pq", "nlist": NLIST, "m": m, "nbits": 8, "opq": true,
            "opq_iterations": opq_iterations(quick), "nprobe": nprobe, "refine": refine,
        }),
        Kind::IvfPq4 => json!({
            "kind": "ivf_pq_fastscan", "nlist": NLIST, "m": m, "by_residual": true,
            "nprobe": nprobe,
        }),
    }
}

/// Our index of the family, built (trained and filled) over the base; seconds of training
/// and of adding.
pub fn build(family: &Family, data: &AnnData, quick: bool) -> Result<(AnyIndex, f64, f64)> {
    let (dim, m, metric) = (data.dim, data.m, data.metric);
    let pq = |nbits| PqIndexConfig {
        metric,
        ..PqIndexConfig::new(m, nbits)
    };
    let ivf = |nbits| IvfPqConfig {
        nlist: NLIST,
        pq: pq(nbits),
        ..IvfPqConfig::new(m, nbits)
    };
    let start = Instant::now();
    let mut index = match family.kind {
        Kind::Pq8 => AnyIndex::Pq(PqIndex::train(&data.base, dim, &pq(8))?),
        Kind::Pq4 => AnyIndex::Pq(PqIndex::train(&data.base, dim, &pq(4))?),
        Kind::IvfPq4 => AnyIndex::IvfPq(IvfPqIndex::train(&data.base, dim, &ivf(4))?),
        Kind::OpqIvfPq8 => {
            // The rotation is learned on the vectors the index compares (unit rows for cosine).
            let unit = metric.prepare(&data.base, dim)?;
            let opq = OpqConfig {
                iterations: opq_iterations(quick),
                ..OpqConfig::new(m, 8)
            };
            let rotation = Rotated::<AnyIndex>::learn_rotation(&unit, dim, &opq)?;
            let inner = IvfPqIndex::train(&rotation.apply(&unit)?, dim, &ivf(8))?;
            let rotated = Rotated::new(rotation, AnyIndex::IvfPq(inner))?;
            AnyIndex::Refine(Box::new(Refine::new(
                AnyIndex::Rotated(Box::new(rotated)),
                1,
            )?))
        }
    };
    let train = start.elapsed().as_secs_f64();
    let start = Instant::now();
    index.add(&data.base)?;
    Ok((index, train, start.elapsed().as_secs_f64()))
}

/// One timed search of every query with `(nprobe, refine)`; `exact` scans with the scalar
/// reference instead of the SIMD bounds.
pub fn search(
    index: &mut AnyIndex,
    data: &AnnData,
    (nprobe, refine): (usize, usize),
    exact: bool,
) -> Result<(f64, Neighbors)> {
    let options = SearchConfig {
        k: K,
        nprobe: nprobe.max(1),
        scan: if exact { Scan::Exact } else { Scan::default() },
    };
    if let AnyIndex::Refine(r) = &mut *index {
        if refine > 0 {
            r.set_k_factor(refine)?;
        }
    }
    let searcher: &AnyIndex = match &*index {
        AnyIndex::Refine(r) if refine == 0 => r.inner(),
        other => other,
    };
    let start = Instant::now();
    let found = qcl_tensor::on_threads(2, || searcher.search_with(&data.queries, &options))??;
    Ok((start.elapsed().as_secs_f64(), found))
}

/// faiss's knobs for a setting.
pub fn faiss_knobs((nprobe, refine): (usize, usize)) -> Value {
    json!({"nprobe": nprobe.max(1), "refine": refine})
}
