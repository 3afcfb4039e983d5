//! [`LogFilter`]: the filter of the watcher's log stream, in
//! `tracing_subscriber::EnvFilter` syntax. A leaf module.

use std::str::FromStr;

use tracing_subscriber::filter::{EnvFilter, Targets};

use crate::error::{Error, Kind, Result};

/// Which records the watcher's log stream keeps: an
/// [`EnvFilter`](tracing_subscriber::EnvFilter) directive string such as
/// `info`, `warn,my_app=debug` or `info,my_app[request{user=ann}]=trace`
/// (the full `RUST_LOG` syntax, span and field directives included).
///
/// The watcher applies it to its own events and to the stdout/stderr lines
/// of its workers, and hands it to every worker (`CLUSTER_LOG_FILTER`),
/// whose [`Cluster::log_layer`](crate::Cluster::log_layer) applies it
/// before a record is built or queued. As with `EnvFilter`, targets that no
/// directive names are off unless a bare level says otherwise: write
/// `info,my_app=debug`, not `my_app=debug`, to keep the rest at `info`.
///
/// ```
/// use cluster::LogFilter;
///
/// let filter = LogFilter::parse("info,my_app=debug,[request{user=ann}]=trace").unwrap();
/// assert_eq!(filter.to_string(), "info,my_app=debug,[request{user=ann}]=trace");
/// // The same filter for a subscriber of your own:
/// let env_filter: tracing_subscriber::EnvFilter = filter.env_filter();
/// # drop(env_filter);
/// assert!(LogFilter::parse("info,=loud").unwrap_err().is_config());
/// ```
#[derive(Debug, Clone)]
pub struct LogFilter {
    spec: String,
    /// The directives without span or field parts, for records that have
    /// no spans: the watcher's stdout/stderr lines and notes.
    targets: Targets,
}

impl Default for LogFilter {
    /// `info`.
    fn default() -> Self {
        LogFilter::parse("info").expect("a valid filter")
    }
}

impl PartialEq for LogFilter {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

impl Eq for LogFilter {}

impl std::fmt::Display for LogFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec)
    }
}

impl FromStr for LogFilter {
    type Err = Error;

    fn from_str(s: &str) -> Result<LogFilter> {
        LogFilter::parse(s)
    }
}

impl LogFilter {
    /// Parses comma-separated `EnvFilter` directives: `level`,
    /// `target=level`, `target[span{field=value}]=level`, ... (levels: off,
    /// error, warn, info, debug, trace).
    ///
    /// # Errors
    ///
    /// [`Error::is_config`](crate::Error::is_config) with a one-line reason
    /// for an empty or invalid filter.
    pub fn parse(spec: &str) -> Result<LogFilter> {
        let spec = spec.trim();
        let bad = |why: String| Error::new(Kind::Config, why);
        if spec.is_empty() {
            return Err(bad("empty log filter".into()));
        }
        // EnvFilter takes any text before `[` or `=` as a target; a typo
        // such as `--log-level 'not a level!'` would silently log nothing.
        for directive in spec.split(',').map(str::trim) {
            let target = directive.split(['[', '=']).next().unwrap_or_default();
            let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.');
            if !target.chars().all(ok) {
                return Err(bad(format!(
                    "'{directive}' is not a level (off, error, warn, info, debug, trace) or a target=level directive"
                )));
            }
        }
        let env = EnvFilter::builder()
            .parse(spec)
            .map_err(|e| bad(format!("'{spec}' is not a valid filter: {e}")))?;
        drop(env);
        // Span and field directives need a span to match; records without
        // one see only the plain directives.
        let plain: Vec<&str> = spec
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty() && !d.contains('[') && !d.contains('{'))
            .collect();
        let targets = Targets::from_str(&plain.join(","))
            .map_err(|e| bad(format!("'{spec}' is not a valid filter: {e}")))?;
        Ok(LogFilter {
            spec: spec.to_string(),
            targets,
        })
    }

    /// A new `EnvFilter` with these directives, for a subscriber of your own.
    pub fn env_filter(&self) -> EnvFilter {
        EnvFilter::builder()
            .parse(&self.spec)
            .unwrap_or_else(|_| EnvFilter::new("info"))
    }

    /// The directive string, as parsed.
    pub fn as_str(&self) -> &str {
        &self.spec
    }

    /// Whether a record without spans at `level` (1 error .. 5 trace) from
    /// `target` passes.
    pub(crate) fn enabled(&self, target: &str, level: u8) -> bool {
        let level = match level {
            1 => tracing::Level::ERROR,
            2 => tracing::Level::WARN,
            3 => tracing::Level::INFO,
            4 => tracing::Level::DEBUG,
            _ => tracing::Level::TRACE,
        };
        self.targets.would_enable(target, &level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_directives() {
        let f = LogFilter::parse("warn,my_app=debug,my_app::db=error").unwrap();
        assert!(f.enabled("other", 2));
        assert!(!f.enabled("other", 3));
        assert!(f.enabled("my_app", 4));
        assert!(f.enabled("my_app::http", 4));
        assert!(!f.enabled("my_app::db", 2));
        // Target prefixes match as in EnvFilter (`my_app` also matches
        // `my_apple`), so the watcher agrees with the workers' filter.
        assert!(f.enabled("my_apple", 4));
        assert!(LogFilter::parse("loud").is_ok(), "a bare target");
    }

    #[test]
    fn span_and_field_directives_are_accepted() {
        let f = LogFilter::parse("info,[span{x=1}]=debug").unwrap();
        assert!(f.enabled("any", 3), "the plain part applies without spans");
        assert!(!f.enabled("any", 4));
        assert!(LogFilter::parse("my_app[req]=trace").is_ok());
    }

    #[test]
    fn bad_filters_are_refused_with_is_config() {
        for bad in ["", "  ", "x=loud", "info,=debug=x", "not a level!!"] {
            let e = LogFilter::parse(bad).unwrap_err();
            assert!(e.is_config(), "{bad}: {e}");
        }
    }
}
