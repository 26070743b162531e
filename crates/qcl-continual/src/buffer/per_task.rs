//! Per-task random sample: LifeQuant's replay set, a random fraction δ of each task's data.

use std::collections::{BTreeSet, HashSet};

use qcl_tensor::{Error, Result, Seed};

use super::store::Store;
use super::{
    delegate_to_store, BufferItem, Capacity, Entry, InsertStatus, Insertion, ItemId, ReplayBuffer,
};

/// How many items of a finished task a [`PerTaskBuffer`] keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keep {
    /// `round(δ·n)` of a task's `n` items (`f64::round`: halves away from zero), δ in (0, 1].
    Fraction(f64),
    /// `min(k, n)` of a task's `n` items, k ≥ 1.
    Count(usize),
}

impl Keep {
    /// How many of `n` items this rule keeps.
    pub fn of(self, n: usize) -> usize {
        match self {
            Keep::Fraction(delta) => ((delta * n as f64).round() as usize).min(n),
            Keep::Count(k) => k.min(n),
        }
    }

    fn validate(self) -> Result<()> {
        match self {
            Keep::Fraction(delta) if !(delta > 0.0 && delta <= 1.0) => Err(
                Error::invalid_parameter("delta", format!("need 0 < δ <= 1, got {delta}")),
            ),
            Keep::Count(0) => Err(Error::invalid_parameter(
                "count",
                "keeping 0 items per task stores nothing",
            )),
            _ => Ok(()),
        }
    }
}

/// What [`PerTaskBuffer::finish_task`] kept of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSummary {
    /// The task.
    pub task: usize,
    /// Items offered for it.
    pub offered: usize,
    /// Items the [`Keep`] rule selected.
    pub selected: usize,
    /// Ids of the items stored: the selection, cut short if the capacity ran out.
    pub kept: Vec<ItemId>,
}

/// LifeQuant's replay memory (docs/methods/lifequant.md § Lifelong class shift): of each task's
/// `n` items it keeps a uniformly random subset of [`Keep::of`]`(n)` items (δ = 0.2 in
/// LifeQuant), without replacement.
///
/// Items offered with [`ReplayBuffer::insert`] are *pending* (not yet sampleable) until their
/// task is finished, explicitly with [`PerTaskBuffer::finish_task`] or implicitly when an item
/// of another task is offered. The subset of task `t` is drawn from `seed.child(t)`, so it does
/// not depend on the other tasks. Selected items are stored in random order while they fit the
/// capacity; the rest of the selection is dropped (with a fixed item size this is still a
/// uniform subset). A finished task cannot receive more items. Pending items are held outside
/// the capacity (they are not replayable and at most one task's worth is pending).
///
/// ```
/// use qcl_continual::{Capacity, Filter, Keep, PerTaskBuffer, ReplayBuffer};
/// use qcl_tensor::Seed;
/// let mut buffer = PerTaskBuffer::new(Capacity::unbounded(), Keep::Fraction(0.2), Seed::new(123))?;
/// let task0 = (0..800u32).map(|i| (i % 5, vec![0u8; 784]));
/// let summary = buffer.add_task(0, task0)?;
/// assert_eq!((summary.offered, summary.kept.len()), (800, 160));
/// assert_eq!(buffer.len(), 160);
/// let replay = buffer.sample(10, &Filter::tasks_before(1), &mut Seed::new(0).rng());
/// assert_eq!(replay.len(), 10);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PerTaskBuffer<T> {
    store: Store<T>,
    capacity: Capacity,
    keep: Keep,
    seed: Seed,
    pending: Vec<Entry<T>>,
    pending_ids: HashSet<ItemId>,
    finished: BTreeSet<usize>,
}

impl<T: BufferItem> PerTaskBuffer<T> {
    /// An empty buffer keeping `keep` of each task, its subsets drawn from `seed`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a zero capacity, δ outside (0, 1] (or NaN), or a count
    /// of zero.
    pub fn new(capacity: Capacity, keep: Keep, seed: Seed) -> Result<Self> {
        capacity.validate()?;
        keep.validate()?;
        Ok(PerTaskBuffer {
            store: Store::default(),
            capacity,
            keep,
            seed,
            pending: Vec::new(),
            pending_ids: HashSet::new(),
            finished: BTreeSet::new(),
        })
    }

    /// The keep rule.
    pub fn keep(&self) -> Keep {
        self.keep
    }

    /// The task whose items are pending, if any.
    pub fn pending_task(&self) -> Option<usize> {
        self.pending.first().map(|e| e.task)
    }

    /// Number of pending items.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The tasks finished so far.
    pub fn finished_tasks(&self) -> &BTreeSet<usize> {
        &self.finished
    }

    /// Finishes the pending task: stores its random subset, drops the other pending items.
    /// Returns `None` if nothing is pending.
    ///
    /// # Errors
    /// None in practice; the signature leaves room for the random draw's checks.
    pub fn finish_task(&mut self) -> Result<Option<TaskSummary>> {
        let Some(task) = self.pending_task() else {
            return Ok(None);
        };
        let mut pending: Vec<Option<Entry<T>>> = std::mem::take(&mut self.pending)
            .into_iter()
            .map(Some)
            .collect();
        self.pending_ids.clear();
        self.finished.insert(task);
        let offered = pending.len();
        let selected = self.keep.of(offered);
        let mut rng = self.seed.child(task as u64).rng();
        let mut kept = Vec::with_capacity(selected);
        for index in rng.sample_indices(offered, selected)? {
            let entry = pending[index].take().expect("indices are distinct");
            let fits = self.capacity.fits(
                self.store.len() + 1,
                self.store.bytes() + entry.item.size_bytes(),
            );
            if !fits {
                break;
            }
            kept.push(entry.id);
            self.store.push(entry);
        }
        Ok(Some(TaskSummary {
            task,
            offered,
            selected,
            kept,
        }))
    }

    /// Offers all of a task's `(label, item)` pairs and finishes it (any other pending task is
    /// finished first).
    ///
    /// # Errors
    /// As [`ReplayBuffer::insert`]; on error, items offered before it stay pending.
    pub fn add_task<I>(&mut self, task: usize, items: I) -> Result<TaskSummary>
    where
        I: IntoIterator<Item = (u32, T)>,
    {
        if self.finished.contains(&task) {
            return Err(already_finished(task));
        }
        if self.pending_task().is_some_and(|t| t != task) {
            self.finish_task()?;
        }
        for (label, item) in items {
            self.insert(label, task, item)?;
        }
        match self.finish_task()? {
            Some(summary) => Ok(summary),
            None => {
                // An empty task: nothing to keep, but it is finished all the same.
                self.finished.insert(task);
                Ok(TaskSummary {
                    task,
                    offered: 0,
                    selected: 0,
                    kept: Vec::new(),
                })
            }
        }
    }
}

fn already_finished(task: usize) -> Error {
    Error::invalid_parameter(
        "task",
        format!("task {task} is already finished and cannot receive more items"),
    )
}

impl<T: BufferItem> PerTaskBuffer<T> {
    /// Adds an entry that passed the size check to its task's pending items (the body of
    /// [`ReplayBuffer::insert_with_id`]).
    fn insert_entry(&mut self, entry: Entry<T>) -> Result<Insertion<T>> {
        let (id, task) = (entry.id, entry.task);
        if self.finished.contains(&task) {
            return Err(already_finished(task));
        }
        if self.pending_ids.contains(&id) {
            return Err(Error::invalid_parameter(
                "id",
                format!("item id {} is already pending", id.0),
            ));
        }
        self.store.reserve_id(id)?;
        if self.pending_task().is_some_and(|t| t != task) {
            self.finish_task()?;
        }
        self.pending_ids.insert(id);
        self.pending.push(entry);
        Ok(Insertion {
            id,
            status: InsertStatus::Pending,
            evicted: Vec::new(),
        })
    }
}

impl<T: BufferItem> ReplayBuffer<T> for PerTaskBuffer<T> {
    delegate_to_store!(
        /// Adds the item to its task's pending items ([`InsertStatus::Pending`]), finishing the
        /// pending task first if it is another one.
        ///
        /// # Errors
        /// [`Error::InvalidParameter`] for an item larger than the byte capacity, an id already
        /// stored or pending, or a task already finished.
    );
}
