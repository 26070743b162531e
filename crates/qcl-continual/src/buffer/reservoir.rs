//! Reservoir sampling (Vitter 1985, algorithm R) with a capacity in items and bytes.

use qcl_tensor::{Result, Seed, SeededRng};

use super::store::Store;
use super::{
    delegate_to_store, BufferItem, Capacity, Entry, InsertStatus, Insertion, ReplayBuffer,
};

/// A reservoir: a uniform random sample of everything offered so far.
///
/// The `n`-th offered item is stored if it fits; otherwise `j` is drawn uniformly from `0..n`
/// and, if `j` is below the number of stored entries, the entry in slot `j` is evicted (then
/// further uniformly random entries while the new item still does not fit) and the new item
/// stored; else the new item is rejected. With a fixed item size this is exactly algorithm R
/// (Vitter 1985), and every offered item is held with probability `capacity / n`; with varying
/// sizes it stays unbiased in which entries are evicted, but the number held varies.
///
/// ```
/// use qcl_continual::{Capacity, Filter, ReplayBuffer, ReservoirBuffer};
/// use qcl_tensor::Seed;
/// // 10 images of 784 bytes fit in 7,840 bytes.
/// let mut buffer = ReservoirBuffer::new(Capacity::bytes(7_840), Seed::new(1))?;
/// for i in 0..100u32 {
///     buffer.insert(i % 10, 0, vec![0u8; 784])?;
/// }
/// assert_eq!(buffer.len(), 10);
/// assert_eq!(buffer.bytes_used(), 7_840);
/// assert_eq!(buffer.seen(), 100);
/// let batch = buffer.sample(4, &Filter::all(), &mut Seed::new(2).rng());
/// assert_eq!(batch.len(), 4);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ReservoirBuffer<T> {
    store: Store<T>,
    capacity: Capacity,
    seen: u64,
    rng: SeededRng,
}

impl<T: BufferItem> ReservoirBuffer<T> {
    /// An empty reservoir whose random choices come from `seed`.
    ///
    /// # Errors
    /// [`qcl_tensor::Error::InvalidParameter`] for a zero capacity.
    pub fn new(capacity: Capacity, seed: Seed) -> Result<Self> {
        capacity.validate()?;
        Ok(ReservoirBuffer {
            store: Store::default(),
            capacity,
            seen: 0,
            rng: seed.rng(),
        })
    }

    /// Number of items offered so far (the `n` of algorithm R), stored or not.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Changes the capacity, evicting uniformly random entries until the buffer fits; returns
    /// them.
    ///
    /// # Errors
    /// [`qcl_tensor::Error::InvalidParameter`] for a zero capacity (the buffer is unchanged).
    pub fn set_capacity(&mut self, capacity: Capacity) -> Result<Vec<Entry<T>>> {
        capacity.validate()?;
        self.capacity = capacity;
        let mut evicted = Vec::new();
        while !capacity.fits(self.store.len(), self.store.bytes()) {
            evicted.extend(self.store.remove_random(&mut self.rng));
        }
        Ok(evicted)
    }

    /// Offers an entry that passed the size check to the reservoir (the body of
    /// [`ReplayBuffer::insert_with_id`]).
    fn insert_entry(&mut self, entry: Entry<T>) -> Result<Insertion<T>> {
        let id = entry.id;
        let size = entry.item.size_bytes();
        self.store.reserve_id(id)?;
        self.seen += 1;
        let capacity = self.capacity;
        let fits = |store: &Store<T>| capacity.fits(store.len() + 1, store.bytes() + size);
        if fits(&self.store) {
            self.store.push(entry);
            return Ok(Insertion {
                id,
                status: InsertStatus::Stored,
                evicted: Vec::new(),
            });
        }
        // `seen` counts offers, so it fits in usize wherever the offers were made.
        let j = self.rng.below(self.seen as usize)?;
        if j >= self.store.len() {
            return Ok(Insertion {
                id,
                status: InsertStatus::Rejected,
                evicted: vec![entry],
            });
        }
        let mut evicted = vec![self.store.remove_slot(j)];
        // Only with varying sizes: the new item can need more room than the one it replaced.
        while !fits(&self.store) {
            evicted.extend(self.store.remove_random(&mut self.rng));
        }
        self.store.push(entry);
        Ok(Insertion {
            id,
            status: InsertStatus::Stored,
            evicted,
        })
    }
}

impl<T: BufferItem> ReplayBuffer<T> for ReservoirBuffer<T> {
    delegate_to_store!();
}
