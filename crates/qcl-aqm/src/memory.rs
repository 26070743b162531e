//! The adaptive memory (docs/methods/aqm.md § The memory): raw images (block 0) and codes of
//! frozen modules (blocks 1..L) under one byte budget, on qcl-continual's byte-accounted
//! [`ClassBalancedBuffer`]s.
//!
//! (Over 600 lines: the stored items and their costs in bits, the budget check and the
//! `AdaptiveMemory` with its insertion, eviction, replay sampling and restore are one unit held
//! to one budget; about 100 lines are doc comments. The paper's extensions, reservoir
//! insertion and re-encoding, are in [`extensions`].)
//!
//! Accounting is kept in **bits** (one buffer "byte" of `BufferItem::size_bytes` is one bit
//! here), so that codes of `log2 K'` bits per index are charged exactly even when a sample's
//! cost in bytes is fractional (196 × 3 bits = 73.5 B): a raw `u8` value costs 8, a code
//! index `⌈log2 K'⌉`, a model parameter `8 · param_bytes`.

use std::collections::{BTreeMap, BTreeSet};

use qcl_continual::{
    BufferItem, Capacity, ClassBalancedBuffer, Entry, Filter, ItemId, ReplayBuffer,
};
use qcl_tensor::{Error, Result, Seed, SeededRng};
use qcl_vq::PackedIndices;
use serde::{Deserialize, Serialize};

mod extensions;
pub use extensions::{InsertionRule, Reencoded, REENCODE_FULLNESS};

/// What a stored sample holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The raw `u8` image (block 0), charged one byte per value.
    Raw(Vec<u8>),
    /// Bit-packed indices `[1, N, h, w]` of a frozen module, charged `⌈log2 K'⌉` bits each.
    Codes(PackedIndices),
}

/// One stored sample: payload plus bookkeeping that is not charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSample {
    /// Raw image or codes.
    pub payload: Payload,
    /// Index of the original image in its task's training set (for drift).
    pub dataset_index: usize,
    /// Stream step at which it entered its current block.
    pub step: u64,
}

impl BufferItem for StoredSample {
    /// The cost in **bits** (see the module documentation).
    fn size_bytes(&self) -> usize {
        match &self.payload {
            Payload::Raw(px) => px.len() * 8,
            Payload::Codes(p) => p.len() * p.bits() as usize,
        }
    }
}

/// One sample of the stream offered to the memory.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingSample {
    /// Class label.
    pub label: u32,
    /// Task.
    pub task: usize,
    /// Index in the task's training set.
    pub dataset_index: usize,
    /// The raw image.
    pub pixels: Vec<u8>,
}

/// A replayed sample, as [`AdaptiveMemory::sample`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayItem {
    /// Stable id.
    pub id: ItemId,
    /// Block it lives in (0 raw, i ≥ 1 module i).
    pub block: usize,
    /// Class label.
    pub label: u32,
    /// Task.
    pub task: usize,
    /// The stored sample.
    pub sample: StoredSample,
}

/// Budget settings (docs/methods/aqm.md § Budget and § Paper and reference code).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Total budget in bytes (`mem_size · n_classes · C·H·W`).
    pub budget_bytes: u64,
    /// Bytes charged per model parameter: 1 (AQM's convention) or 4.
    pub param_bytes: u64,
    /// Bytes of one raw image, `C·H·W`.
    pub image_bytes: usize,
    /// Seed of eviction and replay choices.
    pub seed: Seed,
}

impl MemoryConfig {
    /// `mem_per_class` raw images per class of `n_classes` classes of `image_bytes` each.
    pub fn per_class(mem_per_class: usize, n_classes: usize, image_bytes: usize) -> Self {
        MemoryConfig {
            budget_bytes: (mem_per_class * n_classes * image_bytes) as u64,
            param_bytes: 1,
            image_bytes,
            seed: Seed::new(0),
        }
    }
}

/// The adaptive memory.
///
/// ```
/// use qcl_aqm::{AdaptiveMemory, MemoryConfig};
/// use qcl_aqm::memory::IncomingSample;
/// let config = MemoryConfig::per_class(2, 2, 4); // 16 bytes: 4 raw images of 4 bytes
/// let mut memory = AdaptiveMemory::new(config, 0, 0)?;
/// for i in 0..10u32 {
///     let s = IncomingSample { label: i % 2, task: 0, dataset_index: i as usize, pixels: vec![0; 4] };
///     memory.insert(&[s], &[], &[], &[], i as u64)?;
/// }
/// assert_eq!(memory.len(), 4);
/// assert_eq!(memory.used_bits(), 16 * 8);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct AdaptiveMemory {
    config: MemoryConfig,
    blocks: Vec<ClassBalancedBuffer<StoredSample>>,
    /// Bits per stored sample of each block (raw: `8·C·H·W`; a module: 0 until frozen).
    block_bits: Vec<u64>,
    model_cost_params: u64,
    next_id: u64,
    rng: SeededRng,
    /// How incoming samples are admitted (and space freed).
    insertion: InsertionRule,
    /// Incoming samples offered so far.
    seen: u64,
    /// Incoming samples stored on arrival so far.
    admitted: u64,
}

fn check_budget(config: &MemoryConfig, model_cost_params: u64) -> Result<()> {
    if config.param_bytes == 0 {
        return Err(Error::invalid_parameter(
            "param_bytes",
            "must be at least 1",
        ));
    }
    // Accounting is in bits: the budget must stay countable as such.
    if config.budget_bytes > u64::MAX / 8 {
        return Err(Error::invalid_parameter(
            "budget_bytes",
            format!(
                "must be at most {} B, got {}",
                u64::MAX / 8,
                config.budget_bytes
            ),
        ));
    }
    let cost = model_cost_params.saturating_mul(config.param_bytes);
    if config.budget_bytes <= cost {
        return Err(Error::invalid_parameter(
            "budget_bytes",
            format!(
                "the budget ({} B) is not larger than the model cost ({model_cost_params} \
                 parameters × {} B = {cost} B): no room for any sample",
                config.budget_bytes, config.param_bytes
            ),
        ));
    }
    Ok(())
}

impl AdaptiveMemory {
    /// An empty memory with `modules` module blocks, charged `model_cost_params` parameters.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a budget not larger than the model cost, a zero image
    /// size or `param_bytes` of 0.
    pub fn new(config: MemoryConfig, modules: usize, model_cost_params: u64) -> Result<Self> {
        if config.image_bytes == 0 {
            return Err(Error::invalid_parameter("image_bytes", "must be positive"));
        }
        check_budget(&config, model_cost_params)?;
        let seed = config.seed;
        let blocks = (0..=modules)
            .map(|b| {
                ClassBalancedBuffer::new(
                    Capacity::unbounded(),
                    seed.child_named("block").child(b as u64),
                )
            })
            .collect::<Result<_>>()?;
        let mut block_bits = vec![0; modules + 1];
        block_bits[0] = config.image_bytes as u64 * 8;
        Ok(AdaptiveMemory {
            config,
            blocks,
            block_bits,
            model_cost_params,
            next_id: 0,
            rng: seed.child_named("memory").rng(),
            insertion: InsertionRule::default(),
            seen: 0,
            admitted: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// Number of blocks (1 + modules).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The stored entries of block `b`.
    pub fn block(&self, b: usize) -> &[Entry<StoredSample>] {
        self.blocks[b].entries()
    }

    /// Bits per sample of each block.
    pub fn block_bits(&self) -> &[u64] {
        &self.block_bits
    }

    /// Samples stored in all blocks.
    pub fn len(&self) -> usize {
        self.blocks.iter().map(|b| b.len()).sum()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples per block.
    pub fn counts_per_block(&self) -> Vec<usize> {
        self.blocks.iter().map(|b| b.len()).collect()
    }

    /// `mem_used` in bits: `Σ_i n_i·b_i`.
    pub fn used_bits(&self) -> u64 {
        self.blocks.iter().map(|b| b.bytes_used() as u64).sum()
    }

    /// `mem_size` in bits: `8·(budget − model_cost·param_bytes)`.
    pub fn capacity_bits(&self) -> u64 {
        8 * (self.config.budget_bytes - self.model_cost_params * self.config.param_bytes)
    }

    /// The parameters currently charged.
    pub fn model_cost_params(&self) -> u64 {
        self.model_cost_params
    }

    /// The id the next new sample gets.
    pub fn next_id(&self) -> ItemId {
        ItemId(self.next_id)
    }

    /// Global count of each class over all blocks.
    pub fn class_counts(&self) -> BTreeMap<u32, usize> {
        let mut g = BTreeMap::new();
        for b in &self.blocks {
            for (&c, &n) in b.class_counts() {
                *g.entry(c).or_insert(0) += n;
            }
        }
        g
    }

    /// Where the sample with this id lives.
    pub fn locate(&self, id: ItemId) -> Option<(usize, &Entry<StoredSample>)> {
        self.blocks
            .iter()
            .enumerate()
            .find_map(|(b, buf)| buf.get(id).map(|e| (b, e)))
    }

    /// Charges a new model cost (a module froze: its slow decoder is added), then evicts
    /// until the memory fits; returns the evicted entries.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the budget is not larger than the new cost (nothing
    /// changes then).
    pub fn set_model_cost(&mut self, params: u64) -> Result<Vec<Entry<StoredSample>>> {
        check_budget(&self.config, params)?;
        self.model_cost_params = params;
        self.evict()
    }

    /// Declares module `module` (1-based) frozen with `bits` bits per stored sample.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for block 0 or beyond, zero bits, or a block that already
    /// holds samples at another cost.
    pub fn set_module_bits(&mut self, module: usize, bits: u64) -> Result<()> {
        if module == 0 || module >= self.blocks.len() || bits == 0 {
            return Err(Error::invalid_parameter(
                "module",
                format!("module {module} with {bits} bits per sample"),
            ));
        }
        if !self.blocks[module].is_empty() && self.block_bits[module] != bits {
            return Err(Error::invalid_parameter(
                "module",
                "the per-sample cost of a block holding samples cannot change",
            ));
        }
        self.block_bits[module] = bits;
        Ok(())
    }

    /// Insertion then eviction (docs/methods/aqm.md § Insertion, § Eviction) for one processed
    /// batch.
    ///
    /// The batch rows are `incoming` followed by `replayed` (with their ids); `ok[m][row]`
    /// says whether module m+1's final reconstruction of the row is under its threshold and
    /// `codes[m][row]` holds that row's indices `[1, N, h, w]` (needed only for frozen
    /// modules, i.e. those with nonzero [`block_bits`](Self::block_bits)). Each row goes to
    /// the deepest frozen module that passes, unless it is already stored as codes; remaining
    /// incoming rows are stored raw; replayed raw rows that moved to codes leave block 0.
    /// Under [`InsertionRule::Reservoir`] each incoming row is first admitted or turned away
    /// ([`admission_probability`](Self::admission_probability)); a row turned away is not
    /// stored, though it still uses up its id; space is then freed among the samples stored
    /// before this batch. Returns the evicted entries.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `ok`/`codes` do not cover every module and row;
    /// [`Error::InvalidParameter`] for codes whose cost differs from the block's, and under
    /// [`InsertionRule::Reservoir`] for incoming rows when `mem_size` holds no raw image (the
    /// memory is unchanged after either). A replayed id that is no longer stored is skipped.
    pub fn insert(
        &mut self,
        incoming: &[IncomingSample],
        replayed: &[ItemId],
        ok: &[Vec<bool>],
        codes: &[Vec<PackedIndices>],
        step: u64,
    ) -> Result<Vec<Entry<StoredSample>>> {
        let modules = self.blocks.len() - 1;
        let rows = incoming.len() + replayed.len();
        let frozen = self.check_decisions(ok, codes, rows)?;
        if let Some(s) = incoming
            .iter()
            .find(|s| s.pixels.len() != self.config.image_bytes)
        {
            return Err(Error::ShapeMismatch {
                context: "incoming raw image".into(),
                expected: format!("{} bytes", self.config.image_bytes),
                actual: vec![s.pixels.len()],
            });
        }
        // Where each replayed row lives now (`None`: evicted since it was drawn, e.g. when a
        // freeze raised the model cost; such a row is skipped).
        let replay_block: Vec<Option<usize>> = replayed
            .iter()
            .map(|&id| self.locate(id).map(|(b, _)| b))
            .collect();
        // Every incoming row is admitted, except under reservoir insertion.
        let admitted = self.admit(incoming.len())?;
        // Incoming rows get ids in arrival order, whatever block they end in (or none).
        let first_id = self.next_id;
        self.next_id += incoming.len() as u64;
        let mut moved: BTreeSet<usize> = BTreeSet::new();
        for m in (0..modules).rev() {
            if !frozen[m] {
                continue;
            }
            for row in 0..rows {
                if !ok[m][row] || moved.contains(&row) {
                    continue;
                }
                if row < incoming.len() && !admitted[row] {
                    continue; // turned away by reservoir insertion
                }
                if row >= incoming.len() && replay_block[row - incoming.len()] != Some(0) {
                    continue; // already codes (left to `reencode`, if on) or gone
                }
                let sample = StoredSample {
                    payload: Payload::Codes(codes[m][row].clone()),
                    dataset_index: 0,
                    step,
                };
                if row < incoming.len() {
                    let s = &incoming[row];
                    let id = ItemId(first_id + row as u64);
                    self.blocks[m + 1].insert_with_id(
                        id,
                        s.label,
                        s.task,
                        StoredSample {
                            dataset_index: s.dataset_index,
                            ..sample
                        },
                    )?;
                } else {
                    let id = replayed[row - incoming.len()];
                    // Delete by stable id before re-inserting, so no id is in two blocks.
                    let old = self.blocks[0].remove(id).ok_or_else(|| {
                        Error::invalid_parameter("replayed", format!("{id:?} left raw storage"))
                    })?;
                    self.blocks[m + 1].insert_with_id(
                        id,
                        old.label,
                        old.task,
                        StoredSample {
                            dataset_index: old.item.dataset_index,
                            ..sample
                        },
                    )?;
                }
                moved.insert(row);
            }
        }
        for (row, s) in incoming.iter().enumerate() {
            if moved.contains(&row) || !admitted[row] {
                continue;
            }
            let id = ItemId(first_id + row as u64);
            self.blocks[0].insert_with_id(
                id,
                s.label,
                s.task,
                StoredSample {
                    payload: Payload::Raw(s.pixels.clone()),
                    dataset_index: s.dataset_index,
                    step,
                },
            )?;
        }
        self.evict_sparing(ItemId(first_id))
    }

    /// Checks the per-module threshold decisions and codes of a batch of `rows` rows (see
    /// [`insert`](Self::insert)); returns which modules are frozen.
    fn check_decisions(
        &self,
        ok: &[Vec<bool>],
        codes: &[Vec<PackedIndices>],
        rows: usize,
    ) -> Result<Vec<bool>> {
        let modules = self.blocks.len() - 1;
        let frozen: Vec<bool> = (1..=modules).map(|m| self.block_bits[m] > 0).collect();
        if ok.len() != modules && !(modules > 0 && frozen.iter().all(|f| !f) && ok.is_empty()) {
            return Err(Error::ShapeMismatch {
                context: "threshold decisions".into(),
                expected: format!("{modules} modules"),
                actual: vec![ok.len()],
            });
        }
        for m in 0..modules {
            if frozen[m] {
                if ok[m].len() != rows || codes.get(m).is_none_or(|c| c.len() != rows) {
                    return Err(Error::ShapeMismatch {
                        context: format!("decisions and codes of module {}", m + 1),
                        expected: format!("{rows} rows"),
                        actual: vec![ok[m].len(), codes.get(m).map_or(0, Vec::len)],
                    });
                }
                if let Some(bad) = codes[m]
                    .iter()
                    .find(|c| (c.len() as u64) * u64::from(c.bits()) != self.block_bits[m + 1])
                {
                    return Err(Error::invalid_parameter(
                        "codes",
                        format!(
                            "codes of {} bits for module {} whose samples cost {} bits",
                            bad.len() as u64 * u64::from(bad.bits()),
                            m + 1,
                            self.block_bits[m + 1]
                        ),
                    ));
                }
            }
        }
        Ok(frozen)
    }

    /// Eviction (docs/methods/aqm.md § Eviction, our rule): while over budget, take a class of
    /// maximal global count (ties uniformly at random) and remove a uniformly random sample of
    /// it from the lowest block that holds it. Under [`InsertionRule::Reservoir`] space is freed
    /// level-agnostically instead: a uniformly random stored sample of any block and class.
    ///
    /// # Errors
    /// Under [`InsertionRule::Reservoir`], the errors of its random draw (none in practice).
    pub fn evict(&mut self) -> Result<Vec<Entry<StoredSample>>> {
        self.evict_sparing(ItemId(self.next_id))
    }

    /// [`evict`](Self::evict) after an insertion whose new samples have ids from `new_from` on:
    /// reservoir freeing spares them while older samples are stored
    /// ([`InsertionRule::Reservoir`]); the class-balanced rule treats every sample alike.
    fn evict_sparing(&mut self, new_from: ItemId) -> Result<Vec<Entry<StoredSample>>> {
        if self.insertion == InsertionRule::Reservoir {
            return self.evict_uniformly(new_from);
        }
        let mut evicted = Vec::new();
        let capacity = self.capacity_bits();
        while self.used_bits() > capacity {
            let g = self.class_counts();
            let Some(&max) = g.values().max() else { break };
            let top: Vec<u32> = g
                .iter()
                .filter(|(_, &n)| n == max)
                .map(|(&c, _)| c)
                .collect();
            let class = top[self.rng.below(top.len()).unwrap_or(0)];
            let Some(b) = self
                .blocks
                .iter()
                .position(|b| b.class_counts().contains_key(&class))
            else {
                break;
            };
            let ids = self.ids_of(b, &Filter::classes([class]));
            let id = ids[self.rng.below(ids.len()).unwrap_or(0)];
            if let Some(e) = self.blocks[b].remove(id) {
                evicted.push(e);
            }
        }
        Ok(evicted)
    }

    /// Replay sampling (docs/methods/aqm.md § Replay): `n` labels drawn uniformly with
    /// replacement among classes with a sample of a task other than `current_task`; each
    /// class's draws split over blocks by a multinomial ∝ its eligible samples per block;
    /// distinct samples within a block (fewer if the block has fewer). Items come in
    /// draw-independent order (class, block).
    pub fn sample(&mut self, n: usize, current_task: usize) -> Vec<ReplayItem> {
        // Eligible: task ≠ current. Tasks arrive in order, so that is tasks before it, plus
        // any later ones if a memory is reused.
        let mut per_class_block: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (b, block) in self.blocks.iter().enumerate() {
            for e in block.iter() {
                if e.task != current_task {
                    per_class_block
                        .entry(e.label)
                        .or_insert_with(|| vec![0; self.blocks.len()])[b] += 1;
                }
            }
        }
        let classes: Vec<u32> = per_class_block.keys().copied().collect();
        if classes.is_empty() || n == 0 {
            return Vec::new();
        }
        let mut draws: BTreeMap<u32, usize> = BTreeMap::new();
        for _ in 0..n {
            let c = classes[self.rng.below(classes.len()).unwrap_or(0)];
            *draws.entry(c).or_insert(0) += 1;
        }
        let tasks: Vec<usize> = {
            let mut t: BTreeSet<usize> = BTreeSet::new();
            for block in &self.blocks {
                t.extend(
                    block
                        .task_counts()
                        .keys()
                        .copied()
                        .filter(|&t| t != current_task),
                );
            }
            t.into_iter().collect()
        };
        let mut out = Vec::new();
        for (class, k) in draws {
            let counts = &per_class_block[&class];
            let total: usize = counts.iter().sum();
            let mut per_block = vec![0usize; counts.len()];
            for _ in 0..k {
                let mut r = self.rng.below(total).unwrap_or(0);
                for (b, &c) in counts.iter().enumerate() {
                    if r < c {
                        per_block[b] += 1;
                        break;
                    }
                    r -= c;
                }
            }
            let filter = Filter::classes([class]).with_tasks(tasks.clone());
            for (b, &m) in per_block.iter().enumerate() {
                if m == 0 {
                    continue;
                }
                let ids = self.ids_of(b, &filter);
                let chosen = self
                    .rng
                    .sample_indices(ids.len(), m.min(ids.len()))
                    .unwrap_or_default();
                let picked: Vec<Entry<StoredSample>> = chosen
                    .into_iter()
                    .filter_map(|i| self.blocks[b].get(ids[i]).cloned())
                    .collect();
                out.extend(picked.into_iter().map(|e| ReplayItem {
                    id: e.id,
                    block: b,
                    label: e.label,
                    task: e.task,
                    sample: e.item,
                }));
            }
        }
        out
    }

    /// Ids of block `b` that `filter` admits, sorted: choices among them depend only on the
    /// memory's contents, not on the buffers' internal order, so a restored memory draws the
    /// same samples.
    fn ids_of(&self, b: usize, filter: &Filter) -> Vec<ItemId> {
        let mut ids: Vec<ItemId> = self.blocks[b]
            .iter()
            .filter(|e| filter.admits(e.label, e.task))
            .map(|e| e.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Every stored entry with its block, in block then id order (for saving and checks).
    pub fn all_entries(&self) -> Vec<(usize, Entry<StoredSample>)> {
        let mut out = Vec::with_capacity(self.len());
        for (b, block) in self.blocks.iter().enumerate() {
            let mut es: Vec<&Entry<StoredSample>> = block.iter().collect();
            es.sort_by_key(|e| e.id);
            out.extend(es.into_iter().map(|e| (b, e.clone())));
        }
        out
    }

    /// The eviction/replay RNG state (for saving).
    pub(crate) fn rng_state(&self) -> qcl_tensor::RngState {
        self.rng.state()
    }

    /// Rebuilds a memory from saved parts: entries are re-inserted under their ids.
    pub(crate) fn restore(
        config: MemoryConfig,
        block_bits: Vec<u64>,
        model_cost_params: u64,
        next_id: u64,
        rng: qcl_tensor::RngState,
        entries: Vec<(usize, Entry<StoredSample>)>,
    ) -> Result<Self> {
        let mut memory = AdaptiveMemory::new(
            config,
            block_bits.len().saturating_sub(1),
            model_cost_params,
        )?;
        memory.block_bits = block_bits;
        for (b, e) in entries {
            if b >= memory.blocks.len() || memory.locate(e.id).is_some() || e.id.0 >= next_id {
                return Err(Error::invalid_parameter(
                    "memory",
                    format!("entry {:?} in block {b} is invalid or duplicated", e.id),
                ));
            }
            if e.item.size_bytes() as u64 != memory.block_bits[b] {
                return Err(Error::invalid_parameter(
                    "memory",
                    format!(
                        "entry {:?} costs {} bits, block {b} {}",
                        e.id,
                        e.item.size_bytes(),
                        memory.block_bits[b]
                    ),
                ));
            }
            memory.blocks[b].insert_with_id(e.id, e.label, e.task, e.item)?;
        }
        memory.next_id = next_id;
        memory.rng = qcl_tensor::SeededRng::from_state(&rng);
        if memory.used_bits() > memory.capacity_bits() {
            return Err(Error::invalid_parameter(
                "memory",
                "saved contents exceed the budget",
            ));
        }
        Ok(memory)
    }
}
