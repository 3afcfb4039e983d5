//! The [`ClusterWatcherBuilder`] options of the jobs (`--jobs` and
//! friends) and of the job server (`--job-server` and friends).

use std::path::PathBuf;
use std::time::Duration;

use super::ClusterWatcherBuilder;
use crate::jobs::dispatch::config::{JobSourceFn, JobsConfig, Source};
use crate::jobserver::JobServerConfig;

impl ClusterWatcherBuilder {
    /// Run jobs from the job store at `url` (`jobs.db`, `sqlite://path`):
    /// the watcher claims the jobs of its pools' queues and hands them to
    /// workers that serve [`Cluster::jobs`](crate::Cluster::jobs) (or, with
    /// [`per_job`](Self::per_job), runs the program once per job). See the
    /// README's "Jobs" section for the model and its guarantees.
    pub fn jobs(mut self, url: impl Into<String>) -> Self {
        self.config.jobs = Some(JobsConfig::new(url.into()));
        self
    }

    fn jobs_mut(&mut self) -> &mut JobsConfig {
        self.config
            .jobs
            .get_or_insert_with(|| JobsConfig::new(String::new()))
    }

    /// A pool, `NAME=RATIO` or `NAME=RATIO:shared` (repeatable; needs
    /// [`jobs`](Self::jobs)): `ceil(workers × RATIO)` slots that take the
    /// jobs of queue NAME; a shared pool also takes the other pools'
    /// excess, in definition order. Without any, one pool `default` has
    /// every worker.
    pub fn pool(mut self, spec: impl Into<String>) -> Self {
        self.config.pool_args.push(spec.into());
        self
    }

    /// Run the program once per job (`PROGRAM ARGS... JOBARGS...`) instead
    /// of persistent workers (default off).
    pub fn per_job(mut self, on: bool) -> Self {
        self.jobs_mut().per_job = on;
        self
    }

    /// Jobs a persistent worker runs at once (default 1).
    pub fn job_concurrency(mut self, n: u32) -> Self {
        self.jobs_mut().concurrency = n.max(1);
        self
    }

    /// Jobs claimed per queue beyond what its pools can start now (default
    /// 0): they wait in the watcher, so a worker that finishes gets the
    /// next one without a store round trip. They count as `running` in the
    /// store meanwhile (a watcher crash re-queues them; a clean stop gives
    /// them back).
    pub fn job_prefetch(mut self, n: usize) -> Self {
        self.jobs_mut().prefetch = n;
        self
    }

    /// Safe mode (default on): never two running jobs with the same key.
    pub fn safe_mode(mut self, on: bool) -> Self {
        self.jobs_mut().safe_mode = on;
        self
    }

    /// Attempts of the jobs job sources queue (default 3).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.jobs_mut().max_attempts = n.max(1);
        self
    }

    /// Stop an attempt that runs longer than `timeout` (default: none).
    pub fn job_timeout(mut self, timeout: Duration) -> Self {
        self.jobs_mut().timeout = Some(timeout).filter(|t| !t.is_zero());
        self
    }

    /// The first delay before a failed job runs again (default 1 s;
    /// doubling per attempt, ±25 % jitter, at most 10 min).
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.jobs_mut().retry_delay = delay;
        self
    }

    /// A job source command, run through `sh -c` once per pool every
    /// [`job_source_interval`](Self::job_source_interval) with
    /// `CLUSTER_POOL` and `CLUSTER_LIMIT` set; each JSON line it prints is
    /// a job, deduplicated by key against queued and running jobs.
    pub fn job_source_command(mut self, command: impl Into<String>) -> Self {
        self.jobs_mut()
            .sources
            .push(Source::Command(command.into()));
        self
    }

    /// A job source in code: called once per pool every interval with the
    /// pool's name and slot count; the jobs it returns are queued,
    /// deduplicated by key.
    ///
    /// ```no_run
    /// # fn build() -> Result<(), cluster::Error> {
    /// use cluster::{ClusterWatcher, NewJob};
    /// let watcher = ClusterWatcher::builder(std::process::Command::new("./worker"))
    ///     .jobs("jobs.db")
    ///     .job_source(|pool: String, limit: usize| async move {
    ///         (0..limit).map(|i| NewJob::new(serde_json::json!([i])).queue(pool.clone())).collect()
    ///     })
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn job_source<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(String, usize) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Vec<crate::NewJob>> + Send + 'static,
    {
        let f: JobSourceFn = std::sync::Arc::new(move |pool, limit| Box::pin(f(pool, limit)));
        self.jobs_mut().sources.push(Source::Closure(f));
        self
    }

    /// How often job sources run (default 5 s).
    pub fn job_source_interval(mut self, every: Duration) -> Self {
        self.jobs_mut().source_interval = every.max(Duration::from_millis(10));
        self
    }

    /// The PostgreSQL schema that holds the job tables (default
    /// `cluster`, or the URL's `schema=` parameter): watchers with the
    /// same database and schema share their jobs.
    pub fn jobs_schema(mut self, schema: impl Into<String>) -> Self {
        self.jobs_mut().schema = Some(schema.into());
        self
    }

    /// This watcher's node name on a shared (PostgreSQL) store (default:
    /// the host name plus a per-start id). Job processes see it as
    /// `CLUSTER_NODE`, handlers as [`JobContext::node`](crate::JobContext::node).
    pub fn node(mut self, name: impl Into<String>) -> Self {
        self.jobs_mut().node = Some(name.into());
        self
    }

    /// How long this node may miss heartbeats before the other nodes
    /// declare it dead and run its jobs again (default 30 s; at least
    /// 200 ms).
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.jobs_mut().node_timeout = timeout.max(Duration::from_millis(200));
        self
    }

    /// Serve the job server's HTTP/1.1 JSON API on `addr` (repeatable):
    /// `host:port`, `[::]:port` or `unix:///path`. Clients call the
    /// workers' [`Cluster::jobs`](crate::Cluster::jobs) handlers by name
    /// (`POST /v1/call/{name}`) and, with [`jobs`](Self::jobs), submit
    /// durable jobs. An address other hosts can reach needs
    /// [`job_server_token`](Self::job_server_token). See the README's "Job
    /// server" section and `docs/openapi.json`.
    pub fn job_server(mut self, addr: impl Into<String>) -> Self {
        self.job_server_mut().addr_args.push(addr.into());
        self
    }

    fn job_server_mut(&mut self) -> &mut JobServerConfig {
        self.config
            .job_server
            .get_or_insert_with(JobServerConfig::default)
    }

    /// The bearer token every job server request must carry
    /// (`Authorization: Bearer <token>`); required for an address other
    /// hosts can reach.
    pub fn job_server_token(mut self, token: impl Into<String>) -> Self {
        self.job_server_mut().token = Some(token.into());
        self
    }

    /// Read the job server's token from the first line of `path`.
    pub fn job_server_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.job_server_mut().token_file = Some(path.into());
        self
    }

    /// The largest request body the job server takes (default 1 MiB); a
    /// larger one gets 413.
    pub fn job_max_body(mut self, bytes: usize) -> Self {
        self.job_server_mut().max_body = bytes;
        self
    }

    /// How long a job server client has to send a request head, and then
    /// its body (default 10 s); a slower one is disconnected (head) or gets
    /// 408 (body).
    pub fn job_header_timeout(mut self, timeout: Duration) -> Self {
        self.job_server_mut().header_timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// How many in-memory calls may wait for a busy worker (default
    /// 10,000); past it a call gets 503 at once.
    pub fn job_queue_limit(mut self, n: usize) -> Self {
        self.jobs_mut().call_queue_limit = n;
        self
    }

    /// How long finished jobs are kept before they are deleted (default 7 days).
    pub fn jobs_retention(mut self, keep: Duration) -> Self {
        self.jobs_mut().retention = keep;
        self
    }
}
