//! Tidepools that share a database server, and what they plan together.
//!
//! Each Tidepool plans its own budget (`maxConnections − reserved`), but
//! several pointing at one server draw on the same `max_connections`. The
//! controller records each one's planned peak under its server (host and
//! port from its Secret, kept in memory only: they are Secret values) and
//! reports an over-commit in the `ConnectionBudget` condition of every one
//! of them. A change is told only to the Tidepools whose verdict or message
//! it can change (those over their budget before or after it), so many
//! Tidepools on one server within budget cost no reconciles of each other.
//! Pure: tested without an API server.

use std::collections::BTreeMap;

/// A Tidepool: namespace and name.
pub type Key = (String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    server: String,
    planned_peak: u32,
    /// Its own budget: the server total it is over-committed above.
    available: u32,
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
    /// Records `key`'s planned peak on `server` and its own `available`.
    /// Returns the other Tidepools to reconcile again: those on the old or
    /// the new server that are over their budget before or after (for the
    /// others, nothing they say changes); none when nothing changed.
    pub fn record(&mut self, key: &Key, server: &str, planned_peak: u32, available: u32) -> Vec<Key> {
        let entry = Entry { server: server.to_owned(), planned_peak, available };
        let before = self.totals();
        let old = self.entries.insert(key.clone(), entry.clone());
        if old.as_ref() == Some(&entry) {
            return Vec::new();
        }
        let mut servers = vec![server.to_owned()];
        servers.extend(old.map(|old| old.server).filter(|old| old != server));
        self.affected(key, &servers, &before)
    }

    /// Forgets `key` (deleted); returns the Tidepools left on its server
    /// whose verdict or message that can change.
    pub fn remove(&mut self, key: &Key) -> Vec<Key> {
        let before = self.totals();
        match self.entries.remove(key) {
            Some(old) => self.affected(key, &[old.server], &before),
            None => Vec::new(),
        }
    }

    /// Every server's total over every recorded Tidepool.
    fn totals(&self) -> BTreeMap<String, u64> {
        let mut totals = BTreeMap::new();
        for entry in self.entries.values() {
            *totals.entry(entry.server.clone()).or_insert(0) += u64::from(entry.planned_peak);
        }
        totals
    }

    /// The Tidepools on `servers` other than `key` that are over their
    /// budget with the totals `before` or now. (Totals here count entries a
    /// missed deletion left behind, so they are never below the live ones:
    /// a Tidepool left out is within its budget both times.)
    fn affected(&self, key: &Key, servers: &[String], before: &BTreeMap<String, u64>) -> Vec<Key> {
        let after = self.totals();
        let over = |totals: &BTreeMap<String, u64>, entry: &Entry| {
            totals.get(&entry.server).copied().unwrap_or(0) > u64::from(entry.available)
        };
        self.entries
            .iter()
            .filter(|(k, e)| *k != key && servers.contains(&e.server) && (over(before, e) || over(&after, e)))
            .map(|(k, _)| k.clone())
            .collect()
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
        assert!(index.record(&key("a"), "db:5432", 60, 100).is_empty());
        assert_eq!(index.record(&key("b"), "db:5432", 50, 100), vec![key("a")], "110 > 100: a is told");
        assert!(index.record(&key("c"), "other:5432", 70, 100).is_empty());
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
        assert!(index.record(&key("b"), "db:5432", 50, 100).is_empty(), "no change, nobody to tell");
        assert_eq!(index.record(&key("b"), "other:5432", 50, 100), vec![key("a"), key("c")]);
        assert_eq!(index.together(&key("a"), all).map(|t| t.total), Some(60));
        assert_eq!(index.remove(&key("c")), vec![key("b")], "b was over its budget with c");
        assert_eq!(index.together(&key("c"), all), None);
    }

    #[test]
    fn tidepools_within_their_budget_are_not_told() {
        let mut index = ServerIndex::default();
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            assert!(index.record(&key(name), "db:5432", 10, 100).is_empty(), "{i}: 10 × {} ≤ 100", i + 1);
        }
        // One grows past every budget: all are told; shrinking back tells them again.
        assert_eq!(index.record(&key("a"), "db:5432", 80, 100), vec![key("b"), key("c"), key("d")]);
        assert_eq!(index.record(&key("a"), "db:5432", 10, 100), vec![key("b"), key("c"), key("d")]);
        assert!(index.remove(&key("d")).is_empty());
        // A small budget is over where the others are not.
        assert_eq!(index.record(&key("e"), "db:5432", 10, 35), Vec::<Key>::new());
        assert_eq!(index.record(&key("b"), "db:5432", 11, 100), vec![key("e")]);
    }
}
