//! Saving and loading indexes: the same answers after a round trip; damaged files refused.

use qcl_pq::index::{
    opq::OpqConfig, AnyIndex, IvfPqConfig, IvfPqIndex, Metric, PqIndex, PqIndexConfig, Refine,
    Rotated, SearchConfig, VectorIndex,
};
use qcl_tensor::{Error, Seed};

fn data(seed: u64, n: usize) -> Vec<f32> {
    Seed::new(seed).rng().normal_vec(n * 8, 0.0, 1.0)
}

fn indexes() -> Vec<AnyIndex> {
    let base = data(1, 700);
    let mut pq_config = PqIndexConfig::new(4, 4);
    pq_config.train_iterations = 3;
    let flat = PqIndex::train(&base, 8, &pq_config).unwrap();
    let mut ivf_config = IvfPqConfig {
        nlist: 5,
        coarse_iterations: 3,
        ..IvfPqConfig::new(2, 8)
    };
    ivf_config.pq.metric = Metric::Cosine;
    ivf_config.pq.train_iterations = 3;
    let ivf = IvfPqIndex::train(&base, 8, &ivf_config).unwrap();
    let opq = OpqConfig {
        iterations: 2,
        ..OpqConfig::new(2, 8)
    };
    let rotation = Rotated::<AnyIndex>::learn_rotation(&base, 8, &opq).unwrap();
    let rotated_ivf = IvfPqIndex::train(&rotation.apply(&base).unwrap(), 8, &ivf_config).unwrap();
    let behind_rotation = Rotated::new(rotation, AnyIndex::IvfPq(rotated_ivf)).unwrap();
    let mut all = vec![
        AnyIndex::Refine(Box::new(
            Refine::new(AnyIndex::Rotated(Box::new(behind_rotation)), 2).unwrap(),
        )),
        AnyIndex::Pq(flat.clone()),
        AnyIndex::IvfPq(ivf.clone()),
        AnyIndex::Refine(Box::new(Refine::new(AnyIndex::IvfPq(ivf), 3).unwrap())),
    ];
    for index in &mut all {
        index.add(&base).unwrap();
        index.remove(&[3, 500]);
    }
    all
}

#[test]
fn save_then_load_gives_the_same_index_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let queries = data(2, 9);
    for index in indexes() {
        let path = dir.path().join(format!("{}.safetensors", index.kind()));
        index.save(&path).unwrap();
        let mut loaded = AnyIndex::load(&path).unwrap();
        assert!(["refine+opq+ivf-pq", "pq", "ivf-pq", "refine+ivf-pq"]
            .contains(&loaded.kind().as_str()));
        assert_eq!(loaded, index, "{}", index.kind());
        let options = SearchConfig {
            k: 6,
            nprobe: 3,
            ..Default::default()
        };
        assert_eq!(
            loaded.search_with(&queries, &options).unwrap(),
            index.search_with(&queries, &options).unwrap()
        );
        assert_eq!(
            loaded.add(&queries[..8]).unwrap(),
            700..701,
            "ids continue after a load"
        );
        let again = dir.path().join("again.safetensors");
        index.save(&again).unwrap();
        assert_eq!(
            std::fs::read(&again).unwrap(),
            std::fs::read(&path).unwrap(),
            "same bytes"
        );
    }
}

#[test]
fn damaged_truncated_and_foreign_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.safetensors");
    let index = indexes().remove(1);
    index.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let mut flipped = bytes.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x40;
    std::fs::write(&path, &flipped).unwrap();
    assert!(
        matches!(AnyIndex::load(&path), Err(Error::BadFile { .. })),
        "checksum"
    );

    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(
        matches!(AnyIndex::load(&path), Err(Error::BadFile { .. })),
        "truncated"
    );

    let pq = index.quantizer().clone();
    pq.save(&path).unwrap();
    assert!(
        matches!(AnyIndex::load(&path), Err(Error::BadFile { .. })),
        "a quantizer file"
    );

    std::fs::write(&path, b"not a file of ours").unwrap();
    assert!(AnyIndex::load(&path).is_err());
    assert!(AnyIndex::load(dir.path().join("absent")).is_err());
}

#[test]
fn an_absurd_k_factor_or_k_is_refused_or_answered_without_a_huge_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let index = indexes().swap_remove(3);
    let path = dir.path().join("refine.safetensors");
    index.save(&path).unwrap();
    // A file whose k_factor is absurd (resealed: its checksum is right) still searches.
    let bytes = std::fs::read(&path).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    meta.remove(qcl_tensor::CHECKSUM_KEY);
    meta.insert("k_factor".into(), (u64::MAX / 2).to_string());
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = parsed.tensors();
    let absurd = qcl_tensor::serialize_safetensors(
        tensors
            .iter()
            .map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data())),
        &meta.into_iter().collect(),
    )
    .unwrap();
    std::fs::write(&path, absurd).unwrap();
    let loaded = AnyIndex::load(&path).unwrap();
    let found = loaded.search(&data(2, 3), 4).unwrap();
    assert_eq!(found.ids.len(), 12);
    // A k whose answer cannot be allocated is a typed error.
    let error = index.search(&data(2, 3), usize::MAX / 2).unwrap_err();
    assert!(matches!(error, Error::InvalidParameter { .. }), "{error}");
}
