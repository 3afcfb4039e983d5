//! A real PostgreSQL for the tests: the server `CLUSTER_TEST_PG` names
//! (`.ci/run` starts one), else a throwaway one this process starts with
//! the machine's `initdb` and `pg_ctl` (as `nobody` when the tests run as
//! root, since PostgreSQL refuses root), on a free loopback port, with its
//! data and socket in a temp dir. A watchdog stops it and removes the dir
//! when the test process exits, however it exits.
//!
//! Each test takes its own schema ([`fresh_url`]), so tests that share one
//! server never see each other's jobs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The role with a password that the wrong-password test logs in as.
pub const PASSWORD_USER: &str = "cluster_pw";
pub const PASSWORD: &str = "right-password";

/// A server this process started; stopped when dropped.
pub struct Server {
    pub url: String,
    pub port: u16,
    dir: PathBuf,
    as_nobody: bool,
}

fn pg_bin(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        dirs.extend(versions.into_iter().rev());
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

impl Server {
    /// Starts a new server; `None` (with a line saying why) when the
    /// machine has no PostgreSQL.
    pub fn start() -> Option<Server> {
        let (Some(initdb), Some(pg_ctl)) = (pg_bin("initdb"), pg_bin("pg_ctl")) else {
            eprintln!(
                "no initdb/pg_ctl on this machine: install PostgreSQL or set CLUSTER_TEST_PG"
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("cluster-pg-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let as_nobody = is_root();
        let port = super::free_port();
        let data = dir.join("data");
        let server = Server {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            port,
            dir: dir.clone(),
            as_nobody,
        };
        if as_nobody {
            let ok = Command::new("chown")
                .args(["-R", "nobody"])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown {} to nobody", dir.display());
        }
        let out = server
            .command(&initdb)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hba = format!(
            "local all all trust\nhost all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n"
        );
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        server.pg_ctl(&pg_ctl, "start");
        // The watchdog: when this process is gone, stop the server and
        // remove its directory.
        let me = std::process::id();
        let script = format!(
            "while [ -d /proc/{me} ]; do sleep 0.5; done; '{}' -D '{}' stop -m immediate >/dev/null 2>&1; rm -rf '{}'",
            pg_ctl.display(),
            data.display(),
            dir.display()
        );
        // Not waited for: it outlives this process on purpose.
        #[allow(clippy::zombie_processes)]
        let _watchdog = server
            .command(Path::new("/bin/sh"))
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the watchdog");
        server.wait_ready();
        server.sql(&format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{PASSWORD_USER}') \
             THEN CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'; END IF; END $$; \
             GRANT ALL ON DATABASE postgres TO {PASSWORD_USER}"
        ));
        Some(server)
    }

    fn command(&self, program: &Path) -> Command {
        if self.as_nobody {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(program);
            c.current_dir("/");
            c
        } else {
            Command::new(program)
        }
    }

    fn pg_ctl(&self, pg_ctl: &Path, action: &str) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k '{}' -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300",
            self.port,
            self.dir.display()
        );
        let out = self
            .command(pg_ctl)
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-o", &opts, "-w", "-t", "60", "-m", "fast", action])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success() || action == "stop",
            "pg_ctl {action} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    /// Stops the server (fast: connections are cut).
    pub fn stop(&self) {
        if let Some(pg_ctl) = pg_bin("pg_ctl") {
            self.pg_ctl(&pg_ctl, "stop");
        }
    }

    /// Starts it again after [`Server::stop`].
    pub fn start_again(&self) {
        let pg_ctl = pg_bin("pg_ctl").expect("pg_ctl");
        self.pg_ctl(&pg_ctl, "start");
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !try_sql(&self.url, "SELECT 1") {
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs SQL as the superuser; panics on failure.
    pub fn sql(&self, sql: &str) {
        assert!(try_sql(&self.url, sql), "SQL failed: {sql}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(pg_ctl) = pg_bin("pg_ctl") {
            let _ = self
                .command(&pg_ctl)
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["stop", "-m", "immediate"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `sql` on `url`; whether it worked.
pub fn try_sql(url: &str, sql: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let Ok((client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await else {
            return false;
        };
        let task = tokio::spawn(conn);
        let ok = client.batch_execute(sql).await.is_ok();
        drop(client);
        let _ = task.await;
        ok
    })
}

/// The shared server's base URL: `CLUSTER_TEST_PG`, else one started for
/// this test process. `None` (the test skips, saying so) only when the
/// variable is unset and the machine has no PostgreSQL.
pub fn base_url() -> Option<String> {
    static SHARED: OnceLock<Option<Shared>> = OnceLock::new();
    struct Shared {
        url: String,
        _server: Option<Server>,
    }
    SHARED
        .get_or_init(|| {
            if let Ok(url) = std::env::var("CLUSTER_TEST_PG") {
                if !url.is_empty() {
                    return Some(Shared { url, _server: None });
                }
            }
            Server::start().map(|s| Shared {
                url: s.url.clone(),
                // Never dropped: the watchdog stops it at exit.
                _server: Some(s),
            })
        })
        .as_ref()
        .map(|s| s.url.clone())
}

/// `url` with a schema of its own: `…?schema=t_PID_N` (or `&schema=`).
pub fn with_fresh_schema(url: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}schema=t_{}_{n}", std::process::id())
}

/// A URL on the shared server with a schema no other test uses; `None`
/// when there is no PostgreSQL (the caller returns: the test is skipped).
pub fn fresh_url() -> Option<String> {
    match base_url() {
        Some(u) => Some(with_fresh_schema(&u)),
        None => {
            eprintln!("SKIPPED: no PostgreSQL (set CLUSTER_TEST_PG or install PostgreSQL)");
            None
        }
    }
}
