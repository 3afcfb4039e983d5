//! Worker names: `--name PREFIX` names slot N `PREFIX-N`, `--names a,b,c`
//! gives each slot its own. A name is what `Cluster::name()` returns, what
//! `cluster status` shows and what a command can be sent to, so it must
//! not read as another target (a slot number, `watcher`, `all`).

use crate::error::{Error, Kind, Result};

/// Longest name.
pub(crate) const MAX_NAME: usize = 64;

/// How slots are named.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Naming {
    /// Workers have no name.
    #[default]
    None,
    /// Slot N is `PREFIX-N`.
    Prefix(String),
    /// Slot N is the Nth name (slots past the list have none).
    List(Vec<String>),
}

impl Naming {
    /// The name of `slot`'s workers.
    pub(crate) fn of(&self, slot: u32) -> Option<String> {
        match self {
            Naming::None => None,
            Naming::Prefix(p) => Some(format!("{p}-{slot}")),
            Naming::List(names) => names.get((slot as usize).checked_sub(1)?).cloned(),
        }
    }

    /// Checks the names (or the prefix) for `workers` slots.
    pub(crate) fn check(&self, workers: usize) -> Result<()> {
        match self {
            Naming::None => Ok(()),
            Naming::Prefix(p) => check_chars(p, "--name"),
            Naming::List(names) => {
                if names.len() != workers {
                    return Err(config(format!(
                        "--names gives {} name(s) for {workers} worker(s): give one per worker",
                        names.len()
                    )));
                }
                for (i, n) in names.iter().enumerate() {
                    check_chars(n, "--names")?;
                    if n.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(config(format!(
                            "--names: {n:?} would read as a slot number"
                        )));
                    }
                    if n == "watcher" || n == "all" {
                        return Err(config(format!(
                            "--names: {n:?} is a command target of its own"
                        )));
                    }
                    if names[..i].contains(n) {
                        return Err(config(format!("--names: {n:?} is given twice")));
                    }
                }
                Ok(())
            }
        }
    }
}

fn config(m: String) -> Error {
    Error::new(Kind::Config, m)
}

fn check_chars(name: &str, option: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(config(format!(
            "{option}: {name:?} is not a name (1 to {MAX_NAME} letters, digits, '-', '_', '.')"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_lists_name_slots() {
        assert_eq!(Naming::Prefix("web".into()).of(3).as_deref(), Some("web-3"));
        let list = Naming::List(vec!["a".into(), "b".into()]);
        assert_eq!(list.of(2).as_deref(), Some("b"));
        assert_eq!(list.of(3), None);
        assert_eq!(list.of(0), None);
        assert_eq!(Naming::None.of(1), None);
    }

    #[test]
    fn names_that_would_confuse_targets_are_refused() {
        let list = |v: &[&str]| Naming::List(v.iter().map(|s| s.to_string()).collect());
        assert!(list(&["a", "b"]).check(2).is_ok());
        assert!(list(&["a", "b"]).check(3).unwrap_err().is_config());
        for bad in [
            &["1", "b"][..],
            &["all", "b"],
            &["a", "a"],
            &["a b", "c"],
            &["", "c"],
        ] {
            assert!(list(bad).check(2).is_err(), "{bad:?}");
        }
        assert!(Naming::Prefix("web".into()).check(4).is_ok());
        assert!(Naming::Prefix("w/x".into()).check(4).is_err());
    }
}
