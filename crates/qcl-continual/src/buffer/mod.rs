//! Replay buffers with a capacity in items and in bytes.
//!
//! Three policies share one storage and one trait, [`ReplayBuffer`]:
//!
//! - [`ReservoirBuffer`]: reservoir sampling (Vitter 1985, algorithm R): after `n` offers each
//!   item is held with probability `capacity / n`.
//! - [`ClassBalancedBuffer`]: stores every item, then evicts a random item of the class with the
//!   most items until the buffer fits (AQM's adaptive memory, one item at a time).
//! - [`PerTaskBuffer`]: keeps a seeded random fraction δ (or a fixed count) of each finished
//!   task (LifeQuant's replay set `R_t`).
//!
//! A buffer is generic over what it stores: anything implementing [`BufferItem`], which reports
//! the item's size in bytes (raw `u8` images now, compressed codes of varying sizes later).
//! **Byte accounting** charges each entry exactly `item.size_bytes()`; the id, label and task
//! kept with it, and the buffer's index structures, are not charged (AQM charges the payload only).
//!
//! Every entry has a stable [`ItemId`]: fresh ids are handed out in increasing order and never
//! reused, and the label and task stored with an id never change. Replay batches are drawn
//! with a [`Filter`] on classes and tasks, either uniformly over the admitted items
//! ([`ReplayBuffer::sample`]) or uniformly over the admitted classes
//! ([`ReplayBuffer::sample_class_balanced`], AQM §4.4).
//!
//! Insertion, removal by id and eviction cost O(1) apart from O(log G) map look-ups in the
//! number G of (class, task) groups (and, for class-balanced eviction, a scan of the classes);
//! sampling `k` items costs O(k log G + G).
//!
//! **Tensors.** A buffer of candle `Tensor`s (each charged its elements × dtype size) draws
//! training batches directly: [`ReplayBuffer::sample_batch`] returns the drawn items stacked
//! into one tensor and their labels as a `u32` tensor.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qcl_continual::{Capacity, Filter, ReplayBuffer, ReservoirBuffer};
//! use qcl_tensor::Seed;
//! let mut buffer = ReservoirBuffer::new(Capacity::bytes(64 * 16), Seed::new(0))?;
//! for i in 0..100u32 {
//!     let x = Tensor::full(i as f32, 4, &Device::Cpu)?; // one feature vector [4]
//!     buffer.insert(i % 3, 0, x)?;
//! }
//! assert_eq!(buffer.len(), 64); // 64 items of 16 bytes
//! let (x, y) = buffer.sample_batch(8, &Filter::all(), &mut Seed::new(1).rng())?;
//! assert_eq!((x.dims(), y.dims()), (&[8, 4][..], &[8][..]));
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

use std::collections::BTreeMap;

use candle_core::Tensor;
use qcl_tensor::{Error, Result, SeededRng};

mod class_balanced;
mod per_task;
mod reservoir;
mod store;

pub use class_balanced::ClassBalancedBuffer;
pub use per_task::{Keep, PerTaskBuffer, TaskSummary};
pub use reservoir::ReservoirBuffer;

/// Something a buffer can store: it knows its size in bytes.
///
/// Implement it for your own payloads (compressed codes, feature vectors); the size is what the
/// buffer's byte capacity is charged for the item, and must not change while it is stored.
///
/// ```
/// use qcl_continual::BufferItem;
/// struct Codes { packed: Vec<u8> }
/// impl BufferItem for Codes {
///     fn size_bytes(&self) -> usize { self.packed.len() }
/// }
/// assert_eq!(Codes { packed: vec![0; 98] }.size_bytes(), 98);
/// assert_eq!(vec![0u8; 784].size_bytes(), 784);
/// ```
pub trait BufferItem {
    /// The bytes this item is charged in a buffer's byte capacity.
    fn size_bytes(&self) -> usize;
}

impl BufferItem for Vec<u8> {
    fn size_bytes(&self) -> usize {
        self.len()
    }
}

impl BufferItem for Box<[u8]> {
    fn size_bytes(&self) -> usize {
        self.len()
    }
}

impl BufferItem for Vec<f32> {
    fn size_bytes(&self) -> usize {
        std::mem::size_of_val(self.as_slice())
    }
}

/// A candle tensor, charged its elements × the dtype's size: the payload of a compact tensor.
///
/// A view into a larger tensor (`x.get(i)`, `x.narrow(..)`) shares, and keeps alive, that
/// tensor's whole storage; store `force_contiguous()` copies when the byte capacity must bound
/// the memory actually held.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use qcl_continual::BufferItem;
/// assert_eq!(Tensor::zeros((3, 28, 28), DType::F32, &Device::Cpu)?.size_bytes(), 3 * 784 * 4);
/// assert_eq!(Tensor::zeros(784, DType::U8, &Device::Cpu)?.size_bytes(), 784);
/// # Ok::<(), candle_core::Error>(())
/// ```
impl BufferItem for Tensor {
    fn size_bytes(&self) -> usize {
        self.elem_count() * self.dtype().size_in_bytes()
    }
}

/// Drawn entries as one batch: their items stacked along a new first axis, their labels
/// `u32 [k]`, both on the items' device.
///
/// # Errors
/// [`Error::EmptyInput`] for no entries; [`Error::ShapeMismatch`] / [`Error::DTypeMismatch`]
/// naming the first item whose shape or dtype differs from the first one's;
/// [`Error::InvalidParameter`] for items on different devices.
pub fn stack_entries<T: AsRef<Tensor>>(entries: &[&Entry<T>]) -> Result<(Tensor, Tensor)> {
    let Some(first) = entries.first() else {
        return Err(Error::EmptyInput(
            "no stored entry admitted by the filter, so no replay batch".into(),
        ));
    };
    let reference = first.item.as_ref();
    let mut items = Vec::with_capacity(entries.len());
    for entry in entries {
        let item = entry.item.as_ref();
        let context = || format!("replay item {} (label {})", entry.id.0, entry.label);
        if item.dims() != reference.dims() {
            return Err(Error::ShapeMismatch {
                context: context(),
                expected: format!("{:?}, the shape of item {}", reference.dims(), first.id.0),
                actual: item.dims().to_vec(),
            });
        }
        if item.dtype() != reference.dtype() {
            return Err(Error::DTypeMismatch {
                context: context(),
                expected: reference.dtype(),
                actual: item.dtype(),
            });
        }
        if !item.device().same_device(reference.device()) {
            return Err(Error::invalid_parameter(
                "replay items",
                format!(
                    "{} is on {:?}, item {} on {:?}",
                    context(),
                    item.device(),
                    first.id.0,
                    reference.device()
                ),
            ));
        }
        items.push(item);
    }
    let labels: Vec<u32> = entries.iter().map(|e| e.label).collect();
    let labels = Tensor::from_vec(labels, entries.len(), reference.device())?;
    Ok((Tensor::stack(&items, 0)?, labels))
}

/// A raw `u8` image (any layout, NCHW for qcl's data sets), charged one byte per value.
///
/// ```
/// use qcl_continual::{BufferItem, RawImage};
/// let image = RawImage::new(vec![0u8; 28 * 28]);
/// assert_eq!(image.size_bytes(), 784);
/// assert_eq!(image.pixels().len(), 784);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawImage(pub Vec<u8>);

impl RawImage {
    /// An image holding these pixel values.
    pub fn new(pixels: Vec<u8>) -> Self {
        RawImage(pixels)
    }

    /// The pixel values.
    pub fn pixels(&self) -> &[u8] {
        &self.0
    }
}

impl BufferItem for RawImage {
    fn size_bytes(&self) -> usize {
        self.0.len()
    }
}

/// A stable item id, unique within a buffer for its whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId(pub u64);

/// One stored item with its id, class label and task.
///
/// Buffers hand out entries only by shared reference (or by value once removed), so the label
/// and task stored with an id cannot change while it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<T> {
    /// The item's stable id.
    pub id: ItemId,
    /// Its class label.
    pub label: u32,
    /// The task it came from.
    pub task: usize,
    /// The payload.
    pub item: T,
}

/// How much a buffer may hold: at most `max_items` entries and at most `max_bytes` bytes of
/// payload; `None` leaves that dimension unbounded.
///
/// ```
/// use qcl_continual::Capacity;
/// let budget = Capacity::bytes(392_000); // AQM's B50 on Fashion-MNIST
/// assert!(budget.fits(500, 392_000));
/// assert!(!budget.fits(501, 392_001));
/// assert!(Capacity::items(0).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    /// The most entries the buffer may hold.
    pub max_items: Option<usize>,
    /// The most payload bytes the buffer may hold.
    pub max_bytes: Option<usize>,
}

impl Capacity {
    /// At most `max_items` entries, any size.
    pub fn items(max_items: usize) -> Self {
        Capacity {
            max_items: Some(max_items),
            max_bytes: None,
        }
    }

    /// At most `max_bytes` bytes, any number of entries.
    pub fn bytes(max_bytes: usize) -> Self {
        Capacity {
            max_items: None,
            max_bytes: Some(max_bytes),
        }
    }

    /// Both limits.
    pub fn new(max_items: usize, max_bytes: usize) -> Self {
        Capacity {
            max_items: Some(max_items),
            max_bytes: Some(max_bytes),
        }
    }

    /// No limit (useful for [`PerTaskBuffer`], whose size δ already fixes).
    pub fn unbounded() -> Self {
        Capacity::default()
    }

    /// Whether `items` entries of `bytes` bytes in total fit.
    pub fn fits(&self, items: usize, bytes: usize) -> bool {
        self.max_items.is_none_or(|m| items <= m) && self.max_bytes.is_none_or(|m| bytes <= m)
    }

    /// Checks that the capacity can hold something.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a zero item or byte limit.
    pub fn validate(&self) -> Result<()> {
        if self.max_items == Some(0) {
            return Err(Error::invalid_parameter(
                "capacity.max_items",
                "a buffer capacity of zero items can hold nothing",
            ));
        }
        if self.max_bytes == Some(0) {
            return Err(Error::invalid_parameter(
                "capacity.max_bytes",
                "a buffer capacity of zero bytes can hold nothing",
            ));
        }
        Ok(())
    }

    /// Checks that one item of `size` bytes fits in an empty buffer.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if `size > max_bytes`: a buffer capacity smaller than one item.
    pub fn check_item(&self, size: usize) -> Result<()> {
        match self.max_bytes {
            Some(max) if size > max => Err(Error::invalid_parameter(
                "item",
                format!(
                    "a buffer capacity smaller than one item: the item has {size} bytes, \
                     the capacity {max} bytes"
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Which entries a replay batch may be drawn from: those whose class is in `classes` and whose
/// task is in `tasks` (`None`: any).
///
/// ```
/// use qcl_continual::Filter;
/// let old = Filter::tasks_before(2); // replay while learning task 2
/// assert!(old.admits(7, 1) && !old.admits(7, 2));
/// assert!(Filter::classes([3, 4]).admits(4, 9));
/// assert!(Filter::all().admits(0, 0));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    /// Admitted class labels; `None` admits every class.
    pub classes: Option<Vec<u32>>,
    /// Admitted tasks; `None` admits every task.
    pub tasks: Option<Vec<usize>>,
}

impl Filter {
    /// Admits every entry.
    pub fn all() -> Self {
        Filter::default()
    }

    /// Admits entries of these classes.
    pub fn classes(classes: impl IntoIterator<Item = u32>) -> Self {
        Filter::all().with_classes(classes)
    }

    /// Admits entries of these tasks.
    pub fn tasks(tasks: impl IntoIterator<Item = usize>) -> Self {
        Filter::all().with_tasks(tasks)
    }

    /// Admits entries of tasks `0..task`: the replay of earlier tasks while `task` is learned.
    pub fn tasks_before(task: usize) -> Self {
        Filter::tasks(0..task)
    }

    /// This filter restricted to these classes.
    pub fn with_classes(mut self, classes: impl IntoIterator<Item = u32>) -> Self {
        self.classes = Some(classes.into_iter().collect());
        self
    }

    /// This filter restricted to these tasks.
    pub fn with_tasks(mut self, tasks: impl IntoIterator<Item = usize>) -> Self {
        self.tasks = Some(tasks.into_iter().collect());
        self
    }

    /// Whether an entry of class `label` from task `task` may be drawn.
    pub fn admits(&self, label: u32, task: usize) -> bool {
        self.classes.as_ref().is_none_or(|c| c.contains(&label))
            && self.tasks.as_ref().is_none_or(|t| t.contains(&task))
    }
}

/// What happened to an offered item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertStatus {
    /// The item is in the buffer.
    Stored,
    /// The item was not kept (a reservoir's coin, or it was itself the one evicted); it is the
    /// last entry of [`Insertion::evicted`].
    Rejected,
    /// The item waits for the end of its task ([`PerTaskBuffer`]); it is not yet in the buffer.
    Pending,
}

/// The result of offering one item to a buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Insertion<T> {
    /// The id given to the item. It is used up even if the item was rejected.
    pub id: ItemId,
    /// Whether the item was stored.
    pub status: InsertStatus,
    /// Every entry that left the buffer to make room, and the offered item itself if it was
    /// rejected, so that no payload is lost silently.
    pub evicted: Vec<Entry<T>>,
}

/// What every replay buffer offers.
///
/// `sample` and `sample_class_balanced` **clamp**: asking for more items than the filter admits
/// returns all admitted items (an empty batch if none), never an error, because a replay batch
/// smaller than asked for is normal early in a stream (AQM §4.4 step 4).
pub trait ReplayBuffer<T: BufferItem> {
    /// Offers an item under a fresh id (see [`ReplayBuffer::insert_with_id`]).
    ///
    /// # Errors
    /// As [`ReplayBuffer::insert_with_id`].
    fn insert(&mut self, label: u32, task: usize, item: T) -> Result<Insertion<T>> {
        let id = self.next_id();
        self.insert_with_id(id, label, task, item)
    }

    /// Offers an item under a caller-chosen id (to move an item between buffers without
    /// changing its identity); later fresh ids are allocated above it.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the item alone is larger than the byte capacity ("a buffer
    /// capacity smaller than one item"), or `id` is already in the buffer (or `u64::MAX`);
    /// the buffer is unchanged then.
    fn insert_with_id(
        &mut self,
        id: ItemId,
        label: u32,
        task: usize,
        item: T,
    ) -> Result<Insertion<T>>;

    /// Offers every `(label, task, item)` in order; returns every entry evicted or rejected.
    ///
    /// # Errors
    /// The first error of [`ReplayBuffer::insert`]; the items before it stay offered.
    fn extend<I>(&mut self, items: I) -> Result<Vec<Entry<T>>>
    where
        Self: Sized,
        I: IntoIterator<Item = (u32, usize, T)>,
    {
        let mut evicted = Vec::new();
        for (label, task, item) in items {
            evicted.extend(self.insert(label, task, item)?.evicted);
        }
        Ok(evicted)
    }

    /// The id the next [`ReplayBuffer::insert`] will give.
    fn next_id(&self) -> ItemId;

    /// The stored entries, in no particular order.
    fn entries(&self) -> &[Entry<T>];

    /// An iterator over the stored entries.
    fn iter(&self) -> std::slice::Iter<'_, Entry<T>> {
        self.entries().iter()
    }

    /// Number of stored entries.
    fn len(&self) -> usize {
        self.entries().len()
    }

    /// Whether nothing is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sum of `size_bytes()` over the stored entries.
    fn bytes_used(&self) -> usize;

    /// The buffer's capacity.
    fn capacity(&self) -> Capacity;

    /// The entry with this id, if stored.
    fn get(&self, id: ItemId) -> Option<&Entry<T>>;

    /// Whether an entry with this id is stored.
    fn contains(&self, id: ItemId) -> bool {
        self.get(id).is_some()
    }

    /// Removes and returns the entry with this id, if stored.
    fn remove(&mut self, id: ItemId) -> Option<Entry<T>>;

    /// `n` distinct entries drawn uniformly among those `filter` admits (all of them if fewer),
    /// in the order drawn.
    fn sample(&self, n: usize, filter: &Filter, rng: &mut SeededRng) -> Vec<&Entry<T>>;

    /// AQM's class-balanced replay (§4.4, §12.11): `n` labels drawn uniformly with replacement
    /// among the classes with an admitted entry, then for each class that many distinct
    /// admitted entries of it (fewer if it has fewer), so the batch may be smaller than `n`.
    /// Entries come grouped by class, classes in ascending order.
    fn sample_class_balanced(
        &self,
        n: usize,
        filter: &Filter,
        rng: &mut SeededRng,
    ) -> Vec<&Entry<T>>;

    /// [`sample`](ReplayBuffer::sample) as one batch, for buffers of tensors: the drawn items
    /// stacked along a new first axis (`[k, ..item shape]`) and their labels `u32 [k]`, with
    /// `k = min(n, admitted)`.
    ///
    /// # Errors
    /// As [`stack_entries`]: [`Error::EmptyInput`] when the filter admits nothing (an empty
    /// buffer), typed errors for items of differing shapes, dtypes or devices.
    fn sample_batch(
        &self,
        n: usize,
        filter: &Filter,
        rng: &mut SeededRng,
    ) -> Result<(Tensor, Tensor)>
    where
        T: AsRef<Tensor>,
    {
        stack_entries(&self.sample(n, filter, rng))
    }

    // The signature repeats `sample_batch`'s: two public methods, one per sampling rule.
    /// [`sample_class_balanced`](ReplayBuffer::sample_class_balanced) as one batch (see
    /// [`sample_batch`](ReplayBuffer::sample_batch)).
    ///
    /// # Errors
    /// As [`sample_batch`](ReplayBuffer::sample_batch).
    fn sample_class_balanced_batch(
        &self,
        n: usize,
        filter: &Filter,
        rng: &mut SeededRng,
    ) -> Result<(Tensor, Tensor)>
    where
        T: AsRef<Tensor>,
    {
        stack_entries(&self.sample_class_balanced(n, filter, rng))
    }

    /// Number of stored entries per class (classes with none are absent).
    fn class_counts(&self) -> &BTreeMap<u32, usize>;

    /// Number of stored entries per task (tasks with none are absent).
    fn task_counts(&self) -> BTreeMap<usize, usize>;
}

/// Implements [`ReplayBuffer`] for a buffer type with `store: Store<T>` and `capacity: Capacity`
/// fields and an inherent `fn insert_entry(&mut self, entry: Entry<T>) -> Result<Insertion<T>>`:
/// `insert_with_id` checks the item's size against the capacity, then hands the new entry to
/// `insert_entry`; the other methods delegate to `store`. Doc comments passed in document
/// `insert_with_id`.
macro_rules! delegate_to_store {
    ($(#[$insert_doc:meta])*) => {
        $(#[$insert_doc])*
        fn insert_with_id(
            &mut self,
            id: $crate::buffer::ItemId,
            label: u32,
            task: usize,
            item: T,
        ) -> qcl_tensor::Result<$crate::buffer::Insertion<T>> {
            self.capacity.check_item(item.size_bytes())?;
            self.insert_entry($crate::buffer::Entry {
                id,
                label,
                task,
                item,
            })
        }

        fn next_id(&self) -> $crate::buffer::ItemId {
            self.store.next_id()
        }

        fn entries(&self) -> &[$crate::buffer::Entry<T>] {
            self.store.entries()
        }

        fn bytes_used(&self) -> usize {
            self.store.bytes()
        }

        fn capacity(&self) -> $crate::buffer::Capacity {
            self.capacity
        }

        fn get(&self, id: $crate::buffer::ItemId) -> Option<&$crate::buffer::Entry<T>> {
            self.store.get(id)
        }

        fn contains(&self, id: $crate::buffer::ItemId) -> bool {
            self.store.contains(id)
        }

        fn remove(&mut self, id: $crate::buffer::ItemId) -> Option<$crate::buffer::Entry<T>> {
            self.store.remove(id)
        }

        fn sample(
            &self,
            n: usize,
            filter: &$crate::buffer::Filter,
            rng: &mut qcl_tensor::SeededRng,
        ) -> Vec<&$crate::buffer::Entry<T>> {
            self.store.sample(n, filter, rng)
        }

        fn sample_class_balanced(
            &self,
            n: usize,
            filter: &$crate::buffer::Filter,
            rng: &mut qcl_tensor::SeededRng,
        ) -> Vec<&$crate::buffer::Entry<T>> {
            self.store.sample_class_balanced(n, filter, rng)
        }

        fn class_counts(&self) -> &std::collections::BTreeMap<u32, usize> {
            self.store.class_counts()
        }

        fn task_counts(&self) -> std::collections::BTreeMap<usize, usize> {
            self.store.task_counts()
        }
    };
}
use delegate_to_store;
