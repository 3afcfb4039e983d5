//! `--revive`: whether a slot whose worker ended gets a new one.

use std::str::FromStr;

/// When a worker that ended is replaced (`--revive`; default
/// [`Always`](Revive::Always)). A rolling restart, `scale` and a stop of
/// the watcher are not affected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Revive {
    /// Every time (with the respawn backoff for crashes), also after
    /// `cluster stop --slot`.
    #[default]
    Always,
    /// Only when it failed: exited with a status other than 0, or was
    /// killed by a signal (including the watcher's kill for missed
    /// heartbeats). A worker that exits 0, or that `cluster stop --slot`
    /// stopped, is not replaced.
    OnFailure,
    /// Never: its slot stays empty (`cluster status` shows fewer running
    /// than wanted) until a rolling restart or `scale`.
    Never,
}

impl Revive {
    /// Whether a worker that ended this way gets a successor. `failed`:
    /// it did not exit with status 0; `stopped`: `cluster stop --slot`
    /// stopped it.
    pub(crate) fn revives(self, failed: bool, stopped: bool) -> bool {
        match self {
            Revive::Always => true,
            Revive::OnFailure => failed && !stopped,
            Revive::Never => false,
        }
    }
}

impl FromStr for Revive {
    type Err = String;

    fn from_str(s: &str) -> Result<Revive, String> {
        match s {
            "always" => Ok(Revive::Always),
            "on-failure" => Ok(Revive::OnFailure),
            "never" => Ok(Revive::Never),
            _ => Err(format!(
                "'{s}' is not a revive policy (always, on-failure, never)"
            )),
        }
    }
}

impl std::fmt::Display for Revive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Revive::Always => "always",
            Revive::OnFailure => "on-failure",
            Revive::Never => "never",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        assert!(Revive::Always.revives(false, true));
        assert!(Revive::OnFailure.revives(true, false));
        assert!(!Revive::OnFailure.revives(false, false));
        assert!(!Revive::OnFailure.revives(true, true));
        assert!(!Revive::Never.revives(true, false));
        assert_eq!("on-failure".parse::<Revive>(), Ok(Revive::OnFailure));
        assert!("sometimes".parse::<Revive>().is_err());
    }
}
