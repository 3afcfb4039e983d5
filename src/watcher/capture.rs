//! Capturing what a process prints: each line of its stdout or stderr
//! goes to the log stream (and into a [`Tail`] for a per-job process's
//! result and error text). A leaf: the worker launcher (`process.rs`) and
//! the per-job runner (`jobs/dispatch/runner.rs`) use it.

use std::sync::{Arc, Mutex};

use super::output::{LogOutput, Source};
use crate::log::{now_nanos, LogRecord};

/// Longest captured line; the rest of a longer line is cut with a note.
const MAX_LINE: usize = 16 * 1024;

/// The end of what a process printed on one stream: its last line, and
/// its last [`TAIL_BYTES`] bytes of lines (for a per-job process, its
/// result and its error text).
#[derive(Debug, Default)]
pub(crate) struct Tail {
    pub last_line: String,
    pub text: String,
}

/// How much of a stream a [`Tail`] keeps.
pub(crate) const TAIL_BYTES: usize = 4096;

impl Tail {
    fn push(&mut self, line: &str) {
        self.last_line = line.to_string();
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(line);
        if self.text.len() > TAIL_BYTES {
            let mut cut = self.text.len() - TAIL_BYTES;
            while !self.text.is_char_boundary(cut) {
                cut += 1;
            }
            self.text.drain(..cut);
        }
    }
}

/// Forwards each line a process writes on `stream` to the log output (and
/// into `tail`, when given). Lines are never split: an over-long line is
/// cut at [`MAX_LINE`] bytes with a note, invalid UTF-8 is replaced, and a
/// last line without a newline is still forwarded at EOF.
pub(crate) fn capture(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    output: LogOutput,
    source: Source,
    tail: Option<Arc<Mutex<Tail>>>,
) -> tokio::task::JoinHandle<()> {
    use tokio::io::AsyncBufReadExt;
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::with_capacity(MAX_LINE, stream);
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            let mut cut = 0usize;
            let mut eof = false;
            loop {
                let buf = match reader.fill_buf().await {
                    Ok(b) => b,
                    Err(_) => {
                        eof = true;
                        break;
                    }
                };
                if buf.is_empty() {
                    eof = true;
                    break;
                }
                let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (buf.len(), false),
                };
                let content = if done { &buf[..take - 1] } else { &buf[..take] };
                let room = MAX_LINE.saturating_sub(line.len());
                line.extend_from_slice(&content[..content.len().min(room)]);
                cut += content.len().saturating_sub(room);
                reader.consume(take);
                if done {
                    break;
                }
            }
            if !line.is_empty() || cut > 0 || !eof {
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                let mut message = String::from_utf8_lossy(&line).into_owned();
                if cut > 0 {
                    message.push_str(&format!("… [{cut} bytes cut]"));
                }
                if let Some(tail) = &tail {
                    if let Ok(mut t) = tail.lock() {
                        t.push(&message);
                    }
                }
                output.emit(
                    source,
                    LogRecord {
                        level: output.line_level(source),
                        target: String::new(),
                        message,
                        fields: Vec::new(),
                        spans: Vec::new(),
                        ts_nanos: now_nanos(),
                    },
                );
            }
            if eof {
                return;
            }
        }
    })
}
