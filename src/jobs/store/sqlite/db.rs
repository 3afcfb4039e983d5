//! The actor thread's state, [`Db`], and what every statement of the
//! store shares: opening, write transactions, the wake-up after COMMIT and
//! the mapping of SQLite errors.
//!
//! The SQL itself is in `lifecycle.rs` (a job's way through the store) and
//! `admin.rs` (reads and operator commands), as more `impl Db` blocks.

use std::path::Path;
use std::time::SystemTime;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::error::{Error, Kind, Result};
use crate::jobs::store::api::StoreOptions;

use super::schema::open_connection;
use super::wake::Wake;

/// The actor thread's state.
pub(super) struct Db {
    pub(super) conn: Connection,
    pub(super) options: StoreOptions,
    /// The path, for messages.
    pub(super) label: String,
    wake: Option<Wake>,
}

pub(super) fn now() -> SystemTime {
    SystemTime::now()
}

pub(super) fn i64_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Maps a rusqlite error to one line naming the store.
pub(super) fn sql_error(label: &str, what: &str) -> impl FnOnce(rusqlite::Error) -> Error {
    let context = format!("job store {label}: {what}");
    move |e| Error::with_cause(Kind::Store, context, e)
}

pub(super) fn corrupt(label: &str, what: String) -> Error {
    Error::new(
        Kind::Store,
        format!("job store {label}: corrupt row: {what}"),
    )
}

impl Db {
    pub(super) fn open(path: Option<&Path>, label: String, options: StoreOptions) -> Result<Db> {
        let conn = open_connection(path, &label, &options)?;
        let wake = path.and_then(Wake::new);
        Ok(Db {
            conn,
            options,
            label,
            wake,
        })
    }

    pub(super) fn err(&self, what: &str) -> impl FnOnce(rusqlite::Error) -> Error {
        sql_error(&self.label, what)
    }

    pub(super) fn write_tx(&mut self, what: &str) -> Result<Transaction<'_>> {
        let e = sql_error(&self.label, what);
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(e)
    }

    pub(super) fn wake(&self) {
        if let Some(w) = &self.wake {
            w.send();
        }
    }
}
