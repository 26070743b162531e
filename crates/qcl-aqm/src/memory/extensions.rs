//! The paper's two extensions of the memory (docs/methods/aqm.md § Extensions), both off by
//! default: reservoir insertion with level-agnostic freeing of space, and re-encoding of
//! replayed compressed samples.

use qcl_continual::{Entry, ItemId, ReplayBuffer};
use qcl_tensor::{Error, Result};
use qcl_vq::PackedIndices;
use serde::{Deserialize, Serialize};

use super::{AdaptiveMemory, Payload, StoredSample};

/// How the memory admits incoming samples and frees space (docs/methods/aqm.md § Insertion,
/// § Extensions).
///
/// ```
/// use qcl_aqm::memory::{IncomingSample, InsertionRule};
/// use qcl_aqm::{AdaptiveMemory, MemoryConfig};
/// let mut memory = AdaptiveMemory::new(MemoryConfig::per_class(2, 2, 4), 0, 0)?; // 4 raw images
/// assert_eq!(memory.insertion(), InsertionRule::Every); // the reference code
/// memory.set_insertion(InsertionRule::Reservoir);
/// for i in 0..100u32 {
///     let s = IncomingSample { label: i % 2, task: 0, dataset_index: i as usize, pixels: vec![0; 4] };
///     memory.insert(&[s], &[], &[], &[], u64::from(i))?;
/// }
/// assert_eq!((memory.seen(), memory.len()), (100, 4));
/// assert!(memory.admitted() < 100); // most of the stream was turned away
/// assert!((memory.admission_probability() - 4.0 / 101.0).abs() < 1e-12);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InsertionRule {
    /// Every incoming sample is stored; space is freed class-balanced, raw images first (the
    /// reference code).
    #[default]
    Every,
    /// Reservoir insertion (Alg. 4 of the paper's ICLR 2020 version): the `n`-th incoming
    /// sample is admitted with probability `max(raw capacity, stored) / n`, where the raw
    /// capacity is the number of raw images `mem_size` holds; space is freed by removing
    /// uniformly random stored samples of any block and class, so the bytes freed in a block
    /// are on average proportional to the bytes it holds. As in Alg. 4 (free space, then add),
    /// the samples a batch admits are not evicted to make room for that batch while an older
    /// sample is stored. The rule needs a raw capacity of at least 1: when `mem_size` holds no
    /// raw image, an empty memory would never admit anything, so
    /// [`insert`](AdaptiveMemory::insert) refuses incoming samples with
    /// [`Error::InvalidParameter`] instead.
    Reservoir,
}

/// What one call of [`AdaptiveMemory::reencode`] did (summed over calls with `+=`).
///
/// ```
/// use qcl_aqm::Reencoded;
/// let mut total = Reencoded::default();
/// total += Reencoded { moved: 1, refreshed: 4 };
/// total += Reencoded { moved: 0, refreshed: 2 };
/// assert_eq!((total.moved, total.refreshed), (1, 6));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reencoded {
    /// Compressed samples moved to a deeper module.
    pub moved: u64,
    /// Compressed samples that stayed in their module with fresh indices.
    pub refreshed: u64,
}

impl std::ops::AddAssign for Reencoded {
    fn add_assign(&mut self, other: Self) {
        self.moved += other.moved;
        self.refreshed += other.refreshed;
    }
}

/// The fill level `used / mem_size` from which the paper re-encodes replayed samples.
pub const REENCODE_FULLNESS: f64 = 0.95;

impl AdaptiveMemory {
    /// The insertion rule (default [`InsertionRule::Every`]).
    pub fn insertion(&self) -> InsertionRule {
        self.insertion
    }

    /// Sets the insertion rule; later insertions and evictions follow it.
    pub fn set_insertion(&mut self, rule: InsertionRule) {
        self.insertion = rule;
    }

    /// Sets the rule and its counters of a saved memory.
    pub(crate) fn restore_insertion(&mut self, rule: InsertionRule, seen: u64, admitted: u64) {
        self.insertion = rule;
        self.seen = seen;
        self.admitted = admitted;
    }

    /// Incoming samples offered to [`insert`](Self::insert) so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Incoming samples stored on arrival so far (all of [`seen`](Self::seen) unless
    /// reservoir insertion turned some away).
    pub fn admitted(&self) -> u64 {
        self.admitted
    }

    /// Raw images that `mem_size` holds now.
    pub fn raw_capacity(&self) -> u64 {
        self.capacity_bits() / self.block_bits[0]
    }

    /// `used / mem_size`, the fill level.
    ///
    /// ```
    /// use qcl_aqm::memory::IncomingSample;
    /// use qcl_aqm::{AdaptiveMemory, MemoryConfig};
    /// let mut memory = AdaptiveMemory::new(MemoryConfig::per_class(2, 2, 4), 0, 0)?;
    /// assert_eq!((memory.raw_capacity(), memory.fullness()), (4, 0.0));
    /// let s = IncomingSample { label: 0, task: 0, dataset_index: 0, pixels: vec![0; 4] };
    /// memory.insert(&[s], &[], &[], &[], 0)?;
    /// assert_eq!(memory.fullness(), 0.25);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    pub fn fullness(&self) -> f64 {
        self.used_bits() as f64 / self.capacity_bits() as f64
    }

    /// The probability that reservoir insertion admits the next incoming sample now,
    /// `min(1, max(raw capacity, stored) / (seen + 1))` (1 under [`InsertionRule::Every`]). With
    /// a raw capacity of 0 (and nothing stored) this is 0, and [`insert`](Self::insert) refuses
    /// incoming samples under reservoir insertion (see [`InsertionRule::Reservoir`]).
    pub fn admission_probability(&self) -> f64 {
        match self.insertion {
            InsertionRule::Every => 1.0,
            InsertionRule::Reservoir => {
                let keep = self.reservoir_keep();
                (keep as f64 / (self.seen + 1) as f64).min(1.0)
            }
        }
    }

    /// Alg. 4's `max(N, stored)`: how many of the samples seen so far the reservoir keeps.
    fn reservoir_keep(&self) -> u64 {
        self.raw_capacity().max(self.len() as u64)
    }

    /// Decides for `n` incoming samples whether each is admitted, counting them as seen: all
    /// are under [`InsertionRule::Every`]; under reservoir insertion the `k`-th sample ever seen
    /// is admitted when `j < max(raw capacity, stored)` for `j` uniform in `0..k` (the stored
    /// count is the one before this batch).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] under reservoir insertion when `mem_size` holds no raw image
    /// (nothing changes then); the errors of the random draw.
    pub(super) fn admit(&mut self, n: usize) -> Result<Vec<bool>> {
        if self.insertion == InsertionRule::Reservoir && n > 0 && self.raw_capacity() == 0 {
            return Err(Error::invalid_parameter(
                "budget_bytes",
                format!(
                    "reservoir insertion needs room for at least one raw image (its N, the raw \
                     capacity, would be 0): mem_size is {} bits after the model cost, a raw \
                     image costs {} bits",
                    self.capacity_bits(),
                    self.block_bits[0]
                ),
            ));
        }
        let keep = self.reservoir_keep();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            self.seen += 1;
            let admitted = match self.insertion {
                InsertionRule::Every => true,
                InsertionRule::Reservoir => {
                    self.seen <= keep || (self.rng.below(self.seen as usize)? as u64) < keep
                }
            };
            self.admitted += u64::from(admitted);
            out.push(admitted);
        }
        Ok(out)
    }

    /// Level-agnostic freeing of reservoir insertion: while over budget, remove a uniformly
    /// random stored sample (chosen among the ids in sorted order, so a restored memory removes
    /// the same ones). Samples with ids from `new_from` on (this batch's incoming samples) are
    /// not candidates while an older sample is stored: Alg. 4 frees space for a new sample and
    /// then adds it, so a sample is never evicted in the batch that admitted it unless that
    /// batch alone exceeds `mem_size`.
    ///
    /// # Errors
    /// The errors of the random draw (none for a non-empty pool).
    pub(super) fn evict_uniformly(&mut self, new_from: ItemId) -> Result<Vec<Entry<StoredSample>>> {
        let mut evicted = Vec::new();
        let capacity = self.capacity_bits();
        // Sorted once; a removed sample leaves the list, which stays sorted.
        let mut ids: Vec<(ItemId, usize)> = self
            .blocks
            .iter()
            .enumerate()
            .flat_map(|(b, block)| block.iter().map(move |e| (e.id, b)))
            .collect();
        ids.sort_unstable();
        // New ids are the largest: the older samples come first.
        let mut older = ids.partition_point(|&(id, _)| id < new_from);
        while self.used_bits() > capacity && !ids.is_empty() {
            let i = self.rng.below(if older > 0 { older } else { ids.len() })?;
            let (id, b) = ids.remove(i);
            if i < older {
                older -= 1;
            }
            if let Some(e) = self.blocks[b].remove(id) {
                evicted.push(e);
            }
        }
        Ok(evicted)
    }

    /// Re-encoding of replayed compressed samples (the paper's "update buffer representation";
    /// docs/methods/aqm.md § Extensions). `replayed` are the replay rows' ids, `ok[m][row]`
    /// says whether module m+1 reconstructs the row within `eps_th` (the threshold for samples
    /// that are already codes) and `codes[m][row]` holds the row's indices under the current
    /// encoder, as in [`insert`](Self::insert) (needed only for frozen modules). A row stored
    /// in module `b ≥ 1` moves to the deepest frozen module deeper than `b` that passes; else
    /// it stays in `b` and takes the fresh indices `codes[b−1][row]`. Raw rows and rows no
    /// longer stored are left alone (raw rows migrate in [`insert`](Self::insert)). Moving
    /// deeper only frees space and a refresh costs the same, so nothing is evicted. The online
    /// loop calls this only when [`fullness`](Self::fullness) is at least
    /// [`REENCODE_FULLNESS`] (or the configured level).
    ///
    /// ```
    /// use qcl_aqm::memory::IncomingSample;
    /// use qcl_aqm::{AdaptiveMemory, MemoryConfig};
    /// use qcl_vq::PackedIndices;
    /// let mut memory = AdaptiveMemory::new(MemoryConfig::per_class(10, 2, 4), 1, 0)?;
    /// memory.set_module_bits(1, 4 * 2)?; // 4 indices of 2 bits
    /// let old = PackedIndices::pack(&[0, 1, 2, 3], &[1, 1, 2, 2], 4)?;
    /// let s = IncomingSample { label: 0, task: 0, dataset_index: 7, pixels: vec![0; 4] };
    /// memory.insert(&[s], &[], &[vec![true]], &[vec![old]], 0)?;
    /// let id = memory.block(1)[0].id;
    /// let fresh = PackedIndices::pack(&[3, 3, 2, 0], &[1, 1, 2, 2], 4)?;
    /// let done = memory.reencode(&[id], &[vec![false]], &[vec![fresh.clone()]], 1)?;
    /// assert_eq!((done.moved, done.refreshed), (0, 1));
    /// assert_eq!(memory.locate(id).unwrap().1.item.payload, qcl_aqm::Payload::Codes(fresh));
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`insert`](Self::insert) for decisions or codes that do not cover every frozen
    /// module and row, or codes of another cost.
    pub fn reencode(
        &mut self,
        replayed: &[ItemId],
        ok: &[Vec<bool>],
        codes: &[Vec<PackedIndices>],
        step: u64,
    ) -> Result<Reencoded> {
        let frozen = self.check_decisions(ok, codes, replayed.len())?;
        let mut done = Reencoded::default();
        for (row, &id) in replayed.iter().enumerate() {
            let Some((b, _)) = self.locate(id) else {
                continue;
            };
            if b == 0 {
                continue;
            }
            let deepest_ok = (1..frozen.len() + 1)
                .rev()
                .find(|&m| frozen[m - 1] && ok[m - 1][row]);
            let target = deepest_ok.map_or(b, |m| m.max(b));
            let old = self.blocks[b]
                .remove(id)
                .ok_or_else(|| Error::invalid_parameter("replayed", format!("{id:?} vanished")))?;
            let stays = target == b;
            let sample = StoredSample {
                payload: Payload::Codes(codes[target - 1][row].clone()),
                dataset_index: old.item.dataset_index,
                step: if stays { old.item.step } else { step },
            };
            self.blocks[target].insert_with_id(id, old.label, old.task, sample)?;
            if stays {
                done.refreshed += 1;
            } else {
                done.moved += 1;
            }
        }
        Ok(done)
    }
}
