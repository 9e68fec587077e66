//! Tidepools that share a database server, and what they plan together.
//!
//! Each Tidepool plans its own budget (`maxConnections − reserved`), but
//! several pointing at one server draw on the same `max_connections`. The
//! controller records each one's planned peak under its server (host and
//! port from its Secret, kept in memory only: they are Secret values) and
//! reports an over-commit in the `ConnectionBudget` condition of every one
//! of them. Pure: tested without an API server.

use std::collections::BTreeMap;

/// A Tidepool: namespace and name.
pub type Key = (String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    server: String,
    planned_peak: u32,
}

/// What the Tidepools on one server plan together, seen from one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Together {
    pub total: u64,
    /// The others on the same server and their planned peaks.
    pub others: Vec<(Key, u32)>,
}

#[derive(Debug, Default)]
pub struct ServerIndex {
    entries: BTreeMap<Key, Entry>,
}

impl ServerIndex {
    /// Records `key`'s planned peak on `server`. Returns the other
    /// Tidepools whose sum changed (on the old and the new server), to be
    /// reconciled again; none when nothing changed.
    pub fn record(&mut self, key: &Key, server: &str, planned_peak: u32) -> Vec<Key> {
        let entry = Entry { server: server.to_owned(), planned_peak };
        match self.entries.insert(key.clone(), entry.clone()) {
            Some(old) if old == entry => Vec::new(),
            Some(old) if old.server != server => {
                let mut affected = self.mates(key, &old.server);
                affected.extend(self.mates(key, server));
                affected
            }
            _ => self.mates(key, server),
        }
    }

    /// Forgets `key` (deleted); returns the Tidepools left on its server.
    pub fn remove(&mut self, key: &Key) -> Vec<Key> {
        match self.entries.remove(key) {
            Some(old) => self.mates(key, &old.server),
            None => Vec::new(),
        }
    }

    /// `key`'s server total, if it is recorded, over the Tidepools that
    /// still exist (`alive`: a deletion missed while a watch was down must
    /// not count forever).
    pub fn together(&self, key: &Key, alive: impl Fn(&Key) -> bool) -> Option<Together> {
        let server = &self.entries.get(key)?.server;
        let mut total = 0u64;
        let mut others = Vec::new();
        for (other, entry) in &self.entries {
            if &entry.server == server && (other == key || alive(other)) {
                total += u64::from(entry.planned_peak);
                if other != key {
                    others.push((other.clone(), entry.planned_peak));
                }
            }
        }
        Some(Together { total, others })
    }

    fn mates(&self, key: &Key, server: &str) -> Vec<Key> {
        self.entries.iter().filter(|(k, e)| *k != key && e.server == server).map(|(k, _)| k.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        ("shop".to_owned(), name.to_owned())
    }

    #[test]
    fn tidepools_on_one_server_are_summed_and_told_of_each_other() {
        let mut index = ServerIndex::default();
        assert!(index.record(&key("a"), "db:5432", 60).is_empty());
        assert_eq!(index.record(&key("b"), "db:5432", 50), vec![key("a")]);
        assert!(index.record(&key("c"), "other:5432", 70).is_empty());
        let all = |_: &Key| true;
        assert_eq!(
            index.together(&key("a"), all),
            Some(Together { total: 110, others: vec![(key("b"), 50)] })
        );
        assert_eq!(index.together(&key("c"), all).map(|t| t.total), Some(70));
        assert_eq!(
            index.together(&key("a"), |k: &Key| k != &key("b")).map(|t| t.total),
            Some(60),
            "b is gone"
        );
        assert!(index.record(&key("b"), "db:5432", 50).is_empty(), "no change, nobody to tell");
        assert_eq!(index.record(&key("b"), "other:5432", 50), vec![key("a"), key("c")]);
        assert_eq!(index.together(&key("a"), all).map(|t| t.total), Some(60));
        assert_eq!(index.remove(&key("c")), vec![key("b")]);
        assert_eq!(index.together(&key("c"), all), None);
    }
}
