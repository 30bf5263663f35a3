//! Data-path workers: one single-threaded runtime per worker thread, and each
//! proxied connection lives its whole life on one of them.
//!
//! A connection's work is a chain of tasks: the copy between the client's socket
//! and its stream, the HTTP/2 connection that carries the stream, the TLS under
//! it. On a work-stealing runtime those tasks wake each other across threads, and
//! every such wake-up is a futex and often an inter-processor interrupt; measured
//! with `cargo xtask bench`, a cross-node request then cost the agents about six
//! context switches where four are needed. Here a connection is handed to one
//! worker when it is accepted (round robin), its tasks are spawned on that
//! worker's runtime, and the HBONE pool keeps separate connections per worker
//! (the pool's key includes [`current`]), so nothing of one connection leaves its
//! thread. It is the model of Envoy's workers and of thread-per-core servers;
//! the control plane (config, certificates, admin, metrics, the accept loops)
//! stays on the main runtime.
//!
//! Without [`start`] (unit and in-process tests), connections are spawned on the
//! runtime that accepted them.

use std::{
    cell::Cell,
    future::Future,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use tokio::{net::TcpStream, runtime::Handle};
use tracing::warn;

struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

static WORKERS: OnceLock<Workers> = OnceLock::new();

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// Starts `n` workers (at least one), each a thread running a single-threaded
/// runtime for the life of the process. Only the first call does anything.
pub fn start(n: usize) -> std::io::Result<usize> {
    if let Some(w) = WORKERS.get() {
        return Ok(w.handles.len());
    }
    let n = n.max(1);
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(runtime.handle().clone());
        std::thread::Builder::new()
            .name(format!("weft-worker-{i}"))
            .spawn(move || {
                CURRENT.set(i + 1);
                runtime.block_on(std::future::pending::<()>());
            })?;
    }
    let _ = WORKERS.set(Workers {
        handles,
        next: AtomicUsize::new(0),
    });
    Ok(n)
}

/// The worker this thread is (1-based), or 0 off the workers.
pub fn current() -> usize {
    CURRENT.get()
}

/// Runs `serve(stream)` on the next worker, or on this runtime when there are
/// none. (A socket that cannot leave this runtime's reactor is closed, with a
/// warning; it does not happen short of a broken epoll.)
pub fn serve<F, Fut>(stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(w) = WORKERS.get() else {
        tokio::spawn(async move { serve(stream).await });
        return;
    };
    // Leaving this runtime's reactor for the worker's: deregistered here,
    // registered there, still non-blocking.
    let std = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "could not hand a connection to a worker");
            return;
        }
    };
    let i = w.next.fetch_add(1, Relaxed) % w.handles.len();
    w.handles[i].spawn(async move {
        match TcpStream::from_std(std) {
            Ok(stream) => serve(stream).await,
            Err(e) => warn!(error = %e, "a worker could not take a connection"),
        }
    });
}
