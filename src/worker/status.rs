//! A worker's status as it reports it ([`Cluster::set_status`](crate::Cluster::set_status)):
//! what `cluster status` shows, and what `cluster stop --slot` looks at
//! (an `idle` worker is stopped at once).

use std::fmt;

use crate::error::{Error, Kind, Result};

/// Longest custom status, in bytes.
pub const MAX_STATUS_LEN: usize = 64;

/// What a worker is doing, as it tells the watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// Nothing in progress: `cluster stop --slot` stops it at once.
    Idle,
    /// Working: a stop waits for it (up to the timeout).
    Processing,
    /// Finishing before it exits (set by the watcher when it asks the
    /// worker to stop, too).
    Stopping,
    /// Anything else: a short line of text (at most 64 bytes).
    Custom(String),
}

impl Status {
    /// The text the watcher shows.
    pub fn as_str(&self) -> &str {
        match self {
            Status::Idle => "idle",
            Status::Processing => "processing",
            Status::Stopping => "stopping",
            Status::Custom(s) => s,
        }
    }

    /// Checks a custom text.
    pub(crate) fn checked(self) -> Result<Status> {
        let s = self.as_str();
        if s.is_empty() || s.len() > MAX_STATUS_LEN || s.chars().any(char::is_control) {
            return Err(Error::new(
                Kind::Config,
                format!("a status is 1 to {MAX_STATUS_LEN} bytes of text without control characters, not {s:?}"),
            ));
        }
        Ok(self)
    }
}

impl From<&str> for Status {
    fn from(s: &str) -> Status {
        match s {
            "idle" => Status::Idle,
            "processing" => Status::Processing,
            "stopping" => Status::Stopping,
            other => Status::Custom(other.to_string()),
        }
    }
}

impl From<String> for Status {
    fn from(s: String) -> Status {
        Status::from(s.as_str())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_words_and_custom_text() {
        assert_eq!(Status::from("idle"), Status::Idle);
        assert_eq!(Status::from("warming cache").as_str(), "warming cache");
        assert!(Status::from("x".repeat(65)).checked().is_err());
        assert!(Status::from("a\nb").checked().is_err());
        assert!(Status::from("").checked().is_err());
        assert!(Status::Processing.checked().is_ok());
    }
}
