//! Admission caps for listeners: at most so many connections (or handshakes, or
//! streams) at once, and at most so many from one peer address.
//!
//! A [`Limit`] hands out a [`Permit`] per admitted thing; dropping the permit gives
//! the slot back. Taking one is an atomic add, plus, when a per-peer cap is set,
//! one uncontended lock and a hash-map entry for the peer (removed when its last
//! permit goes, so the map holds only peers that hold something: its size is
//! bounded by the total cap). That is a few tens of nanoseconds per accepted
//! connection, next to the microseconds of the `accept` itself. No crate does
//! "total and per key" with owned guards (tokio's `Semaphore` has no per-key
//! part), so it is written here.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

/// Why a [`Limit`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The cap on everything this limit admits.
    Total,
    /// The cap for one peer address.
    Peer,
}

/// Why a listener refused a connection (or an HBONE stream) before serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The agent's connection budget (from its open-file limit) is spent.
    NodeLimit,
    /// The listener's own cap.
    ListenerLimit,
    /// The cap for one peer address.
    PeerLimit,
    /// Too many TLS handshakes in progress, on the listener or from the peer.
    HandshakeLimit,
    /// The TLS and HTTP/2 handshakes did not finish within the deadline.
    HandshakeTimeout,
    /// Too many streams at once on the listener or from the peer.
    StreamLimit,
    /// The TLS or HTTP/2 handshake failed, or the peer's certificate was not
    /// one of the mesh's.
    HandshakeFailed,
    /// An HTTP/2 protocol error after the handshake.
    ProtocolError,
}

impl Refused {
    pub const ALL: [Refused; 8] = [
        Refused::NodeLimit,
        Refused::ListenerLimit,
        Refused::PeerLimit,
        Refused::HandshakeLimit,
        Refused::HandshakeTimeout,
        Refused::StreamLimit,
        Refused::HandshakeFailed,
        Refused::ProtocolError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refused::NodeLimit => "node_limit",
            Refused::ListenerLimit => "listener_limit",
            Refused::PeerLimit => "peer_limit",
            Refused::HandshakeLimit => "handshake_limit",
            Refused::HandshakeTimeout => "handshake_timeout",
            Refused::StreamLimit => "stream_limit",
            Refused::HandshakeFailed => "handshake_failed",
            Refused::ProtocolError => "protocol_error",
        }
    }
}

/// A cap on things held at once, in total and per peer address.
#[derive(Clone, Debug)]
pub struct Limit {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max: usize,
    /// `None`: no per-peer cap (or one no lower than `max`).
    per_peer: Option<usize>,
    held: AtomicUsize,
    /// The most held at once since [`Limit::take_peak`] last read it.
    peak: AtomicUsize,
    peers: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted thing; the slot is free again when this is dropped.
#[derive(Debug)]
pub struct Permit {
    inner: Arc<Inner>,
    peer: Option<IpAddr>,
}

impl Limit {
    /// At most `max` at once, at most `per_peer` of them from one address.
    pub fn new(max: usize, per_peer: usize) -> Limit {
        Limit {
            inner: Arc::new(Inner {
                max,
                per_peer: (per_peer < max).then_some(per_peer),
                held: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                peers: Mutex::default(),
            }),
        }
    }

    /// At most `max` at once, whoever asks.
    pub fn total(max: usize) -> Limit {
        Limit::new(max, max)
    }

    /// How many are held now.
    pub fn held(&self) -> usize {
        self.inner.held.load(Ordering::Relaxed)
    }

    /// The most held at once since the last call (or since made); from now on
    /// the peak counts from what is held now.
    pub fn take_peak(&self) -> usize {
        let now = self.held();
        self.inner.peak.swap(now, Ordering::Relaxed).max(now)
    }

    /// A slot for something from `peer`, or which cap is full.
    pub fn admit(&self, peer: IpAddr) -> Result<Permit, Full> {
        let inner = &self.inner;
        // Optimistic add, undone if over: no lock on the common path.
        let before = inner.held.fetch_add(1, Ordering::AcqRel);
        if before >= inner.max {
            inner.held.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Total);
        }
        inner.peak.fetch_max(before + 1, Ordering::Relaxed);
        let Some(per_peer) = inner.per_peer else {
            return Ok(Permit {
                inner: inner.clone(),
                peer: None,
            });
        };
        let mut peers = inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        let n = peers.entry(peer).or_default();
        if *n >= per_peer {
            drop(peers);
            inner.held.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Peer);
        }
        *n += 1;
        Ok(Permit {
            inner: inner.clone(),
            peer: Some(peer),
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(peer) = self.peer {
            let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = peers.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    peers.remove(&peer);
                }
            }
        }
        self.inner.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// At most so many log lines per second for a kind of event that may come as
/// a flood: [`Throttle::allow`] says whether to log now, and how many were
/// suppressed before this line. Metrics count every event; logs sample them.
/// A lock, not atomics: it is taken only on refusal paths.
#[derive(Debug)]
pub struct Throttle {
    per_second: u32,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl Default for Throttle {
    /// One line per second.
    fn default() -> Self {
        Throttle::new(1)
    }
}

impl Throttle {
    pub fn new(per_second: u32) -> Self {
        Throttle {
            per_second,
            window: Mutex::new(Window {
                start: None,
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(suppressed)` if a line may be written now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.start
            .is_none_or(|s| now.duration_since(s) >= std::time::Duration::from_secs(1))
        {
            w.start = Some(now);
            w.lines = 0;
        }
        if w.lines >= self.per_second {
            w.suppressed += 1;
            return None;
        }
        w.lines += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn caps_each_peer_and_the_total_and_gives_slots_back() {
        let limit = Limit::new(3, 2);
        let a1 = limit.admit(ip(1)).unwrap();
        let _a2 = limit.admit(ip(1)).unwrap();
        assert_eq!(limit.admit(ip(1)).unwrap_err(), Full::Peer);
        let _b1 = limit.admit(ip(2)).unwrap();
        assert_eq!(limit.admit(ip(3)).unwrap_err(), Full::Total);
        assert_eq!(limit.held(), 3);
        drop(a1);
        assert_eq!(limit.held(), 2);
        // The freed slot is a's again, and anyone's in the total.
        let _a3 = limit.admit(ip(1)).unwrap();
        assert_eq!(limit.admit(ip(1)).unwrap_err(), Full::Total);
    }

    #[test]
    fn the_peak_is_the_most_held_since_it_was_last_taken() {
        let limit = Limit::total(10);
        let held: Vec<_> = (0..5).map(|_| limit.admit(ip(1)).unwrap()).collect();
        drop(held);
        let _one = limit.admit(ip(1)).unwrap();
        assert_eq!(limit.take_peak(), 5);
        assert_eq!(limit.take_peak(), 1);
    }

    #[test]
    fn a_peer_that_holds_nothing_leaves_no_entry_behind() {
        let limit = Limit::new(10, 5);
        let permits: Vec<_> = (0..10).map(|i| limit.admit(ip(i)).unwrap()).collect();
        assert_eq!(limit.inner.peers.lock().unwrap().len(), 10);
        drop(permits);
        assert_eq!(limit.held(), 0);
        assert!(limit.inner.peers.lock().unwrap().is_empty());
    }

    #[test]
    fn a_throttle_lets_its_lines_through_each_second_and_counts_the_rest() {
        let t = Throttle::new(2);
        let t0 = Instant::now();
        assert_eq!(t.allow_at(t0), Some(0));
        assert_eq!(t.allow_at(t0), Some(0));
        for _ in 0..5 {
            assert_eq!(t.allow_at(t0), None);
        }
        // A second later the next line says how many it stands for.
        let t1 = t0 + std::time::Duration::from_secs(1);
        assert_eq!(t.allow_at(t1), Some(5));
        assert_eq!(t.allow_at(t1), Some(0));
        assert_eq!(t.allow_at(t1), None);
    }

    #[test]
    fn a_total_limit_keeps_no_per_peer_map() {
        let limit = Limit::total(2);
        let _p = (limit.admit(ip(1)).unwrap(), limit.admit(ip(1)).unwrap());
        assert_eq!(limit.admit(ip(2)).unwrap_err(), Full::Total);
        assert!(limit.inner.peers.lock().unwrap().is_empty());
    }

    #[test]
    fn refusals_under_contention_never_leak_slots() {
        let limit = Limit::new(64, 8);
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let limit = limit.clone();
                s.spawn(move || {
                    for _ in 0..10_000 {
                        let held: Vec<_> =
                            (0..16).filter_map(|_| limit.admit(ip(t)).ok()).collect();
                        assert!(held.len() <= 8);
                    }
                });
            }
        });
        assert_eq!(limit.held(), 0);
    }
}
