//! `cluster jobs ...`: submit, list, show, stats, retry and cancel jobs in
//! a job store, named by `--jobs URL` or by a watcher's `--pid-file`
//! (which has its store URL beside it, `x.pid` → `x.jobs`).
//!
//! Exit status: 0 on success, 1 with one line `cluster: error: …` on
//! failure (2 for usage errors, from clap in `main`).

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::Value;

use cluster::__jobs_cli::{format_rfc3339, parse_rfc3339};
use cluster::{
    CancelOutcome, Job, JobId, JobQueue, JobState, JobStats, ListFilter, NewJob, Node, StateCounts,
    Submitted,
};

/// `cluster jobs` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// Submit a job (or one per line with --stdin, in one transaction);
    /// prints each new id, or "existing ID" when deduplicated
    Submit(SubmitArgs),
    /// List jobs, newest first
    List {
        #[command(flatten)]
        target: JobsTarget,
        /// Only jobs in this state (queued, running, done, failed, cancelled)
        #[arg(long, value_name = "STATE", value_parser = parse_state)]
        state: Option<JobState>,
        /// Only jobs of this queue
        #[arg(long, value_name = "QUEUE")]
        queue: Option<String>,
        /// At most N jobs
        #[arg(long, value_name = "N", default_value = "100")]
        limit: usize,
        /// Print JSON (an array of jobs) instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one job: every field, and each failed attempt's error
    Show {
        #[command(flatten)]
        target: JobsTarget,
        /// The job's id
        #[arg(value_name = "ID", value_parser = parse_id)]
        id: JobId,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Count jobs per state, in total and per queue
    Stats {
        #[command(flatten)]
        target: JobsTarget,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Queue a failed or cancelled job again (one more attempt if it had
    /// used them all)
    Retry {
        #[command(flatten)]
        target: JobsTarget,
        /// The job's id
        #[arg(value_name = "ID", value_parser = parse_id)]
        id: JobId,
    },
    /// Cancel a job: a queued one at once, a running one is stopped by its
    /// watcher
    Cancel {
        #[command(flatten)]
        target: JobsTarget,
        /// The job's id
        #[arg(value_name = "ID", value_parser = parse_id)]
        id: JobId,
    },
    /// List the nodes (watchers) of a PostgreSQL job store: state, last
    /// heartbeat, running jobs
    Nodes {
        #[command(flatten)]
        target: JobsTarget,
        /// Print JSON (an array of nodes) instead of a table
        #[arg(long)]
        json: bool,
    },
}

/// Which job store to use.
#[derive(Debug, clap::Args)]
pub struct JobsTarget {
    /// The job store: a SQLite file (jobs.db, sqlite://PATH) or
    /// postgres://USER@HOST/DB
    #[arg(
        long = "jobs",
        value_name = "URL",
        required_unless_present = "pid_file",
        conflicts_with = "pid_file"
    )]
    pub jobs: Option<String>,
    /// A watcher's pid file; its job store URL is read from beside it
    /// (x.pid -> x.jobs)
    #[arg(short = 'p', long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// The PostgreSQL schema of the job tables [default: cluster]
    #[arg(long, value_name = "NAME", requires = "jobs")]
    pub jobs_schema: Option<String>,
}

/// `cluster jobs submit` options.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub target: JobsTarget,
    /// The queue [default: default]
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// The handler name
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// The job's key; a job with the same key already queued or running is
    /// not submitted again (its id is printed as "existing ID")
    #[arg(long, value_name = "KEY", conflicts_with = "stdin")]
    pub key: Option<String>,
    /// Deduplicate by the key derived from queue, name and arguments too
    #[arg(long)]
    pub dedupe: bool,
    /// How many times the job may run [default: 3]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_attempts: Option<u32>,
    /// Lower runs first within the queue [default: 0]
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Run not before this time (RFC 3339, like 2026-04-20T10:00:00Z)
    #[arg(long, value_name = "TIME", value_parser = parse_time, conflicts_with = "delay")]
    pub run_at: Option<SystemTime>,
    /// Run not before SECS seconds from now
    #[arg(long, value_name = "SECS", value_parser = parse_delay)]
    pub delay: Option<Duration>,
    /// The arguments as one JSON value
    #[arg(long, value_name = "JSON", conflicts_with_all = ["stdin", "args"])]
    pub json: Option<String>,
    /// Read jobs from standard input, one JSON per line: a bare value (the
    /// arguments) or {"args": ..., "queue", "name", "key", "max_attempts",
    /// "priority", "run_at", "delay", "dedupe"}; all or none are submitted
    #[arg(long, conflicts_with = "args")]
    pub stdin: bool,
    /// The arguments, as a JSON array of strings
    #[arg(value_name = "ARGS", trailing_var_arg = true, num_args = 0..)]
    pub args: Vec<String>,
}

fn parse_state(s: &str) -> Result<JobState, String> {
    s.parse().map_err(|e: cluster::Error| e.to_string())
}

fn parse_id(s: &str) -> Result<JobId, String> {
    s.parse().map_err(|e: cluster::Error| e.to_string())
}

fn parse_time(s: &str) -> Result<SystemTime, String> {
    parse_rfc3339(s)
}

fn parse_delay(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=31_622_400.0).contains(&secs) {
        return Err("must be between 0 and 31622400 seconds (a year)".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn run(cmd: JobsCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return error(format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(dispatch(cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => error(message),
    }
}

fn error(message: impl std::fmt::Display) -> ExitCode {
    // One line, whatever the message holds.
    let line = message.to_string().replace('\n', " ");
    eprintln!("cluster: error: {line}");
    ExitCode::FAILURE
}

/// Opens the store; `create` only for submit, so that a mistyped path
/// given to a read-only command does not create a file.
async fn open(target: &JobsTarget, create: bool) -> Result<JobQueue, String> {
    let url = target.jobs.as_ref().map(|url| match &target.jobs_schema {
        Some(s) => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}schema={s}")
        }
        None => url.clone(),
    });
    let result = match (&url, &target.pid_file) {
        (Some(url), _) if create => JobQueue::open(url).await,
        (Some(url), _) => JobQueue::open_existing(url).await,
        (None, Some(pid_file)) => JobQueue::open_for_pid_file(pid_file).await,
        (None, None) => return Err("give --jobs or --pid-file".into()),
    };
    result.map_err(|e| e.to_string())
}

async fn dispatch(cmd: JobsCommand) -> Result<(), String> {
    match cmd {
        JobsCommand::Submit(args) => submit(args).await,
        JobsCommand::List {
            target,
            state,
            queue,
            limit,
            json,
        } => {
            let q = open(&target, false).await?;
            let mut filter = ListFilter::new().limit(limit);
            if let Some(s) = state {
                filter = filter.state(s);
            }
            if let Some(queue) = queue {
                filter = filter.queue(queue);
            }
            let jobs = q.list(filter).await.map_err(|e| e.to_string())?;
            if json {
                print_json(&jobs)?;
            } else {
                print_list(&jobs);
            }
            Ok(())
        }
        JobsCommand::Show { target, id, json } => {
            let q = open(&target, false).await?;
            let job = q
                .get(id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no job {id}"))?;
            if json {
                print_json(&job)?;
            } else {
                print_job(&job);
            }
            Ok(())
        }
        JobsCommand::Stats { target, json } => {
            let q = open(&target, false).await?;
            let stats = q.stats().await.map_err(|e| e.to_string())?;
            if json {
                print_json(&stats)?;
            } else {
                print_stats(&stats);
            }
            Ok(())
        }
        JobsCommand::Retry { target, id } => {
            let q = open(&target, false).await?;
            q.retry(id).await.map_err(|e| e.to_string())?;
            println!("job {id} queued again");
            Ok(())
        }
        JobsCommand::Nodes { target, json } => {
            let q = open(&target, false).await?;
            let nodes = q.nodes().await.map_err(|e| e.to_string())?;
            if json {
                print_json(&nodes)?;
            } else {
                print_nodes(&nodes);
            }
            Ok(())
        }
        JobsCommand::Cancel { target, id } => {
            let q = open(&target, false).await?;
            match q.cancel(id).await.map_err(|e| e.to_string())? {
                CancelOutcome::Cancelled => println!("cancelled"),
                CancelOutcome::Requested => println!("cancel requested (running)"),
                CancelOutcome::AlreadyFinished(state) => println!("already {state}"),
            }
            Ok(())
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).map_err(|e| format!("cannot print JSON: {e}"))?;
    println!("{text}");
    Ok(())
}

/// One `--stdin` line in its long form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StdinJob {
    args: Value,
    queue: Option<String>,
    name: Option<String>,
    key: Option<String>,
    max_attempts: Option<u32>,
    priority: Option<i32>,
    run_at: Option<String>,
    delay: Option<f64>,
    dedupe: Option<bool>,
}

/// The options given on the command line, as defaults for every job.
struct Defaults<'a> {
    queue: Option<&'a str>,
    name: Option<&'a str>,
    max_attempts: Option<u32>,
    priority: Option<i32>,
    run_at: Option<SystemTime>,
    dedupe: bool,
}

impl Defaults<'_> {
    fn job(&self, args: Value) -> NewJob {
        let mut job = NewJob::new(args).dedupe(self.dedupe);
        if let Some(q) = self.queue {
            job = job.queue(q);
        }
        if let Some(n) = self.name {
            job = job.name(n);
        }
        if let Some(n) = self.max_attempts {
            job = job.max_attempts(n);
        }
        if let Some(p) = self.priority {
            job = job.priority(p);
        }
        if let Some(t) = self.run_at {
            job = job.run_at(t);
        }
        job
    }
}

/// Parses one `--stdin` line into a job.
fn stdin_job(line: &str, d: &Defaults<'_>) -> Result<NewJob, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let is_spec = value.as_object().is_some_and(|o| o.contains_key("args"));
    if !is_spec {
        return Ok(d.job(value));
    }
    let spec: StdinJob = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let mut job = d.job(spec.args);
    if let Some(q) = spec.queue {
        if q.is_empty() {
            return Err("the queue name is empty".into());
        }
        job = job.queue(q);
    }
    if let Some(n) = spec.name {
        job = job.name(n);
    }
    if let Some(n) = spec.max_attempts {
        if n == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        job = job.max_attempts(n);
    }
    if let Some(p) = spec.priority {
        job = job.priority(p);
    }
    match (spec.run_at, spec.delay) {
        (Some(_), Some(_)) => return Err("give run_at or delay, not both".into()),
        (Some(t), None) => job = job.run_at(parse_rfc3339(&t)?),
        (None, Some(secs)) => job = job.delay(parse_delay(&secs.to_string())?),
        (None, None) => {}
    }
    if let Some(on) = spec.dedupe {
        job = job.dedupe(on);
    }
    if let Some(k) = spec.key {
        if k.is_empty() {
            return Err("the key is empty".into());
        }
        // A key given explicitly always deduplicates.
        job = job.key(k).dedupe(true);
    }
    Ok(job)
}

async fn submit(a: SubmitArgs) -> Result<(), String> {
    let run_at = match (a.run_at, a.delay) {
        (Some(t), _) => Some(t),
        (None, Some(d)) => Some(SystemTime::now() + d),
        (None, None) => None,
    };
    if a.queue.as_deref() == Some("") {
        return Err("--queue cannot be empty".into());
    }
    let defaults = Defaults {
        queue: a.queue.as_deref(),
        name: a.name.as_deref(),
        max_attempts: a.max_attempts,
        priority: a.priority,
        run_at,
        dedupe: a.dedupe,
    };
    let jobs = if a.stdin {
        let mut jobs = Vec::new();
        for (i, line) in std::io::stdin().lock().lines().enumerate() {
            let n = i + 1;
            let line = line.map_err(|e| format!("stdin line {n}: {e}"))?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            jobs.push(stdin_job(line, &defaults).map_err(|e| format!("stdin line {n}: {e}"))?);
        }
        jobs
    } else {
        let args = match &a.json {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| format!("--json is not valid JSON ({e})"))?
            }
            None => Value::Array(a.args.iter().cloned().map(Value::String).collect()),
        };
        let mut job = defaults.job(args);
        if let Some(k) = &a.key {
            if k.is_empty() {
                return Err("--key cannot be empty".into());
            }
            job = job.key(k.clone()).dedupe(true);
        }
        vec![job]
    };
    if jobs.is_empty() {
        return Ok(());
    }
    let q = open(&a.target, true).await?;
    let out = q.submit_all(jobs).await.map_err(|e| e.to_string())?;
    let mut text = String::new();
    for s in out {
        match s {
            Submitted::New(id) => text.push_str(&format!("{id}\n")),
            Submitted::Existing(id) => text.push_str(&format!("existing {id}\n")),
        }
    }
    print!("{text}");
    Ok(())
}

/// `s` cut to `max` characters, with `…` when cut; first line only.
fn short(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("");
    let cut = line.chars().count() > max || s.lines().nth(1).is_some();
    if line.chars().count() > max {
        let mut out: String = line.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    } else if cut {
        format!("{line}…")
    } else {
        line.to_string()
    }
}

/// `42s`, `5m`, `3h`, `2d`.
fn age(since: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(since)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn print_list(jobs: &[Job]) {
    if jobs.is_empty() {
        println!("no jobs");
        return;
    }
    let header = [
        "ID",
        "QUEUE",
        "NAME",
        "STATE",
        "ATTEMPT",
        "KEY",
        "AGE",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 8]> = jobs
        .iter()
        .map(|j| {
            [
                j.id.to_string(),
                short(&j.queue, 20),
                short(j.name.as_deref().unwrap_or("-"), 20),
                j.state.to_string(),
                format!("{}/{}", j.attempt, j.max_attempts),
                short(&j.key, 12),
                age(j.created_at),
                j.last_error()
                    .map(|e| short(&e.error, 60))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 8]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == 7 {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                if i == 0 || i == 4 {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                }
                out.push_str("  ");
            }
        }
        println!("{}", out.trim_end());
    };
    line(header);
    for row in &rows {
        line([
            &row[0], &row[1], &row[2], &row[3], &row[4], &row[5], &row[6], &row[7],
        ]);
    }
}

fn time_or_dash(t: Option<SystemTime>) -> String {
    t.map(format_rfc3339).unwrap_or_else(|| "-".into())
}

fn print_job(j: &Job) {
    let field = |k: &str, v: &str| println!("{:<17}{v}", format!("{k}:"));
    field("id", &j.id.to_string());
    field("queue", &j.queue);
    field("name", j.name.as_deref().unwrap_or("-"));
    let mut state = j.state.to_string();
    if j.cancel_requested {
        state.push_str(" (cancel requested)");
    }
    field("state", &state);
    field("attempt", &format!("{} of {}", j.attempt, j.max_attempts));
    let kind = if j.key_explicit { "given" } else { "derived" };
    field("key", &format!("{} ({kind})", j.key));
    field("priority", &j.priority.to_string());
    field("run at", &format_rfc3339(j.run_at));
    field("created", &format_rfc3339(j.created_at));
    field("started", &time_or_dash(j.started_at));
    field("finished", &time_or_dash(j.finished_at));
    field("pool", j.pool.as_deref().unwrap_or("-"));
    field("node", j.node.as_deref().unwrap_or("-"));
    field("worker", j.worker.as_deref().unwrap_or("-"));
    field("args", &j.args.to_string());
    field(
        "result",
        &j.result
            .as_ref()
            .map(Value::to_string)
            .unwrap_or_else(|| "-".into()),
    );
    if j.errors.is_empty() {
        field("errors", "-");
    } else {
        println!("errors:");
        for e in &j.errors {
            let mut lines = e.error.lines();
            println!(
                "  attempt {} at {}: {}",
                e.attempt,
                format_rfc3339(e.at),
                lines.next().unwrap_or("")
            );
            for more in lines {
                println!("    {more}");
            }
        }
    }
}

fn print_nodes(nodes: &[Node]) {
    if nodes.is_empty() {
        println!("no nodes");
        return;
    }
    let rows: Vec<[String; 7]> = nodes
        .iter()
        .map(|n| {
            let pools: Vec<String> = n
                .pools
                .iter()
                .map(|p| format!("{}:{}", p.name, p.slots))
                .collect();
            [
                n.name.clone(),
                n.state.to_string(),
                format!("{} ({})", n.host, n.pid),
                format!("{} ago", age(n.heartbeat_at)),
                n.running.to_string(),
                n.capacity.to_string(),
                pools.join(","),
            ]
        })
        .collect();
    let header = [
        "NODE",
        "STATE",
        "HOST (PID)",
        "HEARTBEAT",
        "RUNNING",
        "CAPACITY",
        "POOLS",
    ];
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 7]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            out.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
        }
        println!("{}", out.trim_end());
    };
    line(header);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6]]);
    }
}

fn print_stats(s: &JobStats) {
    println!(
        "total {}: {} queued, {} running, {} done, {} failed, {} cancelled",
        s.total, s.queued, s.running, s.done, s.failed, s.cancelled
    );
    if s.per_queue.is_empty() {
        return;
    }
    let width = s
        .per_queue
        .keys()
        .map(|q| q.chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    println!(
        "{:<width$}  {:>8}  {:>8}  {:>8}  {:>8}  {:>9}",
        "QUEUE", "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED"
    );
    for (queue, c) in &s.per_queue {
        let c: &StateCounts = c;
        println!(
            "{queue:<width$}  {:>8}  {:>8}  {:>8}  {:>8}  {:>9}",
            c.queued, c.running, c.done, c.failed, c.cancelled
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_cuts_by_characters_and_lines() {
        assert_eq!(short("abc", 5), "abc");
        assert_eq!(short("abcdefgh", 5), "abcd…");
        assert_eq!(short("ééééééé", 3), "éé…");
        assert_eq!(short("one\ntwo", 10), "one…");
        assert_eq!(short("", 3), "");
    }

    #[test]
    fn stdin_lines() {
        let d = Defaults {
            queue: Some("q"),
            name: None,
            max_attempts: None,
            priority: None,
            run_at: None,
            dedupe: false,
        };
        let bare = stdin_job(r#"{"x": 1}"#, &d).unwrap();
        assert_eq!(bare.args, serde_json::json!({"x": 1}));
        assert_eq!(bare.queue, "q");
        let spec = stdin_job(
            r#"{"args": [1], "queue": "r", "key": "k", "max_attempts": 2}"#,
            &d,
        )
        .unwrap();
        assert_eq!((spec.queue.as_str(), spec.max_attempts), ("r", 2));
        assert!(spec.dedupe, "an explicit key dedupes");
        assert!(stdin_job("{oops", &d).is_err());
        assert!(stdin_job(r#"{"args": 1, "bogus": 2}"#, &d).is_err());
        assert!(stdin_job(r#"{"args": 1, "max_attempts": 0}"#, &d).is_err());
        assert!(stdin_job(r#"{"args": 1, "run_at": "soon"}"#, &d).is_err());
        assert!(stdin_job(r#"{"args": 1, "delay": -1}"#, &d).is_err());
    }
}
