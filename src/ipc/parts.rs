//! Texts larger than one message (a job's arguments, a handler's result)
//! cross the socketpair in parts: every part but the last in its own
//! `JobPart` / `JobDonePart` message, the last in the `Job` / `JobDone`
//! that ends them. [`split`] cuts on character boundaries; [`Assembly`]
//! joins the parts per ticket, within a bound.

use std::collections::HashMap;

use super::message::MAX_MESSAGE;

/// The most text one part carries: a message with room to spare.
pub(crate) const PART: usize = MAX_MESSAGE - 1024;

/// `text` in pieces of at most [`PART`] bytes, cut on character
/// boundaries; one piece (maybe empty) for a short text.
pub(crate) fn split(text: &str) -> Vec<&str> {
    let mut out = Vec::with_capacity(text.len() / PART + 1);
    let mut rest = text;
    while rest.len() > PART {
        let mut cut = PART;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        out.push(head);
        rest = tail;
    }
    out.push(rest);
    out
}

/// Parts received per ticket, at most `limit` bytes each.
#[derive(Debug)]
pub(crate) struct Assembly {
    limit: usize,
    parts: HashMap<u64, String>,
    /// Tickets whose parts passed the limit (what came is dropped).
    over: HashMap<u64, usize>,
}

/// What the parts of a ticket came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Joined {
    Text(String),
    /// More than the limit arrived: this many bytes.
    TooLarge(usize),
}

impl Assembly {
    pub(crate) fn new(limit: usize) -> Assembly {
        Assembly {
            limit,
            parts: HashMap::new(),
            over: HashMap::new(),
        }
    }

    /// One more part of `ticket`.
    pub(crate) fn push(&mut self, ticket: u64, part: &str) {
        if let Some(n) = self.over.get_mut(&ticket) {
            *n = n.saturating_add(part.len());
            return;
        }
        let text = self.parts.entry(ticket).or_default();
        if text.len() + part.len() > self.limit {
            let n = text.len() + part.len();
            self.parts.remove(&ticket);
            self.over.insert(ticket, n);
            return;
        }
        text.push_str(part);
    }

    /// The last part of `ticket` arrived: the whole text.
    pub(crate) fn finish(&mut self, ticket: u64, last: String) -> Joined {
        if let Some(n) = self.over.remove(&ticket) {
            return Joined::TooLarge(n.saturating_add(last.len()));
        }
        match self.parts.remove(&ticket) {
            None => Joined::Text(last),
            Some(mut text) if text.len() + last.len() <= self.limit => {
                text.push_str(&last);
                Joined::Text(text)
            }
            Some(text) => Joined::TooLarge(text.len() + last.len()),
        }
    }

    /// Forgets the parts of `ticket` (its worker is gone).
    pub(crate) fn forget(&mut self, ticket: u64) {
        self.parts.remove(&ticket);
        self.over.remove(&ticket);
    }

    /// Whether parts of `ticket` wait.
    pub(crate) fn has(&self, ticket: u64) -> bool {
        self.parts.contains_key(&ticket) || self.over.contains_key(&ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_split_on_char_boundaries_and_join_again() {
        assert_eq!(split(""), vec![""]);
        assert_eq!(split("abc"), vec!["abc"]);
        let text = "é".repeat(PART); // 2 bytes each
        let parts = split(&text);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.len() <= PART));
        assert_eq!(parts.concat(), text);
        let mut a = Assembly::new(10 * PART);
        for p in &parts[..parts.len() - 1] {
            a.push(7, p);
        }
        assert!(a.has(7));
        assert_eq!(a.finish(7, parts[1].to_string()), Joined::Text(text));
        assert!(!a.has(7));
        assert_eq!(a.finish(8, "x".into()), Joined::Text("x".into()));
    }

    #[test]
    fn parts_past_the_limit_are_dropped_and_counted() {
        let mut a = Assembly::new(10);
        a.push(1, "123456");
        a.push(1, "789012");
        a.push(1, "3");
        assert_eq!(a.finish(1, "45".into()), Joined::TooLarge(15));
        a.push(2, "12345");
        a.forget(2);
        assert_eq!(a.finish(2, "6".into()), Joined::Text("6".into()));
    }
}
