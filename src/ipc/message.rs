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
pub(crate) const VERSION: u32 = 5;

/// Largest encoded message, in bytes. A datagram longer than this is a
/// protocol error on the receiving side and is refused on the sending side.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;

/// The first byte of an encoded [`ToWatcher::Logs`]: postcard writes an
/// enum's variant index first (a one-byte varint below 128). The watcher
/// reads a `Logs` datagram in place ([`logs_batch`]) instead of decoding
/// it into owned records; a test keeps this in step with the enum.
const LOGS_TAG: u8 = 5;

/// The records' bytes of a datagram that holds a [`ToWatcher::Logs`]
/// (everything after its tag), or `None` for any other message.
pub(crate) fn logs_batch(datagram: &[u8]) -> Option<&[u8]> {
    match datagram.split_first() {
        Some((&LOGS_TAG, records)) => Some(records),
        _ => None,
    }
}

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
    Data(#[serde(with = "raw_bytes")] Vec<u8>),
    /// Run this job (the worker said `JobsReady` and has room for it).
    Job(Box<JobOrder>),
    /// Stop running job `ticket` (timed out or cancelled); answered with
    /// its `JobDone`.
    CancelJob { ticket: u64 },
    // Shared state and commands (storage, watches, commands between processes).
    /// Answers to `Requests`, by request id, in the order they were asked.
    Replies(Vec<Reply>),
    /// Commands for this worker's handlers; each is answered in `CallResults`.
    Calls(Vec<Call>),
    /// Changes seen by this worker's watches, in the store's order.
    Changes(Vec<Change>),
    /// Watch `watch` ended (its worker did not keep up with its changes).
    WatchEnded { watch: u64, reason: String },
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
    Data(#[serde(with = "raw_bytes")] Vec<u8>),
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
    // Shared state and commands (storage, watches, commands between processes).
    /// Storage operations, watches and commands, each answered by a `Reply`
    /// with its id. Handled by the hub as they arrive, never queued.
    Requests(Vec<Request>),
    /// Results of `Calls` this worker ran.
    CallResults(Vec<CallResult>),
    /// The worker's status as `Cluster::set_status` set it.
    SetStatus(String),
    /// A part of the result of job `ticket`, whose `JobDone` follows with
    /// the last part (see `ipc/parts.rs`).
    JobDonePart { ticket: u64, part: String },
}

/// Most requests of one `Requests` message the hub applies (the worker packs
/// at most [`REQUEST_BATCH`]); each one past it is answered with a busy
/// error.
pub(crate) const MAX_REQUESTS: usize = 1024;

/// Most requests a worker packs into one `Requests` message.
pub(crate) const REQUEST_BATCH: usize = 256;

/// Largest JSON text one value may have to travel in one message (a value
/// set by a worker, a `get` reply, a command's arguments or result); the
/// rest of [`MAX_MESSAGE`] is room for the envelope.
pub(crate) const MAX_VALUE: usize = MAX_MESSAGE - 2048;

/// One request to the watcher's hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Request {
    /// Chosen by the worker, echoed in the `Reply`; a `Watch`'s id names
    /// the watch afterwards.
    pub id: u64,
    pub body: RequestBody,
}

/// What a worker asks the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RequestBody {
    Storage(StorageOp),
    /// Send changes at or under `prefix` (dot path; empty: everything).
    Watch {
        prefix: String,
    },
    /// Stop watch `watch` (answered, like every request).
    Unwatch {
        watch: u64,
    },
    /// Run command `name` with `args` (JSON text) on `target`; the watcher
    /// answers with a timeout error after `timeout_ms`.
    Call {
        target: TargetSpec,
        name: String,
        args: String,
        timeout_ms: u64,
    },
}

/// One storage operation; paths are dot paths, values JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum StorageOp {
    Get {
        path: String,
    },
    GetVersioned {
        path: String,
    },
    Set {
        path: String,
        value: String,
        ttl_ms: Option<u64>,
    },
    Delete {
        path: String,
    },
    Increment {
        path: String,
        by: i64,
    },
    CompareAndSwap {
        path: String,
        expected: Option<String>,
        new: String,
    },
    /// Set `value` if the path's version is still `version` (0: absent).
    Update {
        path: String,
        version: u64,
        value: String,
    },
}

/// Where a command goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum TargetSpec {
    Watcher,
    Slot(u32),
    Name(String),
    All,
}

/// The hub's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub id: u64,
    pub result: Result<ReplyBody, HubError>,
}

/// What a request produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ReplyBody {
    /// `Get`: the value's JSON text, `None` when the path is missing.
    Value(Option<String>),
    /// `GetVersioned`: the value and its version.
    Versioned(Option<(String, u64)>),
    /// `Set`: the new version.
    Version(u64),
    /// `Delete` (the path existed), `CompareAndSwap` (it was swapped),
    /// `Watch` and `Unwatch` (true).
    Done(bool),
    /// `Increment`: the new value.
    Int(i64),
    /// `Update`: the new version, `None` when the version did not match.
    Updated(Option<u64>),
    /// One process's answer to a `Call`; `remaining` more follow (for
    /// `TargetSpec::All`, one per worker).
    Answer { answer: Answer, remaining: u32 },
}

/// One process's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Answer {
    pub from: Responder,
    /// The handler's result as JSON text.
    pub result: Result<String, HubError>,
}

/// Who answered: slot 0 is the watcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Responder {
    pub slot: u32,
    pub name: Option<String>,
    pub pid: u32,
    pub context_id: u64,
}

/// Why a request failed; the worker turns it into a `cluster::Error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HubError {
    pub kind: HubErrorKind,
    pub message: String,
}

/// The kinds of [`HubError`], one `cluster::Error` predicate each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum HubErrorKind {
    /// The operation does not apply: a bad path, a value on the way that
    /// is not an object, not an integer, bad JSON.
    Storage,
    /// Refused by the store's byte limit.
    StorageFull,
    /// A value does not fit in one message.
    TooLarge,
    UnknownTarget,
    UnknownCommand,
    Timeout,
    TargetDied,
    /// The handler returned an error (or panicked, or refused the arguments).
    Handler,
    /// Too many commands in flight or watches for one worker.
    Busy,
    /// The watcher is stopping.
    Closed,
}

/// A command for one of the worker's handlers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Call {
    /// The watcher's id, echoed in the `CallResult`.
    pub call: u64,
    pub name: String,
    pub args: String,
    /// Who asked (`None`: the watcher's own code or the CLI).
    pub from: Option<Responder>,
}

/// A worker's answer to a [`Call`]: JSON text, or why there is none (a
/// `Handler` or `UnknownCommand` error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CallResult {
    pub call: u64,
    pub result: Result<String, HubError>,
}

/// One change a watch sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Change {
    pub watch: u64,
    /// The store's revision after the change (strictly increasing).
    pub revision: u64,
    pub kind: ChangeKind,
    pub path: String,
    /// The new value's JSON text (`None` for deletions, and for a value
    /// too large for one message).
    pub value: Option<String>,
}

/// What happened at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ChangeKind {
    Set,
    Deleted,
    Expired,
}

/// A balanced listener granted to a worker: the watcher accepts and sends
/// each connection as a `Connection` tagged `listener`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BalancedGrant {
    pub listener: u64,
    /// The watcher's listening address (with the real port for port 0).
    pub local: String,
}

/// `Vec<u8>` as bytes: the same postcard encoding as a sequence of `u8`
/// (a varint length, then the bytes), but copied at once instead of one
/// serde call per byte. Per message round trip with a 64-byte payload,
/// the sequence form cost about 2,500 instructions on each side
/// (callgrind, `benches/messages.rs`).
mod raw_bytes {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }

            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }

            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                // Bounded by what the datagram holds, as any sequence.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_found_by_their_tag_and_nothing_else_is() {
        let record = LogRecord {
            level: 3,
            target: "t".into(),
            message: "m".into(),
            fields: Vec::new(),
            spans: Vec::new(),
            ts_nanos: 1,
        };
        let bytes = postcard::to_stdvec(&ToWatcher::Logs(vec![record.clone()])).unwrap();
        let records = logs_batch(&bytes).expect("a Logs message");
        assert_eq!(records, postcard::to_stdvec(&vec![record]).unwrap());
        for other in [
            ToWatcher::Hello { version: 5, pid: 1 },
            ToWatcher::Ready,
            ToWatcher::Pong { seq: 5 },
            ToWatcher::Data(vec![5, 5]),
            ToWatcher::LogsDropped(5),
            ToWatcher::ConnectionsClosed {
                listener: 5,
                count: 5,
            },
        ] {
            assert!(logs_batch(&postcard::to_stdvec(&other).unwrap()).is_none());
        }
        assert!(logs_batch(&[]).is_none());
    }

    #[test]
    fn data_is_encoded_as_a_sequence_of_bytes_was() {
        // The wire format did not change: a peer of the same protocol
        // version that encodes `Vec<u8>` as a sequence reads these.
        #[derive(serde::Serialize)]
        enum Old {
            #[allow(dead_code)]
            A,
            Data(Vec<u8>),
        }
        let payload: Vec<u8> = (0..=255).collect();
        let old = postcard::to_stdvec(&Old::Data(payload.clone())).unwrap();
        let new = postcard::to_stdvec(&ToWatcher::Data(payload.clone())).unwrap();
        assert_eq!(&old[1..], &new[1..], "after the variant index");
        let back: ToWatcher = postcard::from_bytes(&new).unwrap();
        assert_eq!(back, ToWatcher::Data(payload));
    }
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
            ToWorker::Replies(vec![
                Reply {
                    id: 1,
                    result: Ok(ReplyBody::Value(Some("1".into()))),
                },
                Reply {
                    id: 2,
                    result: Ok(ReplyBody::Answer {
                        answer: Answer {
                            from: Responder {
                                slot: 2,
                                name: Some("web-2".into()),
                                pid: 9,
                                context_id: 4,
                            },
                            result: Err(HubError {
                                kind: HubErrorKind::Handler,
                                message: "no".into(),
                            }),
                        },
                        remaining: 1,
                    }),
                },
            ]),
            ToWorker::Calls(vec![Call {
                call: 3,
                name: "whoami".into(),
                args: "null".into(),
                from: None,
            }]),
            ToWorker::Changes(vec![Change {
                watch: 1,
                revision: 7,
                kind: ChangeKind::Expired,
                path: "a.b".into(),
                value: None,
            }]),
            ToWorker::WatchEnded {
                watch: 1,
                reason: "lagged".into(),
            },
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
            ToWatcher::Requests(vec![
                Request {
                    id: 1,
                    body: RequestBody::Storage(StorageOp::Increment {
                        path: "hits".into(),
                        by: 1,
                    }),
                },
                Request {
                    id: 2,
                    body: RequestBody::Call {
                        target: TargetSpec::Name("web-1".into()),
                        name: "whoami".into(),
                        args: "{}".into(),
                        timeout_ms: 100,
                    },
                },
                Request {
                    id: 3,
                    body: RequestBody::Watch { prefix: "".into() },
                },
            ]),
            ToWatcher::CallResults(vec![CallResult {
                call: 3,
                result: Ok("1".into()),
            }]),
            ToWatcher::SetStatus("idle".into()),
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
