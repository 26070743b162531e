//! `cargo bench -p qcl-pq --bench ann`: queries per second of the PQ indexes on 2 threads, the
//! exact scalar scan against the bounded scan with every SIMD kernel this CPU runs, and the
//! cost of training and filling a flat index.
//!
//! The data set is real when it is there: GloVe 6B 50-d (`data/glove-6b-50d.safetensors`, made
//! by `cargo xtask data --dataset glove-6b-50d`; another file by `QCL_ANN_GLOVE`), its rows
//! scaled to unit length, every 400th of the 400,000 words a query (1,000), the others the
//! base, 10 sub-quantizers. Without it the bench says so and uses a seeded synthetic set shaped
//! like embeddings: 100,000 base vectors and 1,000 queries of dimension 64 from one mixture of
//! 256 anisotropic Gaussians of uneven sizes plus 5% background noise, 16 sub-quantizers.
//! Indexes are trained (with few iterations) and filled once, outside the timed closures.
//! Before timing a configuration, every bounded scan is checked to return exactly the
//! neighbours of the exact scan, so a broken kernel fails the bench.
//!
//! `cargo xtask reproduce ann` measures the same indexes against faiss on GloVe and
//! Fashion-MNIST, with recall.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use qcl_pq::index::{
    IvfPqConfig, IvfPqIndex, Kernel, Metric, PqIndex, PqIndexConfig, Refine, Scan, SearchConfig,
    VectorIndex,
};
use qcl_tensor::Seed;
use rayon::{ThreadPool, ThreadPoolBuilder};

const SYNTHETIC_DIM: usize = 64;
const SYNTHETIC_BASE: usize = 100_000;
const QUERIES: usize = 1_000;
const CLUSTERS: usize = 256;
/// Share of vectors drawn from the background N(0, 1) instead of a cluster.
const NOISE: f32 = 0.05;
const K: usize = 10;
const THREADS: usize = 2;
const NLIST: usize = 256;
const K_FACTOR: usize = 4;

/// A mixture of [`CLUSTERS`] Gaussians in [`SYNTHETIC_DIM`] dimensions: centres from N(0, 1), and a
/// standard deviation per cluster and coordinate from U(0.05, 0.5).
struct Mixture {
    centres: Vec<f32>,
    spreads: Vec<f32>,
}

impl Mixture {
    fn new(seed: Seed) -> Self {
        let mut rng = seed.rng();
        Mixture {
            centres: rng.normal_vec(CLUSTERS * SYNTHETIC_DIM, 0.0, 1.0),
            spreads: rng.uniform_vec(CLUSTERS * SYNTHETIC_DIM, 0.05, 0.5),
        }
    }

    /// `n` vectors, row-major: each is background noise with probability [`NOISE`], else a
    /// draw around cluster `⌊CLUSTERS · u²⌋` (u uniform), so low clusters are the crowded ones.
    fn sample(&self, n: usize, seed: Seed) -> Vec<f32> {
        let mut rng = seed.rng();
        let mut data = rng.normal_vec(n * SYNTHETIC_DIM, 0.0, 1.0);
        for row in data.chunks_exact_mut(SYNTHETIC_DIM) {
            if rng.uniform() < NOISE {
                continue;
            }
            let u = rng.uniform();
            let c = ((CLUSTERS as f32 * u * u) as usize).min(CLUSTERS - 1);
            let centre = &self.centres[c * SYNTHETIC_DIM..(c + 1) * SYNTHETIC_DIM];
            let spread = &self.spreads[c * SYNTHETIC_DIM..(c + 1) * SYNTHETIC_DIM];
            for ((x, &mu), &sigma) in row.iter_mut().zip(centre).zip(spread) {
                *x = mu + sigma * *x;
            }
        }
        data
    }
}

/// The vectors benched: base and queries, row-major, with their dimension and the number of
/// sub-quantizers.
struct DataSet {
    name: &'static str,
    dim: usize,
    m: usize,
    base: Vec<f32>,
    queries: Vec<f32>,
}

impl DataSet {
    fn n(&self) -> usize {
        self.base.len() / self.dim
    }
}

/// GloVe when its file is there, else the synthetic mixture.
fn data_set() -> DataSet {
    let path = std::env::var_os("QCL_ANN_GLOVE").map_or_else(
        || {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../data/glove-6b-50d.safetensors")
        },
        std::path::PathBuf::from,
    );
    match glove(&path) {
        Ok(set) => set,
        Err(reason) => {
            eprintln!("ann bench: GloVe not used ({reason}); synthetic vectors instead");
            synthetic()
        }
    }
}

/// GloVe 6B 50-d, unit rows: every 400th word a query, the others the base.
fn glove(path: &std::path::Path) -> Result<DataSet, String> {
    if !path.is_file() {
        return Err(format!("{} is missing", path.display()));
    }
    let file = qcl_tensor::SafetensorsFile::open(path).map_err(|e| e.to_string())?;
    let all: Vec<f32> = file
        .tensor("embeddings", &qcl_tensor::candle_core::Device::Cpu)
        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        .map_err(|e| e.to_string())?;
    let dim = 50;
    // Unit rows, as a cosine index compares them.
    let all = Metric::Cosine
        .prepare(&all, dim)
        .map_err(|e| e.to_string())?;
    let (mut base, mut queries) = (Vec::new(), Vec::new());
    for (i, row) in all.chunks_exact(dim).enumerate() {
        let target = if i % 400 == 0 && queries.len() < QUERIES * dim {
            &mut queries
        } else {
            &mut base
        };
        target.extend_from_slice(row);
    }
    Ok(DataSet {
        name: "glove50",
        dim,
        m: 10,
        base,
        queries,
    })
}

/// The seeded synthetic mixture.
fn synthetic() -> DataSet {
    let seed = Seed::new(2024);
    let mixture = Mixture::new(seed.child(0));
    DataSet {
        name: "synthetic64",
        dim: SYNTHETIC_DIM,
        m: 16,
        base: mixture.sample(SYNTHETIC_BASE, seed.child(1)),
        queries: mixture.sample(QUERIES, seed.child(2)),
    }
}

fn pool() -> ThreadPool {
    ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build()
        .expect("a pool of 2 threads")
}

fn flat_config(m: usize, nbits: u32) -> PqIndexConfig {
    PqIndexConfig {
        train_iterations: 10,
        ..PqIndexConfig::new(m, nbits)
    }
}

fn ivf_config(m: usize, nbits: u32) -> IvfPqConfig {
    IvfPqConfig {
        nlist: NLIST,
        coarse_iterations: 10,
        pq: flat_config(m, nbits),
        ..IvfPqConfig::new(m, nbits)
    }
}

/// Every scan to time: the exact reference, then the bounded scan with each kernel.
fn scans() -> Vec<(String, Scan)> {
    std::iter::once(("exact".to_string(), Scan::Exact))
        .chain(
            Kernel::available()
                .into_iter()
                .map(|kernel| (format!("bounded-{}", kernel.name()), Scan::Bounded(kernel))),
        )
        .collect()
}

/// Checks that every bounded scan answers exactly as the exact scan, then times each scan.
fn bench_scans(
    c: &mut Criterion,
    pool: &ThreadPool,
    name: &str,
    index: &impl VectorIndex,
    nprobe: usize,
    queries: &[f32],
) {
    let search = |scan| {
        let options = SearchConfig { k: K, nprobe, scan };
        pool.install(|| index.search_with(queries, &options))
            .expect("search")
    };
    let reference = search(Scan::Exact);
    for (label, scan) in scans().into_iter().skip(1) {
        assert_eq!(
            search(scan),
            reference,
            "{name}: {label} differs from the exact scan"
        );
    }
    let mut group = c.benchmark_group(format!("ann-search/{name}"));
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(QUERIES as u64));
    for (label, scan) in scans() {
        group.bench_function(label, |b| b.iter(|| search(scan)));
    }
    group.finish();
}

fn search(c: &mut Criterion) {
    // As the `qcl` and `xtask` binaries do.
    qcl_tensor::tune_process_for_numeric_loops();
    let set = data_set();
    let (dim, m, base, queries) = (set.dim, set.m, &set.base, &set.queries);
    let pool = pool();

    for nbits in [8, 4] {
        let index = pool.install(|| {
            let mut index = PqIndex::train(base, dim, &flat_config(m, nbits))?;
            index.add(base)?;
            Ok::<_, qcl_tensor::Error>(index)
        });
        let index = index.expect("flat index");
        let name = format!("{}/flat-m{m}x{nbits}", set.name);
        bench_scans(c, &pool, &name, &index, 1, queries);
    }

    for nbits in [8, 4] {
        let trained = pool
            .install(|| IvfPqIndex::train(base, dim, &ivf_config(m, nbits)))
            .expect("IVF-PQ training");
        let mut index = trained.clone();
        pool.install(|| index.add(base)).expect("IVF-PQ add");
        for nprobe in [4, 16] {
            let name = format!("{}/ivf{NLIST}-m{m}x{nbits}-nprobe{nprobe}", set.name);
            bench_scans(c, &pool, &name, &index, nprobe, queries);
        }
        if nbits == 8 {
            drop(index);
            let mut refine = Refine::new(trained, K_FACTOR).expect("refine");
            pool.install(|| refine.add(base)).expect("refine add");
            let name = format!("{}/refine{K_FACTOR}-ivf{NLIST}-m{m}x8-nprobe16", set.name);
            bench_scans(c, &pool, &name, &refine, 16, queries);
        }
    }
}

fn build(c: &mut Criterion) {
    let set = data_set();
    let pool = pool();
    let mut group = c.benchmark_group("ann-build");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(set.n() as u64));
    let config = flat_config(set.m, 8);
    group.bench_function(format!("{}/flat-m{}x8/train+add", set.name, set.m), |b| {
        b.iter(|| {
            pool.install(|| {
                let mut index = PqIndex::train(&set.base, set.dim, &config).expect("train");
                index.add(&set.base).expect("add");
                index
            })
        })
    });
    group.finish();
}

criterion_group!(benches, search, build);
criterion_main!(benches);
