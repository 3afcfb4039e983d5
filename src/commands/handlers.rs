//! Command handlers by name, in a worker ([`Cluster::commands`](crate::Cluster::commands))
//! or in the watcher ([`ClusterWatcher::commands`](crate::ClusterWatcher::commands)),
//! and running one: on the runtime that registered it, a panic caught and
//! turned into a handler error, the result bounded to one message.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use crate::ipc::message::{HubError, HubErrorKind, MAX_VALUE};
use crate::transport::hub_error;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A handler: JSON arguments in, JSON result or an error text out.
pub(crate) type HandlerFn = Arc<dyn Fn(String) -> BoxFuture<Result<String, String>> + Send + Sync>;

struct Handler {
    f: HandlerFn,
    /// Where it runs: the runtime that registered it (`None`: wherever the
    /// call arrives).
    runtime: Option<tokio::runtime::Handle>,
}

/// The registered handlers of one process.
#[derive(Default)]
pub(crate) struct Handlers {
    map: RwLock<HashMap<String, Handler>>,
}

impl Handlers {
    /// Registers `f` under `name`, to run on the current runtime (if any).
    pub(crate) fn insert(&self, name: &str, f: HandlerFn) {
        let runtime = tokio::runtime::Handle::try_current().ok();
        if let Ok(mut map) = self.map.write() {
            map.insert(name.to_string(), Handler { f, runtime });
        }
    }

    /// Removes the handler `name`; whether there was one.
    pub(crate) fn remove(&self, name: &str) -> bool {
        self.map
            .write()
            .map(|mut m| m.remove(name).is_some())
            .unwrap_or(false)
    }

    /// Whether `name` has a handler.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.map
            .read()
            .map(|m| m.contains_key(name))
            .unwrap_or(false)
    }

    /// Runs handler `name` with `args`. Its future is polled once right
    /// here, within its runtime's context (so what it spawns or sets a
    /// timer on belongs to that runtime): a handler that answers without
    /// waiting answers at once, with no thread hop ([`Ran::Now`]); one
    /// that waits goes on as a task on its runtime and calls `done` when
    /// it ends ([`Ran::Later`]). [`Ran::Missing`] gives `done` back when
    /// there is no such handler. Must be called within a tokio runtime
    /// when the handler was registered outside one.
    pub(crate) fn run<F>(&self, name: &str, args: String, done: F) -> Ran<F>
    where
        F: FnOnce(Result<String, HubError>) + Send + 'static,
    {
        let (f, runtime) = match self.map.read() {
            Ok(map) => match map.get(name) {
                Some(h) => (h.f.clone(), h.runtime.clone()),
                None => return Ran::Missing(done),
            },
            Err(_) => return Ran::Missing(done),
        };
        let mut fut = {
            let _context = runtime.as_ref().map(|rt| rt.enter());
            let made = std::panic::catch_unwind(AssertUnwindSafe(|| f(args)));
            match made {
                Ok(inner) => CatchUnwind { inner },
                Err(p) => return Ran::Now(outcome(Err(panic_text(&*p)))),
            }
        };
        let first = {
            let _context = runtime.as_ref().map(|rt| rt.enter());
            let mut cx = Context::from_waker(std::task::Waker::noop());
            Pin::new(&mut fut).poll(&mut cx)
        };
        if let Poll::Ready(r) = first {
            return Ran::Now(outcome(r));
        }
        let task = async move { done(outcome(fut.await)) };
        match runtime {
            Some(rt) => drop(rt.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
        Ran::Later
    }
}

/// How [`Handlers::run`] went.
pub(crate) enum Ran<F> {
    /// The handler answered at once.
    Now(Result<String, HubError>),
    /// It runs on; `done` gets its answer.
    Later,
    /// No handler by that name: `done`, unused.
    Missing(F),
}

/// A handler's outcome as a call result: bounded, a panic a handler error.
fn outcome(r: Result<Result<String, String>, String>) -> Result<String, HubError> {
    match r {
        Ok(Ok(text)) if text.len() > MAX_VALUE => Err(hub_error(
            HubErrorKind::TooLarge,
            format!(
                "the handler's result of {} bytes exceeds the limit of {MAX_VALUE} bytes",
                text.len()
            ),
        )),
        Ok(Ok(text)) => Ok(text),
        Ok(Err(message)) => Err(hub_error(HubErrorKind::Handler, message)),
        Err(panic) => Err(hub_error(
            HubErrorKind::Handler,
            format!("the handler panicked: {panic}"),
        )),
    }
}

/// Polls a handler's future, turning a panic into an error with its message.
struct CatchUnwind {
    inner: BoxFuture<Result<String, String>>,
}

impl Future for CatchUnwind {
    type Output = Result<Result<String, String>, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.inner.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_text(&*payload))),
        }
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}
