//! Class-balanced buffer: AQM's eviction from the largest class.

use qcl_tensor::{Result, Seed, SeededRng};

use super::store::Store;
use super::{
    delegate_to_store, BufferItem, Capacity, Entry, InsertStatus, Insertion, ReplayBuffer,
};

/// A buffer that stores every offered item, then, while it is over capacity, evicts a uniformly
/// random entry of the class with the **most entries** (counted in entries, not bytes; ties
/// between classes broken uniformly at random). This is AQM's eviction rule (§4.3, one item at
/// a time): a class is never emptied while another class holds more than one entry, and the
/// byte overshoot left after eviction is below one item.
///
/// ```
/// use qcl_continual::{Capacity, ClassBalancedBuffer, ReplayBuffer};
/// use qcl_tensor::Seed;
/// let mut buffer = ClassBalancedBuffer::new(Capacity::items(6), Seed::new(3))?;
/// // A stream dominated by class 0: the buffer still ends with 2 of each class.
/// for i in 0..30u32 {
///     let label = if i < 20 { 0 } else { 1 + i % 2 };
///     buffer.insert(label, 0, vec![i as u8; 4])?;
/// }
/// assert_eq!(buffer.class_counts().values().copied().collect::<Vec<_>>(), [2, 2, 2]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClassBalancedBuffer<T> {
    store: Store<T>,
    capacity: Capacity,
    rng: SeededRng,
}

impl<T: BufferItem> ClassBalancedBuffer<T> {
    /// An empty buffer whose random choices come from `seed`.
    ///
    /// # Errors
    /// [`qcl_tensor::Error::InvalidParameter`] for a zero capacity.
    pub fn new(capacity: Capacity, seed: Seed) -> Result<Self> {
        capacity.validate()?;
        Ok(ClassBalancedBuffer {
            store: Store::default(),
            capacity,
            rng: seed.rng(),
        })
    }

    /// Changes the capacity (AQM's budget shrinks when a module freezes), evicting by the
    /// class-balanced rule until the buffer fits; returns the evicted entries.
    ///
    /// # Errors
    /// [`qcl_tensor::Error::InvalidParameter`] for a zero capacity (the buffer is unchanged).
    pub fn set_capacity(&mut self, capacity: Capacity) -> Result<Vec<Entry<T>>> {
        capacity.validate()?;
        self.capacity = capacity;
        Ok(self.evict_to_fit())
    }

    fn evict_to_fit(&mut self) -> Vec<Entry<T>> {
        let mut evicted = Vec::new();
        while !self.capacity.fits(self.store.len(), self.store.bytes()) {
            evicted.extend(self.store.remove_from_largest_class(&mut self.rng));
        }
        evicted
    }

    /// Stores an offered entry that passed the size check, then evicts by the class-balanced
    /// rule until the buffer fits (the body of [`ReplayBuffer::insert_with_id`]).
    fn insert_entry(&mut self, entry: Entry<T>) -> Result<Insertion<T>> {
        let id = entry.id;
        self.store.reserve_id(id)?;
        self.store.push(entry);
        let mut evicted = self.evict_to_fit();
        let status = match evicted.iter().position(|e| e.id == id) {
            Some(pos) => {
                // The offered item goes last, as `InsertStatus::Rejected` promises.
                let own = evicted.remove(pos);
                evicted.push(own);
                InsertStatus::Rejected
            }
            None => InsertStatus::Stored,
        };
        Ok(Insertion {
            id,
            status,
            evicted,
        })
    }
}

impl<T: BufferItem> ReplayBuffer<T> for ClassBalancedBuffer<T> {
    delegate_to_store!();
}
