//! Where the watcher's options come from, first match wins: the command
//! line, then `CLUSTER_*` environment variables (`--max-restarts` is
//! `CLUSTER_MAX_RESTARTS`), then the `--config` TOML file (keys are the
//! long option names, the program is `program = ["./srv", "arg"]`), then
//! the defaults.
//!
//! The file is turned into command-line arguments placed before the real
//! ones, for the options the command line and the environment left
//! unset, so every option is checked by the same parser whichever way it
//! came.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use crate::cli::Args;

/// Options without an environment variable: the watcher sets
/// `CLUSTER_POOL`, `CLUSTER_JOB_CONCURRENCY`, `CLUSTER_NAME` and
/// `CLUSTER_NODE` for its workers and job processes, so a nested watcher
/// must not read them as options.
const NO_ENV: [&str; 6] = [
    "command",
    "pool",
    "job_concurrency",
    "name",
    "node",
    "config",
];

/// The command, with a `CLUSTER_*` variable for each option.
pub fn command() -> clap::Command {
    Args::command().mut_args(|arg| {
        let id = arg.get_id().as_str().to_string();
        match arg.get_long() {
            Some(long) if !NO_ENV.contains(&id.as_str()) && long != "help" && long != "version" => {
                let name = format!("CLUSTER_{}", long.to_ascii_uppercase().replace('-', "_"));
                arg.env(&*Box::leak(name.into_boxed_str()))
            }
            _ => arg,
        }
    })
}

/// Why the arguments cannot be used.
pub enum Failure {
    /// A usage error from the parser (help and version included).
    Usage(clap::Error),
    /// The config file cannot be read or has a bad key.
    Config(String),
}

/// Parses `argv` (with the program name first), reading `--config`.
pub fn parse(argv: Vec<OsString>) -> Result<Args, Failure> {
    let first = command()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
        .map_err(Failure::Usage)?;
    let config = first
        .get_one::<std::path::PathBuf>("config")
        .cloned()
        .or_else(|| std::env::var_os("CLUSTER_CONFIG").map(Into::into));
    let argv = match config {
        Some(path) if first.subcommand().is_none() => with_file(&path, &first, argv)?,
        _ => argv,
    };
    let matches = command()
        .args_override_self(true)
        .try_get_matches_from(argv)
        .map_err(Failure::Usage)?;
    Args::from_arg_matches(&matches).map_err(Failure::Usage)
}

/// `argv` with the file's options inserted after the program name (and
/// its program appended, if the command line names none).
fn with_file(
    path: &Path,
    given: &ArgMatches,
    argv: Vec<OsString>,
) -> Result<Vec<OsString>, Failure> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Config(format!("cannot read config file {shown}: {e}")))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        Failure::Config(format!("{shown}: {}", one_line(&e.to_string())))
    })?;
    let cmd = command();
    let set_outside = |id: &str| {
        matches!(
            given.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let mut from_file: Vec<OsString> = Vec::new();
    let mut program: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        if long == "program" {
            if !set_outside("command") {
                program = strings(value, key, &shown.to_string())?
                    .into_iter()
                    .map(OsString::from)
                    .collect();
            }
            continue;
        }
        let arg = cmd
            .get_arguments()
            .find(|a| {
                a.get_long() == Some(long.as_str())
                    && !matches!(long.as_str(), "config" | "help" | "version")
            })
            .ok_or_else(|| {
                Failure::Config(format!(
                    "{shown}: unknown option '{key}' (see 'cluster --help')"
                ))
            })?;
        if set_outside(arg.get_id().as_str()) {
            continue;
        }
        match arg.get_action() {
            ArgAction::SetTrue => match value {
                toml::Value::Boolean(true) => from_file.push(format!("--{long}").into()),
                toml::Value::Boolean(false) => {}
                _ => {
                    return Err(Failure::Config(format!(
                        "{shown}: '{key}' is true or false"
                    )))
                }
            },
            ArgAction::Append => {
                for v in strings(value, key, &shown.to_string())? {
                    from_file.push(format!("--{long}={v}").into());
                }
            }
            _ => {
                let v = scalar(value)
                    .ok_or_else(|| Failure::Config(format!("{shown}: '{key}' takes one value")))?;
                from_file.push(format!("--{long}={v}").into());
            }
        }
    }
    let mut out = Vec::with_capacity(argv.len() + from_file.len() + program.len() + 1);
    let mut rest = argv.into_iter();
    out.extend(rest.next());
    out.extend(from_file);
    out.extend(rest);
    if !program.is_empty() {
        out.push("--".into());
        out.extend(program);
    }
    Ok(out)
}

/// A TOML scalar as the text an option takes.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A string, or an array of scalars, as a list of values.
fn strings(value: &toml::Value, key: &str, file: &str) -> Result<Vec<String>, Failure> {
    let bad = || Failure::Config(format!("{file}: '{key}' is a value or a list of values"));
    match value {
        toml::Value::Array(items) => items.iter().map(|v| scalar(v).ok_or_else(bad)).collect(),
        other => Ok(vec![scalar(other).ok_or_else(bad)?]),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        std::iter::once("cluster")
            .chain(v.iter().copied())
            .map(Into::into)
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn the_file_fills_in_what_the_command_line_leaves_unset() {
        let f = file(
            "workers = 3\nshutdown-timeout = 2.5\nwatch = [\"a\", \"b\"]\nreload_on_deploy = true\nprogram = [\"./srv\", \"--port\", \"80\"]\n",
        );
        let path = f.path().to_str().unwrap();
        let Ok(a) = parse(args(&["--config", path, "--workers", "5"])) else {
            panic!("parses")
        };
        assert_eq!(a.workers, Some(5), "the command line wins");
        assert_eq!(a.shutdown_timeout, std::time::Duration::from_millis(2500));
        assert_eq!(a.watch, [Path::new("a"), Path::new("b")]);
        assert!(a.reload_on_deploy);
        assert_eq!(a.command, ["./srv", "--port", "80"]);
        let Ok(a) = parse(args(&["--config", path, "./other"])) else {
            panic!("parses")
        };
        assert_eq!(a.command, ["./other"], "a program on the command line wins");
    }

    #[test]
    fn what_the_watcher_sets_for_its_workers_is_no_option_variable() {
        let cmd = command();
        let env = |id: &str| {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        for id in ["pool", "job_concurrency", "name", "node"] {
            assert_eq!(env(id), None, "{id}");
        }
        assert_eq!(env("workers").as_deref(), Some("CLUSTER_WORKERS"));
        assert_eq!(env("names").as_deref(), Some("CLUSTER_NAMES"));
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        for (text, want) in [
            ("wrokers = 3\nprogram = \"x\"", "unknown option 'wrokers'"),
            ("workers = [1, 2]\nprogram = \"x\"", "takes one value"),
            ("workers = \nprogram", "config"),
            ("daemon = 3\nprogram = \"x\"", "true or false"),
        ] {
            let f = file(text);
            match parse(args(&["--config", f.path().to_str().unwrap()])) {
                Err(Failure::Config(e)) => {
                    assert!(e.contains(want) || want == "config", "{text}: {e}");
                    assert!(!e.contains('\n'), "{e}");
                }
                Err(Failure::Usage(e)) => panic!("{text}: usage error {e}"),
                Ok(_) => panic!("{text}: accepted"),
            }
        }
        assert!(matches!(
            parse(args(&["--config", "/nonexistent/cluster.toml", "./srv"])),
            Err(Failure::Config(_))
        ));
    }
}
