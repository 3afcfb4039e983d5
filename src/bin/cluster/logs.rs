//! `cluster logs`: prints the last lines of a daemon's `--log-file`
//! (asked of the running watcher, or given), and with `-f` follows it,
//! across logrotate's moves and truncations.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use cluster::control::{request, Request};

/// How often a followed file is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// `cluster logs` options.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The watcher's pid file (its log file is asked of it)
    #[arg(short = 'p', long, value_name = "FILE", group = "source")]
    pub pid_file: Option<PathBuf>,
    /// The watcher's control socket
    #[arg(long, value_name = "PATH", group = "source")]
    pub control_socket: Option<PathBuf>,
    /// The log file itself (works when no watcher runs)
    #[arg(long, value_name = "FILE", group = "source")]
    pub log_file: Option<PathBuf>,
    /// Keep printing lines as they are written (Ctrl-C stops)
    #[arg(short, long)]
    pub follow: bool,
    /// How many of the last lines to print first
    #[arg(short = 'n', long, value_name = "N", default_value = "10")]
    pub lines: usize,
}

pub fn run(args: LogsArgs) -> ExitCode {
    let path = match log_path(&args) {
        Ok(p) => p,
        Err((code, line)) => {
            eprintln!("cluster: error: {line}");
            return ExitCode::from(code);
        }
    };
    match show(&path, args.lines, args.follow) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster: error: cannot read {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// The log file: given, or asked of the running watcher.
fn log_path(args: &LogsArgs) -> Result<PathBuf, (u8, String)> {
    if let Some(p) = &args.log_file {
        return Ok(p.clone());
    }
    let socket = match (&args.control_socket, &args.pid_file) {
        (Some(s), _) => s.clone(),
        (None, Some(p)) => cluster::control::socket_for_pid_file(p),
        (None, None) => return Err((2, "give --pid-file, --control-socket or --log-file".into())),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (1, format!("cannot start the runtime: {e}")))?;
    let answer = runtime
        .block_on(request(&socket, &Request::Status { quick: true }))
        .map_err(|e| (3, format!("{e}; give the file with --log-file")))?;
    if !answer.ok {
        return Err((
            1,
            answer.error.unwrap_or_else(|| "the watcher refused".into()),
        ));
    }
    answer.log_file.map(PathBuf::from).ok_or_else(|| {
        (
            1,
            "the watcher writes no log file (it runs in the foreground, or with --daemon and no --log-file)".into(),
        )
    })
}

/// Prints the last `n` lines of `path`, then follows it if asked.
fn show(path: &Path, n: usize, follow: bool) -> std::io::Result<()> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = tail_start(&mut file, len, n)?;
    file.seek(SeekFrom::Start(start))?;
    let mut out = std::io::stdout().lock();
    std::io::copy(&mut file, &mut out)?;
    out.flush()?;
    if !follow {
        return Ok(());
    }
    let mut inode = file.metadata()?.ino();
    let mut pos = file.stream_position()?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            out.flush()?;
            pos += n as u64;
            continue;
        }
        std::thread::sleep(FOLLOW_POLL);
        match std::fs::metadata(path) {
            // Moved away (logrotate): the rest of the old file was read
            // above; go on with the new one from its start.
            Ok(m) if m.ino() != inode => {
                if let Ok(f) = File::open(path) {
                    file = f;
                    inode = m.ino();
                    pos = 0;
                }
            }
            // Truncated (copytruncate): start over.
            Ok(m) if m.len() < pos => {
                file.seek(SeekFrom::Start(0))?;
                pos = 0;
            }
            _ => {}
        }
    }
}

/// Where the last `n` lines of `file` (of `len` bytes) start.
fn tail_start(file: &mut File, len: u64, n: usize) -> std::io::Result<u64> {
    if n == 0 {
        return Ok(len);
    }
    let mut newlines = 0usize;
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    // A last line without a newline counts as a line; a final newline does not start one.
    let mut skip_final = true;
    while end > 0 {
        let size = chunk.len().min(end as usize);
        let start = end - size as u64;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..size])?;
        for i in (0..size).rev() {
            if chunk[i] == b'\n' {
                if skip_final && start + i as u64 == len - 1 {
                    continue;
                }
                newlines += 1;
                if newlines == n {
                    return Ok(start + i as u64 + 1);
                }
            }
            skip_final = false;
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_finds_the_last_lines() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"a\nb\nc\nd\n").unwrap();
        let len = 8;
        assert_eq!(tail_start(&mut f, len, 2).unwrap(), 4);
        assert_eq!(tail_start(&mut f, len, 10).unwrap(), 0);
        assert_eq!(tail_start(&mut f, len, 0).unwrap(), len);
        let mut g = tempfile::tempfile().unwrap();
        g.write_all(b"a\nb\nc").unwrap();
        assert_eq!(tail_start(&mut g, 5, 1).unwrap(), 4);
    }
}
