//! The wire protocol between the watcher and its workers.
//!
//! Two `#[non_exhaustive]` enums, one per direction, encoded with postcard;
//! one message per `SOCK_SEQPACKET` datagram, file descriptors attached to
//! the datagram that needs them. The protocol is private to the crate: it
//! may change between versions, which is why both sides say [`VERSION`]
//! first and refuse a peer that speaks another.

use serde::{Deserialize, Serialize};

use crate::log::LogRecord;

/// Protocol version, sent in both `Hello` messages.
pub(crate) const VERSION: u32 = 4;

/// Largest encoded message, in bytes. A datagram longer than this is a
/// protocol error on the receiving side and is refused on the sending side.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;

/// Most file descriptors one message may carry.
pub(crate) const MAX_FDS: usize = 4;

/// Watcher to worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub(crate) enum ToWorker {
    /// First message on every channel.
    Hello {
        version: u32,
        context_id: u64,
        slot: u32,
    },
    /// Answer to `SocketRequest { id }`; on `Ok` one listening socket is attached.
    SocketReply { id: u64, result: Result<(), String> },
    /// Stop gracefully; the watcher escalates after `deadline_ms`.
    Stop { deadline_ms: u64 },
    /// Heartbeat; answered with `Pong` by the worker's runtime.
    Ping { seq: u64 },
    /// Answer to `SocketRequest { id }` in a balanced mode (round-robin, least-connections, ip-hash): the
    /// watcher accepts on `addr` and sends `Connection`s tagged `listener`.
    BalancedReply {
        id: u64,
        result: Result<BalancedGrant, String>,
    },
    /// One accepted client connection for balanced listener `listener`; the
    /// connected socket is attached.
    Connection {
        listener: u64,
        conn: u64,
        peer: String,
    },
    /// A user message (postcard bytes, typed at the API edge).
    Data(Vec<u8>),
    /// Run this job (the worker said `JobsReady` and has room for it).
    Job(Box<JobOrder>),
    /// Stop running job `ticket` (timed out or cancelled); answered with
    /// its `JobDone`.
    CancelJob { ticket: u64 },
    /// A part of the arguments of job `ticket`, whose `Job` follows with
    /// the last part (see `ipc/parts.rs`).
    JobPart { ticket: u64, part: String },
}

/// A job for a worker's handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JobOrder {
    /// The watcher's id for this run, echoed in `JobDone`.
    pub ticket: u64,
    /// The stored job's id and attempt (`None` for an in-memory call).
    pub job: Option<(i64, u32)>,
    /// The handler to run.
    pub name: String,
    /// The arguments, as JSON text.
    pub args: String,
    pub queue: String,
    pub pool: String,
    pub node: String,
}

/// Why a job did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum JobFailure {
    /// The handler returned an error.
    Failed(String),
    /// The handler panicked.
    Panicked(String),
    /// The worker has no handler by that name.
    NoHandler(String),
    /// The arguments do not deserialize into what the handler takes.
    BadArgs(String),
    /// Stopped after `CancelJob`.
    Cancelled,
}

/// Worker to watcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub(crate) enum ToWatcher {
    /// First message on every channel.
    Hello { version: u32, pid: u32 },
    /// The worker is ready to serve.
    Ready,
    /// Please hand me the listening socket for `addr`.
    SocketRequest { id: u64, addr: String },
    /// Answer to `Ping { seq }`.
    Pong { seq: u64 },
    /// A user message (postcard bytes, typed at the API edge).
    Data(Vec<u8>),
    /// Forwarded log records, oldest first.
    Logs(Vec<LogRecord>),
    /// Records the worker dropped because its queue was full.
    LogsDropped(u64),
    /// `count` connections handed off on `listener` have been closed.
    ConnectionsClosed { listener: u64, count: u32 },
    /// A handed-off connection the worker will not serve (its listener is
    /// gone), attached, for the watcher to give to another worker.
    ConnectionReturned {
        listener: u64,
        conn: u64,
        peer: String,
    },
    /// The worker's code accepted these handed-off connections: the
    /// watcher closes the copies it kept in case the worker died first.
    ConnectionsAccepted { listener: u64, conns: Vec<u64> },
    /// The worker runs jobs: these handlers, this many at once.
    JobsReady {
        handlers: Vec<String>,
        concurrency: u32,
    },
    /// Job `ticket` ended: its result as JSON text, or why it has none.
    JobDone {
        ticket: u64,
        result: Result<String, JobFailure>,
    },
    /// The worker served its `--max-requests` (`requests` of them): replace it.
    Recycle { requests: u64 },
    /// A part of the result of job `ticket`, whose `JobDone` follows with
    /// the last part (see `ipc/parts.rs`).
    JobDonePart { ticket: u64, part: String },
}

/// A balanced listener granted to a worker: the watcher accepts and sends
/// each connection as a `Connection` tagged `listener`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BalancedGrant {
    pub listener: u64,
    /// The watcher's listening address (with the real port for port 0).
    pub local: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::codec::{decode, encode, DecodeError, EncodeError};
    use proptest::prelude::*;

    #[test]
    fn round_trip_every_variant() {
        let to_worker = [
            ToWorker::Hello {
                version: VERSION,
                context_id: 7,
                slot: 3,
            },
            ToWorker::SocketReply {
                id: 1,
                result: Err("in use".into()),
            },
            ToWorker::SocketReply {
                id: 2,
                result: Ok(()),
            },
            ToWorker::Stop { deadline_ms: 5000 },
            ToWorker::Ping { seq: 9 },
            ToWorker::Data(vec![1, 2, 3]),
            ToWorker::BalancedReply {
                id: 3,
                result: Ok(BalancedGrant {
                    listener: 1,
                    local: "127.0.0.1:80".into(),
                }),
            },
            ToWorker::Connection {
                listener: 1,
                conn: 2,
                peer: "127.0.0.1:5000".into(),
            },
            ToWorker::Job(Box::new(JobOrder {
                ticket: 4,
                job: Some((12, 1)),
                name: "resize".into(),
                args: "{\"w\":1}".into(),
                queue: "q".into(),
                pool: "p".into(),
                node: "n".into(),
            })),
            ToWorker::CancelJob { ticket: 4 },
            ToWorker::JobPart {
                ticket: 4,
                part: "[1,".into(),
            },
        ];
        for m in to_worker {
            assert_eq!(decode::<ToWorker>(&encode(&m).unwrap()).unwrap(), m);
        }
        let to_watcher = [
            ToWatcher::Hello {
                version: VERSION,
                pid: 42,
            },
            ToWatcher::Ready,
            ToWatcher::SocketRequest {
                id: 5,
                addr: "127.0.0.1:80".into(),
            },
            ToWatcher::Pong { seq: 9 },
            ToWatcher::Data(vec![]),
            ToWatcher::Logs(vec![LogRecord {
                level: 3,
                target: "t".into(),
                message: "m".into(),
                fields: vec![("k".into(), "v".into())],
                spans: vec!["s".into()],
                ts_nanos: 1,
            }]),
            ToWatcher::LogsDropped(7),
            ToWatcher::ConnectionsClosed {
                listener: 1,
                count: 3,
            },
            ToWatcher::ConnectionReturned {
                listener: 1,
                conn: 2,
                peer: "127.0.0.1:9".into(),
            },
            ToWatcher::ConnectionsAccepted {
                listener: 1,
                conns: vec![2, 3],
            },
            ToWatcher::JobsReady {
                handlers: vec!["a".into()],
                concurrency: 2,
            },
            ToWatcher::JobDone {
                ticket: 4,
                result: Ok("null".into()),
            },
            ToWatcher::JobDone {
                ticket: 5,
                result: Err(JobFailure::BadArgs("x".into())),
            },
            ToWatcher::Recycle { requests: 1000 },
            ToWatcher::JobDonePart {
                ticket: 5,
                part: "{\"a\":".into(),
            },
        ];
        for m in to_watcher {
            assert_eq!(decode::<ToWatcher>(&encode(&m).unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn oversize_is_refused_on_encode() {
        let big = ToWatcher::Data(vec![0; MAX_MESSAGE]);
        assert!(matches!(encode(&big), Err(EncodeError::TooLarge { .. })));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = encode(&ToWatcher::Ready).unwrap();
        bytes.push(0);
        assert_eq!(
            decode::<ToWatcher>(&bytes),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn empty_datagram_is_an_error() {
        assert!(decode::<ToWatcher>(&[]).is_err());
        assert!(decode::<ToWorker>(&[]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// Arbitrary bytes from a peer never panic the decoder.
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<ToWatcher>(&bytes);
            let _ = decode::<ToWorker>(&bytes);
        }

        /// Mutating one byte of a valid message never panics either.
        #[test]
        fn decoder_never_panics_on_mutated_messages(
            addr in ".{0,64}", id in any::<u64>(), pos in any::<usize>(), byte in any::<u8>()
        ) {
            let mut bytes = encode(&ToWatcher::SocketRequest { id, addr }).unwrap();
            let i = pos % bytes.len();
            bytes[i] = byte;
            let _ = decode::<ToWatcher>(&bytes);
        }
    }
}
