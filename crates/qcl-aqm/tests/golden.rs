//! A golden test of the default configuration: each method of docs/methods/aqm.md
//! § Fashion-MNIST experiment runs a short seeded stream of the committed fixture with every
//! option at its default (reference insertion and eviction, no re-encoding, raw classifier
//! input, the small CNN), and its key figures must equal the values below bit for bit.
//!
//! The values were captured at commit b7ef146 from this reference configuration (the author
//! checked that the code before b7ef146 gives the same bit for bit). A change to them means
//! the defaults no longer give the earlier results: only a deliberate change of the method may
//! update them, and it must say so.

mod common;

use common::{scenario, small, TIGHT};
use qcl_aqm::online::{run, Method};
use qcl_aqm::RunResult;

/// `(step, samples per block, used bits, capacity bits)` of each point of the memory curve.
type Curve = &'static [(u64, &'static [usize], u64, u64)];

/// The pinned figures of one run; floats are their bit patterns.
struct Golden {
    final_accuracy: u64,
    forgetting: Option<u64>,
    memory: Memory,
}

/// What a run's memory pins.
enum Memory {
    /// No replay memory: the steps of the curve, each point empty.
    None(&'static [u64]),
    /// Raw images only: samples stored at the end, and the curve.
    Raw(usize, Curve),
    /// AQM.
    Aqm(Aqm),
}

/// AQM's memory, module and drift. The drift measurements are the steps at which no code was
/// stored yet, then the others as `(step, mean MSE over all codes, over task 0's, codes)`.
struct Aqm {
    stored_at_end: usize,
    freeze_steps: &'static [Option<u64>],
    model_cost_params: u64,
    curve: Curve,
    drift_without_codes: &'static [u64],
    drift: &'static [(u64, u64, u64, usize)],
}

const FINE_TUNE: Golden = Golden {
    final_accuracy: 0x3fc47ae147ae147b,
    forgetting: Some(0x3fe599999999999a),
    memory: Memory::None(&[1, 3, 4, 5, 7, 8, 9, 11, 12, 13, 15, 16, 17, 19, 20]),
};

/// ER-raw's and raw-AQM's memory curve at 20 raw images of budget, full from step 3 on (the
/// same values were captured for both).
const RAW_20_CURVE: Curve = &[
    (1, &[10], 62720, 125440),
    (3, &[20], 125440, 125440),
    (4, &[20], 125440, 125440),
    (5, &[20], 125440, 125440),
    (7, &[20], 125440, 125440),
    (8, &[20], 125440, 125440),
    (9, &[20], 125440, 125440),
    (11, &[20], 125440, 125440),
    (12, &[20], 125440, 125440),
    (13, &[20], 125440, 125440),
    (15, &[20], 125440, 125440),
    (16, &[20], 125440, 125440),
    (17, &[20], 125440, 125440),
    (19, &[20], 125440, 125440),
    (20, &[20], 125440, 125440),
];

const ER_RAW: Golden = Golden {
    final_accuracy: 0x3fd7ae147ae147ae,
    forgetting: Some(0x3fd8cccccccccccc),
    memory: Memory::Raw(20, RAW_20_CURVE),
};

const RAW_AQM: Golden = Golden {
    final_accuracy: 0x3fd47ae147ae147b,
    forgetting: Some(0x3fd7333333333333),
    memory: Memory::Raw(20, RAW_20_CURVE),
};

const AQM_B50: Golden = Golden {
    final_accuracy: 0x3fd6666666666666,
    forgetting: Some(0x3fd3333333333333),
    memory: Memory::Aqm(Aqm {
        stored_at_end: 200,
        freeze_steps: &[Some(7)],
        model_cost_params: 36850,
        curve: &[
            (1, &[10, 0], 62720, 2927736),
            (3, &[30, 0], 188160, 2927736),
            (4, &[40, 0], 250880, 2927736),
            (5, &[50, 0], 313600, 2927736),
            (7, &[70, 0], 439040, 2927736),
            (8, &[60, 20], 388080, 2841200),
            (9, &[53, 37], 354172, 2841200),
            (11, &[44, 66], 314776, 2841200),
            (12, &[38, 82], 286552, 2841200),
            (13, &[34, 96], 269696, 2841200),
            (15, &[29, 121], 253036, 2841200),
            (16, &[29, 131], 258916, 2841200),
            (17, &[27, 143], 253428, 2841200),
            (19, &[23, 167], 242452, 2841200),
            (20, &[21, 179], 236964, 2841200),
        ],
        drift_without_codes: &[1, 4, 7],
        drift: &[
            (8, 0x3fd9086b8779c646, 0x3fd88a9c17d99581, 20),
            (10, 0x3fd603cd57718fe8, 0x3fd6fd790fa988be, 51),
            (12, 0x3fd4d571a3828567, 0x3fd490460add26ff, 82),
            (13, 0x3fd3b4ea077dfacd, 0x3fd38297fa156213, 96),
            (16, 0x3fd1d35f9874c7f2, 0x3fd1dd64158b53d3, 131),
            (19, 0x3fd0cccd78e736e2, 0x3fd0a1e3c316f152, 167),
            (20, 0x3fd06eaa9fad02f9, 0x3fd00f45ae0c7978, 179),
        ],
    }),
};

const AQM_TIGHT: Golden = Golden {
    final_accuracy: 0x3fc47ae147ae147b,
    forgetting: Some(0x3fd8cccccccccccd),
    memory: Memory::Aqm(Aqm {
        stored_at_end: 81,
        freeze_steps: &[Some(7)],
        model_cost_params: 36850,
        curve: &[
            (1, &[10, 0], 62720, 134536),
            (3, &[21, 0], 131712, 134536),
            (4, &[21, 0], 131712, 134536),
            (5, &[21, 0], 131712, 134536),
            (7, &[21, 0], 131712, 134536),
            (8, &[4, 13], 32732, 48000),
            (9, &[3, 24], 32928, 48000),
            (11, &[1, 46], 33320, 48000),
            (12, &[1, 56], 39200, 48000),
            (13, &[1, 66], 45080, 48000),
            (15, &[0, 81], 47628, 48000),
            (16, &[0, 81], 47628, 48000),
            (17, &[0, 81], 47628, 48000),
            (19, &[0, 81], 47628, 48000),
            (20, &[0, 81], 47628, 48000),
        ],
        drift_without_codes: &[1, 4, 7],
        drift: &[
            (8, 0x3fd8ec76b1bbd1ef, 0x3fd6a46586c97883, 13),
            (10, 0x3fd46096d71e89cf, 0x3fd63313ca6dbb51, 35),
            (12, 0x3fd3aef1feeef232, 0x3fd59222a7df05a8, 56),
            (13, 0x3fd329e9422d369d, 0x3fd53d29d8e3eba9, 66),
            (16, 0x3fd2277a222d6b3e, 0x3fd443cd3663bda9, 81),
            (19, 0x3fd21bbdcbf6e01d, 0x3fd35d5ae9682a15, 81),
            (20, 0x3fd1ae39572d11a8, 0x3fd314e43bb00ab7, 81),
        ],
    }),
};

const IID_ONLINE: Golden = Golden {
    final_accuracy: 0x3fd70a3d70a3d70a,
    forgetting: None,
    memory: Memory::None(&[
        1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
    ]),
};

/// The memory curve as `(step, samples per block, used bits, capacity bits)`.
fn curve(name: &str, r: &RunResult) -> Vec<(u64, Vec<usize>, u64, u64)> {
    let bits = |bytes: f64| {
        let b = bytes * 8.0;
        assert_eq!(b.fract(), 0.0, "{name}: whole bits");
        b as u64
    };
    r.memory_curve
        .iter()
        .map(|p| {
            (
                p.step,
                p.per_block.clone(),
                bits(p.used_bytes),
                bits(p.capacity_bytes),
            )
        })
        .collect()
}

fn owned(c: Curve) -> Vec<(u64, Vec<usize>, u64, u64)> {
    c.iter()
        .map(|&(s, b, u, k)| (s, b.to_vec(), u, k))
        .collect()
}

/// Compares `r` with `golden`, figure by figure (so that a failure names the figure).
fn check(name: &str, r: &RunResult, golden: &Golden) {
    assert_eq!(
        r.final_accuracy.to_bits(),
        golden.final_accuracy,
        "{name}: final accuracy"
    );
    assert_eq!(
        r.forgetting.map(f64::to_bits),
        golden.forgetting,
        "{name}: forgetting"
    );
    // Defaults: every incoming sample admitted, nothing re-encoded.
    assert_eq!(r.reencoded, qcl_aqm::Reencoded::default(), "{name}");
    let curve = curve(name, r);
    match &golden.memory {
        Memory::None(steps) => {
            let empty: Vec<_> = steps.iter().map(|&s| (s, vec![], 0, 0)).collect();
            assert_eq!(curve, empty, "{name}: memory curve");
            assert_eq!((r.stored_at_end, r.admitted), (0, None), "{name}");
            assert!(r.drift.is_empty(), "{name}: drift");
        }
        Memory::Raw(stored, c) => {
            assert_eq!(r.stored_at_end, *stored, "{name}: stored at end");
            assert_eq!(curve, owned(c), "{name}: memory curve");
            assert!(r.drift.is_empty() && r.freeze_steps.is_empty(), "{name}");
        }
        Memory::Aqm(aqm) => check_aqm(name, r, curve, aqm),
    }
}

fn check_aqm(name: &str, r: &RunResult, curve: Vec<(u64, Vec<usize>, u64, u64)>, aqm: &Aqm) {
    assert_eq!(r.stored_at_end, aqm.stored_at_end, "{name}: stored at end");
    assert_eq!(r.freeze_steps, aqm.freeze_steps, "{name}: freeze steps");
    assert_eq!(
        r.model_cost_params, aqm.model_cost_params,
        "{name}: model cost"
    );
    assert_eq!(curve, owned(aqm.curve), "{name}: memory curve");
    assert_eq!(
        r.admitted,
        Some(r.samples_streamed as u64),
        "{name}: admitted"
    );
    let (empty, measured): (Vec<_>, Vec<_>) = r.drift.iter().partition(|d| d.samples == 0);
    let empty: Vec<u64> = empty
        .iter()
        .map(|d| {
            assert_eq!((d.all, d.task0), (None, None), "{name}: no codes, no drift");
            d.step
        })
        .collect();
    assert_eq!(
        empty, aqm.drift_without_codes,
        "{name}: drift steps without codes"
    );
    let bits = |x: Option<f64>| x.map_or(u64::MAX, f64::to_bits);
    let measured: Vec<(u64, u64, u64, usize)> = measured
        .iter()
        .map(|d| (d.step, bits(d.all), bits(d.task0), d.samples))
        .collect();
    assert_eq!(measured, aqm.drift, "{name}: drift");
}

#[test]
fn the_default_configuration_gives_the_pinned_results() {
    let s = scenario();
    for (name, method, budget, golden) in [
        ("fine-tune", Method::FineTune, 1, &FINE_TUNE),
        ("ER-raw", Method::ErRaw, 20 * 784, &ER_RAW),
        ("raw-AQM", Method::RawAqm, 20 * 784, &RAW_AQM),
        ("AQM B50", Method::Aqm, 392_000, &AQM_B50),
        ("AQM tight", Method::Aqm, TIGHT, &AQM_TIGHT),
        ("iid-online", Method::IidOnline, 1, &IID_ONLINE),
    ] {
        let config = small(method, budget);
        assert!(!config.reservoir_insertion && config.reencode.is_none());
        check(name, &run(&s, &config, None).unwrap(), golden);
    }
}
