//! The WordNet reader on the committed excerpt and on malformed lines, and the seeded split.

use std::collections::HashSet;

use crate::common::fixtures;
use proptest::prelude::*;
use qcl_tensor::{Error, Seed};
use qcl_text::wordnet::{
    parse_data_file, split_glosses, Gloss, GlossList, GlossSplitConfig, PartOfSpeech,
};

fn excerpt() -> GlossList {
    GlossList::read_dir(fixtures().join("wordnet"), "fixtures/wordnet").unwrap()
}

#[test]
fn the_excerpt_reads_whole_with_counts_per_part_of_speech() {
    let list = excerpt();
    assert!(list.skipped.is_empty(), "{:?}", list.skipped);
    for pos in PartOfSpeech::ALL {
        assert_eq!(list.counts[&pos], 12, "{pos}");
    }
    let first = &list.glosses[0];
    assert_eq!((first.pos, first.offset), (PartOfSpeech::Noun, 1740));
    assert!(
        first
            .text
            .starts_with("that which is perceived or known or inferred"),
        "{}",
        first.text
    );
    let adverb = list
        .glosses
        .iter()
        .find(|g| g.pos == PartOfSpeech::Adverb)
        .unwrap();
    assert_eq!(
        adverb.text,
        "without musical accompaniment; \"they performed a cappella\""
    );
    // Offsets are byte offsets: each synset line starts there.
    let noun = std::fs::read(fixtures().join("wordnet/data.noun")).unwrap();
    for g in list.glosses.iter().filter(|g| g.pos == PartOfSpeech::Noun) {
        assert_eq!(
            &noun[g.offset as usize..g.offset as usize + 8],
            format!("{:08}", g.offset).as_bytes()
        );
    }
}

#[test]
fn a_gloss_list_round_trips_and_a_tampered_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("glosses.json");
    let list = excerpt();
    list.save(&path).unwrap();
    assert_eq!(GlossList::load(&path).unwrap(), list);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"noun\":12", "\"noun\":13", 1)).unwrap();
    assert!(matches!(GlossList::load(&path), Err(Error::BadFile { .. })));
    // The checksum catches an edit first; without a checksum (an older file) the format and
    // the counts are still checked, and a file that passes loads with a note.
    let at = text.find("\"checksum\":").unwrap();
    let unsealed = format!("{}{}", &text[..at], &text[at + 28..]);
    std::fs::write(&path, &unsealed).unwrap();
    let _ = qcl_tensor::take_notes();
    assert_eq!(GlossList::load(&path).unwrap(), list);
    assert!(qcl_tensor::take_notes()
        .iter()
        .any(|n| n.contains("no checksum")));
    std::fs::write(
        &path,
        unsealed.replace(qcl_text::wordnet::GLOSS_LIST_FORMAT, "other/1"),
    )
    .unwrap();
    assert!(
        matches!(GlossList::load(&path), Err(Error::BadFile { ref reason, .. }) if reason.contains("format"))
    );
    std::fs::write(
        &path,
        text.replace(qcl_text::wordnet::GLOSS_LIST_FORMAT, "other/1"),
    )
    .unwrap();
    assert!(
        matches!(GlossList::load(&path), Err(Error::BadFile { ref reason, .. }) if reason.contains("checksum"))
    );
}

/// A data file made of `lines`, with correct byte offsets substituted for `{}`.
fn file_of(lines: &[&str]) -> Vec<u8> {
    let mut out = b"  1 licence  \n".to_vec();
    for line in lines {
        let offset = format!("{:08}", out.len());
        out.extend_from_slice(line.replace("{}", &offset).as_bytes());
        out.push(b'\n');
    }
    out
}

#[test]
fn malformed_lines_are_skipped_with_their_reason() {
    let good = "{} 02 r 01 fast 0 000 | quickly  ";
    let cases = [
        ("{} 02 r 01 fast 0 000 quickly", "no ` | `"),
        ("{} 02 r 01 fast 0 000 |   ", "empty gloss"),
        ("00000001 02 r 01 fast 0 000 | quickly", "byte offset"),
        ("{} 02 n 01 fast 0 000 | quickly", "ss_type `n`"),
        ("{} 02 r 02 fast 0 000 | quickly", "ends before lex_id"),
        (
            "{} 02 r 01 fast 0 001 ! 00000001 r | quickly",
            "ends before",
        ),
        (
            "{} 02 r 01 fast 0 000 extra | quickly",
            "unexpected field `extra`",
        ),
        (
            "{} 2 r 01 fast 0 000 | quickly",
            "lex_filenum `2` is not 2 digits",
        ),
        ("{} 02 r 00 000 | quickly", "w_cnt is 0"),
        ("", "no ` | `"),
    ];
    for (bad, reason) in cases {
        let bytes = file_of(&[good, bad, good]);
        let file = parse_data_file(PartOfSpeech::Adverb, &bytes, "test.adv").unwrap();
        assert_eq!(file.glosses.len(), 2, "{bad}");
        assert_eq!(file.skipped.len(), 1, "{bad}");
        assert_eq!(file.skipped[0].line, 3, "{bad}");
        assert!(
            file.skipped[0].reason.contains(reason),
            "{bad}: {}",
            file.skipped[0].reason
        );
    }
    // Not UTF-8.
    let mut bytes = file_of(&[good]);
    bytes.extend_from_slice(b"\xff\xfe | x\n");
    let file = parse_data_file(PartOfSpeech::Adverb, &bytes, "x").unwrap();
    assert_eq!(file.skipped[0].reason, "not UTF-8");
    // Verb frames are checked.
    let verb = file_of(&[
        "{} 29 v 01 breathe 0 000 01 + 02 00 | draw air  ",
        "{} 29 v 01 breathe 0 000 01 - 02 00 | draw air",
    ]);
    let file = parse_data_file(PartOfSpeech::Verb, &verb, "v").unwrap();
    assert_eq!((file.glosses.len(), file.skipped.len()), (1, 1));
    assert!(file.skipped[0].reason.contains('+'));
    // A file without any synset line is an error, not an empty list.
    let err = parse_data_file(PartOfSpeech::Noun, b"  1 licence only  \n", "empty").unwrap_err();
    assert!(matches!(err, Error::EmptyInput(_)));
}

#[test]
fn a_missing_or_oversized_data_file_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = GlossList::read_dir(dir.path(), "empty").unwrap_err();
    assert!(matches!(err, Error::Io { ref path, .. } if path.ends_with("data.noun")));
}

fn synthetic(n: usize) -> Vec<Gloss> {
    (0..n)
        .map(|i| Gloss {
            pos: PartOfSpeech::ALL[i % 4],
            offset: i as u64,
            // Every fifth gloss repeats an earlier text.
            text: format!("gloss {}", if i % 5 == 4 { i - 1 } else { i }),
        })
        .collect()
}

#[test]
fn the_split_refuses_impossible_sizes() {
    let glosses = synthetic(100); // 80 distinct texts
    let p = |c, e, q| GlossSplitConfig {
        seed: Seed::new(1),
        calibration: c,
        evaluation: e,
        queries: q,
    };
    assert!(split_glosses(&glosses, &p(40, 40, 10)).is_ok());
    for (c, e, q, name) in [
        (41, 40, 10, "calibration + evaluation"),
        (10, 0, 0, "evaluation"),
        (10, 10, 11, "queries"),
    ] {
        let err = split_glosses(&glosses, &p(c, e, q)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidParameter { name: ref n, .. } if n == name),
            "{err}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_split_is_deterministic_disjoint_and_distinct(
        n in 20usize..300,
        seed in any::<u64>(),
        cal_frac in 0.0f64..0.5,
        q_frac in 0.0f64..1.0,
    ) {
        let glosses = synthetic(n);
        let distinct = glosses.iter().map(|g| &g.text).collect::<HashSet<_>>().len();
        let calibration = (distinct as f64 * cal_frac) as usize;
        let evaluation = distinct - calibration; // at least half of them
        let queries = (evaluation as f64 * q_frac) as usize;
        let params = GlossSplitConfig { seed: Seed::new(seed), calibration, evaluation, queries };
        let split = split_glosses(&glosses, &params).unwrap();
        prop_assert_eq!(&split, &split_glosses(&glosses, &params).unwrap());
        prop_assert_eq!(split.distinct, distinct);
        prop_assert_eq!(split.calibration.len(), calibration);
        prop_assert_eq!(split.evaluation.len(), evaluation);
        let texts: HashSet<&str> = split.calibration.iter().chain(&split.evaluation).map(|g| g.text.as_str()).collect();
        prop_assert_eq!(texts.len(), calibration + evaluation);
        prop_assert_eq!(split.queries.len(), queries);
        prop_assert!(split.queries.windows(2).all(|w| w[0] < w[1]));
        prop_assert!(split.queries.iter().all(|&q| q < evaluation));
        // The first occurrence of a repeated text is the one kept.
        for g in split.calibration.iter().chain(&split.evaluation) {
            let first = glosses.iter().find(|h| h.text == g.text).unwrap();
            prop_assert_eq!(g, first);
        }
    }

    #[test]
    fn well_formed_lines_parse_back(
        words in proptest::collection::vec("[a-z_]{1,12}", 1..5),
        pointers in 0usize..4,
        gloss in "[a-zA-Z ;,\"()]{0,60}[a-z]",
    ) {
        let mut line = format!("{{}} 02 r {:02x}", words.len());
        for w in &words {
            line.push_str(&format!(" {w} 0"));
        }
        line.push_str(&format!(" {pointers:03}"));
        for p in 0..pointers {
            line.push_str(&format!(" \\ 0000{p:04} a 0101"));
        }
        line.push_str(&format!(" | {gloss}  "));
        let bytes = file_of(&[&line, &line]);
        let file = parse_data_file(PartOfSpeech::Adverb, &bytes, "p").unwrap();
        prop_assert!(file.skipped.is_empty(), "{:?}", file.skipped);
        prop_assert_eq!(file.glosses.len(), 2);
        prop_assert_eq!(&file.glosses[1].text, gloss.trim());
    }
}

#[test]
fn different_seeds_give_different_splits() {
    let glosses = excerpt().glosses;
    let p = |s| GlossSplitConfig {
        seed: Seed::new(s),
        calibration: 10,
        evaluation: 30,
        queries: 5,
    };
    let a = split_glosses(&glosses, &p(0)).unwrap();
    let b = split_glosses(&glosses, &p(1)).unwrap();
    assert_ne!(a.evaluation, b.evaluation);
}
