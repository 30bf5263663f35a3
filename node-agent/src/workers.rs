//! Data-path workers: one single-threaded runtime per worker thread, and each
//! proxied connection lives its whole life on one of them.
//!
//! A connection's work is a chain of tasks: the copy between the client's socket
//! and its stream, the HTTP/2 connection that carries the stream, the TLS under
//! it. On a work-stealing runtime those tasks wake each other across threads, and
//! every such wake-up is a futex and often an inter-processor interrupt; measured
//! with `cargo xtask bench`, a cross-node request then cost the agents about six
//! context switches where four are needed. Here a connection's tasks are spawned
//! on one worker's runtime, and the HBONE pool keeps separate connections per
//! worker (the pool's key includes [`current`]), so nothing of one connection
//! leaves its thread. It is the model of Envoy's workers and of thread-per-core
//! servers; the control plane (config, certificates, admin, metrics) stays on the
//! main runtime.
//!
//! The listeners' accept loops run on the workers too ([`spawn_listener`], a
//! pod's listeners spread round robin). An accepted connection stays on the
//! worker that accepted it unless another worker carries fewer connections, and
//! then goes to the least loaded one ([`serve`]): a connection that stays costs no
//! hand-over (no wake-up of another thread, no move between two epoll sets),
//! and many connections from one pod still spread over every core.
//!
//! Without [`start`] (unit and in-process tests), everything runs on the runtime
//! that called.

use std::{
    cell::Cell,
    future::Future,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use tokio::{net::TcpStream, runtime::Handle, task::JoinHandle};
use tracing::warn;

struct Workers {
    handles: Vec<Handle>,
    /// Connections each worker carries now (accepted and not yet finished).
    load: Vec<AtomicUsize>,
    /// Where the next listener goes, and where a search for the least loaded
    /// worker starts (so that ties go round robin).
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
        load: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        handles,
        next: AtomicUsize::new(0),
    });
    Ok(n)
}

/// The worker this thread is (1-based), or 0 off the workers.
pub fn current() -> usize {
    CURRENT.get()
}

/// Runs a listener's accept loop on the next worker (round robin), or on this
/// runtime when there are none. The loop should register its socket from
/// inside (`TcpListener::from_std`), so that it lands in that worker's reactor.
pub fn spawn_listener<Fut>(accept_loop: Fut) -> JoinHandle<()>
where
    Fut: Future<Output = ()> + Send + 'static,
{
    match WORKERS.get() {
        Some(w) => {
            let i = w.next.fetch_add(1, Relaxed) % w.handles.len();
            w.handles[i].spawn(accept_loop)
        }
        None => tokio::spawn(accept_loop),
    }
}

impl Workers {
    /// The worker for a connection accepted on worker `here` (0-based): `here`
    /// unless another carries fewer connections, else the least loaded, ties
    /// taken round robin.
    fn pick(&self, here: Option<usize>) -> usize {
        let load = |i: usize| self.load[i].load(Relaxed);
        let least = (0..self.load.len()).map(load).min().unwrap_or(0);
        if let Some(h) = here
            && load(h) <= least
        {
            return h; // nobody carries fewer
        }
        // The k-th of those carrying `least`, k turning round robin. (Loads may
        // change meanwhile: then the last one seen that carried `least`.)
        let ties = (0..self.load.len()).filter(|&i| load(i) == least).count();
        let k = self.next.fetch_add(1, Relaxed) % ties.max(1);
        let mut chosen = here.unwrap_or(0);
        for (seen, i) in (0..self.load.len())
            .filter(|&i| load(i) == least)
            .enumerate()
        {
            chosen = i;
            if seen == k {
                break;
            }
        }
        chosen
    }
}

/// Counts a connection against its worker while it is served.
struct Carried(usize);

impl Drop for Carried {
    fn drop(&mut self) {
        if let Some(w) = WORKERS.get() {
            w.load[self.0].fetch_sub(1, Relaxed);
        }
    }
}

/// Runs `serve(stream)` on a worker: this one (the one whose listener accepted
/// it) unless another worker carries fewer connections, else the least loaded.
/// Off the workers, on this runtime. (A socket that cannot leave this worker's
/// reactor is closed, with a warning; it does not happen short of a broken
/// epoll.)
pub fn serve<F, Fut>(stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(w) = WORKERS.get() else {
        tokio::spawn(async move { serve(stream).await });
        return;
    };
    let here = current().checked_sub(1);
    let i = w.pick(here);
    w.load[i].fetch_add(1, Relaxed);
    let carried = Carried(i);
    if Some(i) == here {
        tokio::spawn(async move {
            let _carried = carried;
            serve(stream).await
        });
        return;
    }
    // Leaving this runtime's reactor for the worker's: deregistered here,
    // registered there, still non-blocking.
    let std = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "could not hand a connection to a worker");
            return;
        }
    };
    w.handles[i].spawn(async move {
        let _carried = carried;
        match TcpStream::from_std(std) {
            Ok(stream) => serve(stream).await,
            Err(e) => warn!(error = %e, "a worker could not take a connection"),
        }
    });
}

/// How many connections each worker carries now.
pub fn loads() -> Vec<usize> {
    WORKERS
        .get()
        .map(|w| w.load.iter().map(|l| l.load(Relaxed)).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(loads: &[usize]) -> (Vec<tokio::runtime::Runtime>, Workers) {
        let runtimes: Vec<_> = loads
            .iter()
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
            })
            .collect();
        let w = Workers {
            handles: runtimes.iter().map(|r| r.handle().clone()).collect(),
            load: loads.iter().map(|&l| AtomicUsize::new(l)).collect(),
            next: AtomicUsize::new(0),
        };
        (runtimes, w)
    }

    #[test]
    fn a_connection_stays_where_it_was_accepted_unless_another_worker_carries_fewer() {
        let (_rt, w) = workers(&[3, 3, 3]);
        assert_eq!(w.pick(Some(1)), 1, "a tie keeps it here");
        let (_rt, w) = workers(&[0, 5]);
        assert_eq!(w.pick(Some(0)), 0);
        let (_rt, w) = workers(&[2, 4, 1, 1]);
        let picked = w.pick(Some(1));
        assert!(picked == 2 || picked == 3, "the least loaded, got {picked}");
    }

    #[test]
    fn ties_among_the_least_loaded_go_round_robin() {
        let (_rt, w) = workers(&[1, 1, 1]);
        // Accepted off the workers: every worker is as good as the next.
        let picks: Vec<usize> = (0..6).map(|_| w.pick(None)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // Accepted on a busier worker: spread over the idle ones in turn.
        let (_rt, w) = workers(&[4, 0, 0]);
        let picks: Vec<usize> = (0..4).map(|_| w.pick(Some(0))).collect();
        assert_eq!(picks, [1, 2, 1, 2]);
    }
}
