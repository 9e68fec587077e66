//! What the controller remembers about each Tidepool between reconciles,
//! in one place with one way to forget it (when the Tidepool is deleted):
//! its failures in a row (the retry backoff), the generation whose orphans
//! were last swept, and the web replicas whose change was last announced.
//! Everything here is a cache of this process: a restart starts empty and
//! at worst sweeps once more or announces a change again.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;

use crate::crd::Tidepool;

/// One Tidepool's entry.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Remembered {
    /// Reconciles that failed in a row (0 after a success).
    failures: u32,
    /// The generation whose orphans were last deleted.
    swept: Option<i64>,
    /// The web replicas whose change was last announced: a reconcile that
    /// runs on an object read before the last status write sees the same
    /// change again.
    announced: Option<u32>,
}

/// Every Tidepool's entry. A poisoned lock (a panic while holding it, which
/// nothing here does) reads as an empty memory.
#[derive(Debug, Default)]
pub struct Memory {
    entries: Mutex<HashMap<ObjectRef<Tidepool>, Remembered>>,
}

impl Memory {
    fn with<T>(&self, key: &ObjectRef<Tidepool>, update: impl FnOnce(&mut Remembered) -> T) -> Option<T> {
        let mut entries = self.entries.lock().ok()?;
        let entry = entries.entry(key.clone()).or_default();
        let result = update(entry);
        if *entry == Remembered::default() {
            entries.remove(key);
        }
        Some(result)
    }

    /// Counts a failure; how many in a row this makes.
    pub fn failed(&self, key: &ObjectRef<Tidepool>) -> u32 {
        self.with(key, |e| {
            e.failures = e.failures.saturating_add(1);
            e.failures
        })
        .unwrap_or(1)
    }

    /// A success ends the run of failures.
    pub fn succeeded(&self, key: &ObjectRef<Tidepool>) {
        self.with(key, |e| e.failures = 0);
    }

    /// Whether `generation`'s orphans are still to be swept.
    pub fn needs_sweep(&self, key: &ObjectRef<Tidepool>, generation: i64) -> bool {
        self.with(key, |e| e.swept != Some(generation)).unwrap_or(true)
    }

    /// `generation`'s orphans are gone.
    pub fn swept(&self, key: &ObjectRef<Tidepool>, generation: i64) {
        self.with(key, |e| e.swept = Some(generation));
    }

    /// Records that the web replicas are now `replicas`; whether that is
    /// news (not the change last announced).
    pub fn announce(&self, key: &ObjectRef<Tidepool>, replicas: u32) -> bool {
        self.with(key, |e| e.announced.replace(replicas) != Some(replicas)).unwrap_or(true)
    }

    /// Forgets the Tidepool (it was deleted).
    pub fn forget(&self, key: &ObjectRef<Tidepool>) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(key);
        }
    }

    /// How many Tidepools have an entry.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().map_or(0, |entries| entries.len())
    }

    /// Whether no Tidepool has an entry.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectRef<Tidepool> {
        ObjectRef::new(name).within("ns")
    }

    #[test]
    fn failures_count_in_a_row_until_a_success() {
        let memory = Memory::default();
        assert_eq!([memory.failed(&key("a")), memory.failed(&key("a")), memory.failed(&key("b"))], [1, 2, 1]);
        memory.succeeded(&key("a"));
        assert_eq!(memory.failed(&key("a")), 1);
    }

    #[test]
    fn a_generation_is_swept_once() {
        let memory = Memory::default();
        assert!(memory.needs_sweep(&key("a"), 3));
        memory.swept(&key("a"), 3);
        assert!(!memory.needs_sweep(&key("a"), 3));
        assert!(memory.needs_sweep(&key("a"), 4), "a new spec may drop children");
    }

    #[test]
    fn a_change_is_announced_once() {
        let memory = Memory::default();
        assert!(memory.announce(&key("a"), 3));
        assert!(!memory.announce(&key("a"), 3));
        assert!(memory.announce(&key("a"), 4));
    }

    #[test]
    fn forgetting_a_tidepool_leaves_nothing_of_it() {
        let memory = Memory::default();
        memory.failed(&key("a"));
        memory.swept(&key("a"), 1);
        memory.announce(&key("a"), 2);
        memory.failed(&key("b"));
        memory.forget(&key("a"));
        assert_eq!(memory.len(), 1);
        assert!(memory.needs_sweep(&key("a"), 1));
        memory.succeeded(&key("b"));
        assert!(memory.is_empty(), "an entry back at its defaults is dropped");
    }
}
