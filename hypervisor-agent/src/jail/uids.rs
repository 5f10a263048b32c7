//! The VMM uid pool: each live VMM process runs as a uid no other live VMM
//! has, so an escaped VMM cannot signal, trace or read another one.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

pub(super) struct UidPool {
    base: u32,
    size: u32,
    used: Arc<Mutex<BTreeSet<u32>>>,
}

impl UidPool {
    pub(super) fn new(base: u32, size: u32) -> Self {
        UidPool {
            base,
            size: size.max(1),
            used: Arc::new(Mutex::new(BTreeSet::new())),
        }
    }

    pub(super) fn size(&self) -> u32 {
        self.size
    }

    /// The lowest free uid, held until the lease is dropped.
    pub(super) fn take(&self) -> Option<UidLease> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let offset = (0..self.size).find(|o| !used.contains(o))?;
        used.insert(offset);
        Some(UidLease {
            uid: self.base + offset,
            offset,
            used: self.used.clone(),
        })
    }
}

pub(super) struct UidLease {
    uid: u32,
    offset: u32,
    used: Arc<Mutex<BTreeSet<u32>>>,
}

impl UidLease {
    pub(super) fn uid(&self) -> u32 {
        self.uid
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_unique_and_returned() {
        let pool = UidPool::new(1000, 2);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(pool.take().is_none(), "a pool of 2 hands out 2");
        let freed = a.uid();
        drop(a);
        assert_eq!(pool.take().unwrap().uid(), freed);
    }
}
