//! The watches on the store: who wants to hear about changes under which
//! prefix. Generic over the sink so the hub decides how a change travels
//! (a worker's channel, or a local stream for the watcher's own code).

use std::collections::HashMap;

use super::path;

/// Who owns a watch: a worker (its context id) or the watcher itself (0).
pub(crate) type Owner = u64;

/// One watch.
pub(crate) struct Watch<S> {
    pub prefix: Vec<String>,
    pub sink: S,
}

/// Every watch, by (owner, the owner's id for it).
pub(crate) struct Watches<S> {
    list: HashMap<(Owner, u64), Watch<S>>,
}

impl<S> Default for Watches<S> {
    fn default() -> Self {
        Watches {
            list: HashMap::new(),
        }
    }
}

impl<S> Watches<S> {
    /// Adds a watch on `prefix` (a dot path, checked by the caller).
    pub(crate) fn add(&mut self, owner: Owner, id: u64, prefix: &[&str], sink: S) {
        let prefix = prefix.iter().map(|k| k.to_string()).collect();
        self.list.insert((owner, id), Watch { prefix, sink });
    }

    /// Removes one watch; whether it existed.
    pub(crate) fn remove(&mut self, owner: Owner, id: u64) -> bool {
        self.list.remove(&(owner, id)).is_some()
    }

    /// Removes every watch of `owner` (a worker that left).
    pub(crate) fn remove_owner(&mut self, owner: Owner) {
        self.list.retain(|(o, _), _| *o != owner);
    }

    /// How many watches `owner` has.
    pub(crate) fn count(&self, owner: Owner) -> usize {
        self.list.keys().filter(|(o, _)| *o == owner).count()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The watches a change at `changed` concerns, with their keys.
    pub(crate) fn matching<'a>(
        &'a self,
        changed: &'a [&'a str],
    ) -> impl Iterator<Item = ((Owner, u64), &'a Watch<S>)> + 'a {
        self.list
            .iter()
            .filter(move |(_, w)| path::related(&w.prefix, changed))
            .map(|(k, w)| (*k, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_follows_the_prefix_and_owners_are_separate() {
        let mut w = Watches::default();
        w.add(1, 10, &["users"], "a");
        w.add(2, 10, &["users", "42"], "b");
        w.add(2, 11, &["jobs"], "c");
        w.add(0, 1, &[], "all");
        fn hits<'a>(w: &Watches<&'a str>, keys: &[&str]) -> Vec<&'a str> {
            let mut v: Vec<&str> = w.matching(keys).map(|(_, x)| x.sink).collect();
            v.sort();
            v
        }
        assert_eq!(hits(&w, &["users", "42", "name"]), ["a", "all", "b"]);
        assert_eq!(hits(&w, &["users", "7"]), ["a", "all"]);
        assert_eq!(hits(&w, &["jobs"]), ["all", "c"]);
        assert_eq!(w.count(2), 2);
        assert!(w.remove(2, 10));
        assert!(!w.remove(2, 10));
        w.remove_owner(2);
        assert_eq!(w.count(2), 0);
        assert_eq!(hits(&w, &["jobs"]), ["all"]);
    }
}
