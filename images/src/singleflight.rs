//! One async lock per key (a blob digest, an image reference, a disk), so
//! concurrent requests for the same thing do the work once: the first
//! caller does it while holding the key's lock, the others wait for the
//! lock and then find the result in the cache. Entries are dropped when
//! their last holder lets go, so the map only holds keys in use.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

pub(crate) struct KeyedLocks<K> {
    map: Arc<Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>>,
}

/// Holds one key's lock; dropping it releases the lock.
pub(crate) struct KeyGuard<K: Eq + Hash> {
    map: Arc<Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>>,
    key: K,
    // Dropped before the entry cleanup in `Drop` runs (fields drop after
    // the `drop` body, so it is taken out explicitly there).
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    pub(crate) fn new() -> Self {
        KeyedLocks {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Waits for the key's lock. Cancel-safe: a caller dropped while
    /// waiting leaves nothing held.
    pub(crate) async fn lock(&self, key: K) -> KeyGuard<K> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        KeyGuard {
            map: self.map.clone(),
            key,
            guard: Some(guard),
        }
    }

    /// Keys currently held or waited for (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<K: Eq + Hash> Drop for KeyGuard<K> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.guard.take());
        // Only the map holds the mutex now: no one waits, forget the key.
        // (Waiters hold a clone of the Arc, so they keep it alive.)
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn one_at_a_time_per_key_and_cleaned_up() {
        let locks = Arc::new(KeyedLocks::new());
        let inside = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside) = (locks.clone(), inside.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock("k".to_string()).await;
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                tokio::task::yield_now().await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(locks.len(), 0);
        // Different keys do not wait for each other.
        let a = locks.lock("a".to_string()).await;
        let b = locks.lock("b".to_string()).await;
        assert_eq!(locks.len(), 2);
        drop((a, b));
        assert_eq!(locks.len(), 0);
    }
}
