//! The control socket's shared-state requests (`cluster storage ...`,
//! `cluster command ...`): answered by the hub through the same
//! [`Storage`](crate::Storage) and [`CommandCall`](crate::CommandCall)
//! the watcher's own code uses.

use std::sync::Arc;
use std::time::Duration;

use super::hub::Hub;
use crate::commands::{CommandCall, Target, DEFAULT_COMMAND_TIMEOUT};
use crate::control::{CommandReply, Request, Response};
use crate::storage::Storage;

pub(super) async fn handle(request: Request, hub: Arc<Hub>) -> Response {
    let storage = Storage::new(hub.clone());
    match request {
        Request::StorageGet { path } => match storage.get::<serde_json::Value>(&path).await {
            Ok(value) => Response {
                found: Some(value.is_some()),
                value,
                ..Response::success()
            },
            Err(e) => Response::failure(e.to_string()),
        },
        Request::StorageDump => match storage.get::<serde_json::Value>("").await {
            Ok(value) => Response {
                found: Some(true),
                value,
                ..Response::success()
            },
            Err(e) => Response::failure(e.to_string()),
        },
        Request::StorageSet {
            path,
            value,
            ttl_ms,
        } => {
            let mut set = storage.set(&path, &value);
            if let Some(ms) = ttl_ms {
                set = set.ttl(Duration::from_millis(ms));
            }
            match set.await {
                Ok(version) => Response {
                    version: Some(version),
                    ..Response::success()
                },
                Err(e) => Response::failure(e.to_string()),
            }
        }
        Request::StorageDelete { path } => match storage.delete(&path).await {
            Ok(found) => Response {
                found: Some(found),
                ..Response::success()
            },
            Err(e) => Response::failure(e.to_string()),
        },
        Request::Command {
            to,
            name,
            args,
            timeout_ms,
        } => {
            let target = Target::parse(&to);
            let all = target == Target::All;
            let timeout = timeout_ms.map_or(DEFAULT_COMMAND_TIMEOUT, Duration::from_millis);
            let call = CommandCall::new(hub, target, &name, &args).timeout(timeout);
            match call.await {
                Ok(reply) => Response {
                    replies: reply
                        .responses()
                        .iter()
                        .map(|r| {
                            let (ok, result, error) = match r.json() {
                                Ok(text) => (true, serde_json::from_str(text).ok(), None),
                                Err(e) => (false, None, Some(e.to_string())),
                            };
                            CommandReply {
                                slot: r.from().slot(),
                                name: r.from().name().map(str::to_string),
                                pid: r.from().pid(),
                                ok,
                                result,
                                error,
                            }
                        })
                        .collect(),
                    ..Response::success()
                },
                Err(e) if all => Response::failure(e.to_string()),
                Err(e) => Response::failure(e.to_string()),
            }
        }
        _ => Response::failure("not a storage or command request".into()),
    }
}
