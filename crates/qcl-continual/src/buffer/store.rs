//! The storage shared by every buffer: entries in a swap-remove vector, an id → slot map, and
//! per-(class, task) slot lists, so that insertion, removal by id and filtered sampling cost
//! O(1) (plus O(log G) in the number G of (class, task) groups) instead of scans.

use std::collections::{BTreeMap, HashMap};

use qcl_tensor::{Error, Result, SeededRng};

use super::{BufferItem, Entry, Filter, ItemId};

/// A group of entries sharing one (class, task).
type GroupKey = (u32, usize);

#[derive(Debug, Clone)]
pub(crate) struct Store<T> {
    entries: Vec<Entry<T>>,
    /// `group_pos[s]`: position of slot `s` in its group's slot list.
    group_pos: Vec<usize>,
    slot_of: HashMap<ItemId, usize>,
    /// BTreeMaps, not HashMaps, wherever the order of iteration can reach a random choice:
    /// the same seed must give the same contents in every process.
    groups: BTreeMap<GroupKey, Vec<usize>>,
    class_counts: BTreeMap<u32, usize>,
    bytes: usize,
    next_id: u64,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            entries: Vec::new(),
            group_pos: Vec::new(),
            slot_of: HashMap::new(),
            groups: BTreeMap::new(),
            class_counts: BTreeMap::new(),
            bytes: 0,
            next_id: 0,
        }
    }
}

impl<T: BufferItem> Store<T> {
    pub(crate) fn entries(&self) -> &[Entry<T>] {
        &self.entries
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn next_id(&self) -> ItemId {
        ItemId(self.next_id)
    }

    /// Checks a caller-chosen id and makes sure later fresh ids stay above it.
    pub(crate) fn reserve_id(&mut self, id: ItemId) -> Result<()> {
        if self.slot_of.contains_key(&id) {
            return Err(Error::invalid_parameter(
                "id",
                format!("item id {} is already in the buffer", id.0),
            ));
        }
        if id.0 == u64::MAX {
            return Err(Error::invalid_parameter(
                "id",
                "item id u64::MAX is reserved (fresh ids are allocated above every id seen)",
            ));
        }
        self.next_id = self.next_id.max(id.0 + 1);
        Ok(())
    }

    pub(crate) fn get(&self, id: ItemId) -> Option<&Entry<T>> {
        self.slot_of.get(&id).map(|&s| &self.entries[s])
    }

    pub(crate) fn contains(&self, id: ItemId) -> bool {
        self.slot_of.contains_key(&id)
    }

    pub(crate) fn class_counts(&self) -> &BTreeMap<u32, usize> {
        &self.class_counts
    }

    pub(crate) fn task_counts(&self) -> BTreeMap<usize, usize> {
        let mut counts = BTreeMap::new();
        for (&(_, task), slots) in &self.groups {
            *counts.entry(task).or_insert(0) += slots.len();
        }
        counts
    }

    /// Adds an entry whose id is not yet present (the caller checked).
    pub(crate) fn push(&mut self, entry: Entry<T>) {
        let slot = self.entries.len();
        let group = self.groups.entry((entry.label, entry.task)).or_default();
        self.group_pos.push(group.len());
        group.push(slot);
        *self.class_counts.entry(entry.label).or_insert(0) += 1;
        self.bytes += entry.item.size_bytes();
        self.slot_of.insert(entry.id, slot);
        self.entries.push(entry);
    }

    pub(crate) fn remove(&mut self, id: ItemId) -> Option<Entry<T>> {
        let slot = *self.slot_of.get(&id)?;
        Some(self.remove_slot(slot))
    }

    /// Swap-removes slot `slot`: the last entry moves into it.
    pub(crate) fn remove_slot(&mut self, slot: usize) -> Entry<T> {
        let key = (self.entries[slot].label, self.entries[slot].task);
        // Out of its group first (swap-remove inside the group's slot list).
        let group = self.groups.get_mut(&key).expect("every entry has a group");
        let pos = self.group_pos[slot];
        group.swap_remove(pos);
        if pos < group.len() {
            let moved_slot = group[pos];
            self.group_pos[moved_slot] = pos;
        }
        if group.is_empty() {
            self.groups.remove(&key);
        }
        let count = self.class_counts.get_mut(&key.0).expect("class counted");
        *count -= 1;
        if *count == 0 {
            self.class_counts.remove(&key.0);
        }
        // Then out of the entry vector; the last entry takes its slot.
        let last = self.entries.len() - 1;
        let entry = self.entries.swap_remove(slot);
        self.group_pos.swap_remove(slot);
        if slot < last {
            let moved = &self.entries[slot];
            self.slot_of.insert(moved.id, slot);
            let moved_key = (moved.label, moved.task);
            let pos = self.group_pos[slot];
            self.groups
                .get_mut(&moved_key)
                .expect("group of moved entry")[pos] = slot;
        }
        self.slot_of.remove(&entry.id);
        self.bytes -= entry.item.size_bytes();
        entry
    }

    /// Removes a uniformly random entry.
    pub(crate) fn remove_random(&mut self, rng: &mut SeededRng) -> Option<Entry<T>> {
        let slot = rng.below(self.entries.len()).ok()?;
        Some(self.remove_slot(slot))
    }

    /// Removes a uniformly random entry of a class with the most entries (ties broken uniformly
    /// at random).
    pub(crate) fn remove_from_largest_class(&mut self, rng: &mut SeededRng) -> Option<Entry<T>> {
        let max = *self.class_counts.values().max()?;
        // Two passes over the counts instead of collecting the tied classes: no allocation per
        // eviction.
        let ties = self.class_counts.values().filter(|&&n| n == max).count();
        let pick = rng.below(ties).ok()?;
        let class = self
            .class_counts
            .iter()
            .filter(|&(_, &n)| n == max)
            .nth(pick)
            .map(|(&c, _)| c)?;
        let mut offset = rng.below(max).ok()?;
        for (_, slots) in self.groups.range((class, 0)..=(class, usize::MAX)) {
            if offset < slots.len() {
                let slot = slots[offset];
                return Some(self.remove_slot(slot));
            }
            offset -= slots.len();
        }
        unreachable!("class counts match the group sizes")
    }

    /// `n` distinct entries drawn uniformly among those the filter admits (all of them if fewer).
    pub(crate) fn sample(&self, n: usize, filter: &Filter, rng: &mut SeededRng) -> Vec<&Entry<T>> {
        let groups: Vec<&Vec<usize>> = self
            .groups
            .iter()
            .filter(|(&(class, task), _)| filter.admits(class, task))
            .map(|(_, slots)| slots)
            .collect();
        self.sample_groups(&groups, n, rng)
    }

    /// AQM's class-balanced replay: `n` class labels drawn uniformly with replacement among the
    /// classes with at least one admitted entry, then, per class, that many distinct admitted
    /// entries of the class (fewer if the class has fewer). Grouped by class, classes ascending.
    pub(crate) fn sample_class_balanced(
        &self,
        n: usize,
        filter: &Filter,
        rng: &mut SeededRng,
    ) -> Vec<&Entry<T>> {
        // Admitted groups, per class, in ascending class order.
        let mut classes: Vec<(u32, Vec<&Vec<usize>>)> = Vec::new();
        for (&(class, task), slots) in &self.groups {
            if !filter.admits(class, task) {
                continue;
            }
            match classes.last_mut() {
                Some((c, groups)) if *c == class => groups.push(slots),
                _ => classes.push((class, vec![slots])),
            }
        }
        if classes.is_empty() {
            return Vec::new();
        }
        let mut draws = vec![0usize; classes.len()];
        for _ in 0..n {
            draws[rng.below(classes.len()).expect("non-empty")] += 1;
        }
        let mut out = Vec::with_capacity(n);
        for ((_, groups), &k) in classes.iter().zip(&draws) {
            if k > 0 {
                out.extend(self.sample_groups(groups, k, rng));
            }
        }
        out
    }

    /// `k` distinct entries drawn uniformly from the union of `groups` (all if fewer), in the
    /// order drawn.
    fn sample_groups(
        &self,
        groups: &[&Vec<usize>],
        k: usize,
        rng: &mut SeededRng,
    ) -> Vec<&Entry<T>> {
        let mut ends = Vec::with_capacity(groups.len());
        let mut total = 0usize;
        for g in groups {
            total += g.len();
            ends.push(total);
        }
        let k = k.min(total);
        distinct_indices(total, k, rng)
            .into_iter()
            .map(|i| {
                let g = ends.partition_point(|&end| end <= i);
                let start = if g == 0 { 0 } else { ends[g - 1] };
                &self.entries[groups[g][i - start]]
            })
            .collect()
    }
}

/// `k ≤ n` distinct indices drawn uniformly from `0..n`, in the order drawn: a partial
/// Fisher-Yates shuffle whose swaps are kept in a map, so it costs O(k), not O(n).
pub(crate) fn distinct_indices(n: usize, k: usize, rng: &mut SeededRng) -> Vec<usize> {
    debug_assert!(k <= n);
    let mut swapped: HashMap<usize, usize> = HashMap::with_capacity(2 * k);
    let mut out = Vec::with_capacity(k);
    for i in 0..k {
        let j = i + rng.below(n - i).expect("i < k <= n");
        let at_j = *swapped.get(&j).unwrap_or(&j);
        let at_i = *swapped.get(&i).unwrap_or(&i);
        swapped.insert(j, at_i);
        out.push(at_j);
    }
    out
}
