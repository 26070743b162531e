use proptest::prelude::*;

use super::*;
use crate::index::blocks::BlockedCodes;

/// Every available kernel's sums for one block.
fn all_sums(block: &[u8], m: usize, nbits: u32, lut: &[u8]) -> Vec<(Kernel, [u16; BLOCK])> {
    Kernel::available()
        .into_iter()
        .map(|kernel| {
            let mut out = [0xdead; BLOCK];
            block_sums_with(kernel, block, m, nbits, lut, &mut out);
            (kernel, out)
        })
        .collect()
}

/// A table byte, the extremes 0 and 255 as often as any other value.
fn lut_byte() -> impl Strategy<Value = u8> {
    prop_oneof![Just(0u8), Just(255u8), any::<u8>()]
}

/// `(m, nbits, block bytes, lut)`: any bytes, so for odd m the unused high nibbles of the
/// last 4-bit run are not 0 and must still be ignored.
fn raw_case() -> impl Strategy<Value = (usize, u32, Vec<u8>, Vec<u8>)> {
    (1usize..=40, prop_oneof![Just(4u32), Just(8u32)]).prop_flat_map(|(m, nbits)| {
        let runs = if nbits == 8 { m } else { m.div_ceil(2) };
        (
            Just(m),
            Just(nbits),
            prop::collection::vec(any::<u8>(), runs * BLOCK),
            prop::collection::vec(lut_byte(), m << nbits),
        )
    })
}

/// `(m, nbits, rows of codes, lut)` for a possibly partial block of 1..=64 vectors.
fn rows_case() -> impl Strategy<Value = (usize, u32, Vec<Vec<u8>>, Vec<u8>)> {
    (
        1usize..=40,
        prop_oneof![Just(4u32), Just(8u32)],
        1usize..=BLOCK,
    )
        .prop_flat_map(|(m, nbits, n)| {
            let code = if nbits == 8 { 0..=255u8 } else { 0..=15u8 };
            (
                Just(m),
                Just(nbits),
                prop::collection::vec(prop::collection::vec(code, m), n),
                prop::collection::vec(lut_byte(), m << nbits),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_kernel_equals_the_scalar_reference((m, nbits, block, lut) in raw_case()) {
        let mut expected = [0; BLOCK];
        block_sums_scalar(&block, m, nbits, &lut, &mut expected);
        for (kernel, sums) in all_sums(&block, m, nbits, &lut) {
            prop_assert_eq!(sums, expected, "kernel {}, m = {}, nbits = {}", kernel.name(), m, nbits);
        }
        let mut detected = [0; BLOCK];
        block_sums(&block, m, nbits, &lut, &mut detected);
        prop_assert_eq!(detected, expected);
    }

    #[test]
    fn every_kernel_sums_the_table_entries_of_each_vector((m, nbits, rows, lut) in rows_case()) {
        let mut blocked = BlockedCodes::new(m, nbits).unwrap();
        for row in &rows {
            blocked.push(row);
        }
        let ksub = 1usize << nbits;
        // Padding vectors have code 0 everywhere.
        let expected: Vec<u16> = (0..BLOCK)
            .map(|i| {
                (0..m)
                    .map(|j| u16::from(lut[j * ksub + rows.get(i).map_or(0, |r| r[j]) as usize]))
                    .sum()
            })
            .collect();
        for (kernel, sums) in all_sums(blocked.block(0), m, nbits, &lut) {
            prop_assert_eq!(&sums[..], &expected[..], "kernel {}, m = {}, nbits = {}", kernel.name(), m, nbits);
        }
    }

    #[test]
    fn mask_le_sets_the_bits_of_sums_at_most_the_threshold(
        sums in prop::array::uniform32(any::<u16>()).prop_flat_map(|a| {
            prop::array::uniform32(any::<u16>()).prop_map(move |b| {
                let mut sums = [0; BLOCK];
                sums[..32].copy_from_slice(&a);
                sums[32..].copy_from_slice(&b);
                sums
            })
        }),
        threshold in any::<u16>(),
    ) {
        let mask = block_mask_le(&sums, threshold);
        for (i, &s) in sums.iter().enumerate() {
            prop_assert_eq!(mask >> i & 1 == 1, s <= threshold, "lane {}", i);
        }
        // Every kernel's mask, at the threshold and at the lanes' own values (ties).
        for kernel in Kernel::available() {
            for limit in [threshold, sums[0], sums[63], 0, u16::MAX] {
                prop_assert_eq!(block_mask_le_with(kernel, &sums, limit), block_mask_le(&sums, limit));
            }
        }
    }
}

#[test]
fn four_bit_sums_by_hand_with_an_odd_number_of_sub_spaces() {
    // m = 3: run 0 holds sub-spaces 0 (low nibble) and 1 (high), run 1 sub-space 2 (low).
    // Entry c of table j is c·(j + 1).
    let m = 3;
    let lut: Vec<u8> = (0..m)
        .flat_map(|j| (0..16).map(move |c| (c * (j + 1)) as u8))
        .collect();
    let mut block = vec![0u8; 2 * BLOCK];
    let mut put = |i: usize, codes: [u8; 3]| {
        block[i] = codes[0] | codes[1] << 4;
        block[BLOCK + i] = codes[2];
    };
    put(0, [1, 2, 3]); // 1 + 4 + 9
    put(5, [15, 15, 15]); // 15 + 30 + 45
    put(63, [0, 7, 2]); // 0 + 14 + 6
    for (kernel, sums) in all_sums(&block, m, 4, &lut) {
        let name = kernel.name();
        assert_eq!([sums[0], sums[5], sums[63]], [14, 90, 20], "kernel {name}");
        assert_eq!(
            [sums[1], sums[4], sums[6], sums[62]],
            [0; 4],
            "kernel {name}"
        );
    }
}

#[test]
fn eight_bit_sums_by_hand_across_both_table_halves() {
    // m = 2; codes ≥ 128 take the upper half of the table, and sums pass 255.
    let m = 2;
    let mut lut = vec![0u8; 2 * 256];
    lut[200] = 7;
    lut[256 + 3] = 250;
    lut[127] = 1;
    lut[256 + 128] = 2;
    lut[255] = 255;
    lut[256 + 255] = 255;
    let mut block = vec![0u8; 2 * BLOCK];
    for (i, [c0, c1]) in [(0, [200, 3]), (1, [127, 128]), (40, [255, 255])] {
        block[i] = c0;
        block[BLOCK + i] = c1;
    }
    for (kernel, sums) in all_sums(&block, m, 8, &lut) {
        let name = kernel.name();
        assert_eq!([sums[0], sums[1], sums[40]], [257, 3, 510], "kernel {name}");
        assert_eq!(
            [sums[2], sums[39], sums[41], sums[63]],
            [0; 4],
            "kernel {name}"
        );
    }
}

#[test]
fn the_largest_sums_fit_exactly() {
    // m · 255 = 65535, the most callers allow: every lane at u16::MAX, none wrapped.
    let m: usize = 257;
    for nbits in [4, 8] {
        let runs = if nbits == 8 { m } else { m.div_ceil(2) };
        let block: Vec<u8> = (0..runs * BLOCK).map(|b| (b * 37 % 251) as u8).collect();
        let lut = vec![255u8; m << nbits];
        for (kernel, sums) in all_sums(&block, m, nbits, &lut) {
            assert_eq!(
                sums,
                [u16::MAX; BLOCK],
                "kernel {}, nbits = {nbits}",
                kernel.name()
            );
        }
    }
}

#[test]
fn mask_le_by_hand() {
    let sums: [u16; BLOCK] = std::array::from_fn(|i| 10 * i as u16);
    assert_eq!(block_mask_le(&sums, 25), 0b111);
    assert_eq!(block_mask_le(&sums, 0), 1);
    assert_eq!(block_mask_le(&sums, 630), u64::MAX);
    assert_eq!(block_mask_le(&sums, 629), u64::MAX >> 1);
    let mut high = [u16::MAX; BLOCK];
    high[63] = 3;
    assert_eq!(block_mask_le(&high, 3), 1 << 63);
}

#[test]
fn available_kernels_are_distinct_and_include_the_detected_one() {
    let available = Kernel::available();
    assert_eq!(available[0], Kernel::Scalar);
    assert!(available.contains(&Kernel::detect()));
    assert_eq!(*available.last().unwrap(), Kernel::detect());
    let names: std::collections::HashSet<_> = available.iter().map(|k| k.name()).collect();
    assert_eq!(names.len(), available.len());
}

#[test]
fn an_unavailable_kernel_panics() {
    let missing = Kernel::ALL.into_iter().find(|k| !k.is_available());
    // Some kernel is for another architecture.
    let kernel = missing.expect("no CPU has both x86 and NEON kernels");
    let result = std::panic::catch_unwind(|| {
        let mut out = [0; BLOCK];
        block_sums_with(kernel, &[0; BLOCK], 1, 8, &[0; 256], &mut out);
    });
    assert!(result.is_err(), "kernel {}", kernel.name());
}

#[test]
#[should_panic(expected = "block of 3 sub-spaces")]
fn a_block_of_the_wrong_size_panics() {
    let mut out = [0; BLOCK];
    block_sums(&[0; BLOCK], 3, 4, &[0; 48], &mut out);
}

#[test]
#[should_panic(expected = "lut of 3 sub-spaces")]
fn a_short_lut_panics() {
    let mut out = [0; BLOCK];
    block_sums(&[0; 3 * BLOCK], 3, 8, &[0; 2 * 256], &mut out);
}
