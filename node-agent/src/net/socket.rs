//! Listening and connecting sockets, inside a network namespace when asked.
//!
//! A socket belongs to the namespace of the thread that made it, for its whole
//! life: each helper here enters the namespace for the `socket()` call only (see
//! [`Netns::run`]) and then uses the socket from any thread. Every socket the
//! agent connects carries [`AGENT_SOCKET_MARK`], which the kernel capture skips.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpSocket, TcpStream};
use weft_common::{AGENT_SOCKET_MARK, HANDOVER_MARK};

use super::Netns;

/// A non-blocking TCP socket of `addr`'s family, made inside `netns` (the
/// namespace is entered for the `socket()` call only).
fn tcp_socket(netns: &Netns, addr: SocketAddr) -> io::Result<Socket> {
    netns.run(|| {
        Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )
    })?
}

/// Opens a listening socket inside `netns` (non-blocking; whoever accepts on it
/// registers it with the runtime it runs on).
///
/// `SO_REUSEPORT`, so that a successor agent on the node can listen beside this
/// one before it stops (see `app::succession`): the kernel then spreads new
/// connections over both, and when this one closes, what waits in its queue
/// moves to the other (`tcp_migrate_req`, set in every enrolled pod). The
/// kernel lets only sockets of the same user join a group, and a pod's own
/// process that joined would receive only its own pod's connections, which
/// the capture sends back to these listeners when it connects on.
pub fn listen(netns: &Netns, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = tcp_socket(netns, addr)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // [::1] is IPv6 only; [::] takes IPv4 too (one socket for sk_lookup).
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Listens on `port` of every address inside `netns`: `[::]` (IPv4 too), or
/// `0.0.0.0` for a namespace without IPv6.
pub fn listen_any(netns: &Netns, port: u16) -> io::Result<std::net::TcpListener> {
    listen(netns, SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
        .or_else(|_| listen(netns, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)))
}

/// Connects to `dst` from inside `netns`, with the agent's socket mark, from
/// `source` if given.
pub async fn connect_from(
    netns: &Netns,
    dst: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = tcp_socket(netns, dst)?;
    socket.set_mark(AGENT_SOCKET_MARK)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        // The port is left to `connect`, which picks one unique for the whole
        // 4-tuple (and may take over a port in TIME_WAIT, `tcp_tw_reuse`). A
        // `bind` to port 0 would pick one free of every other socket on this
        // address: the agent closes first, so every finished connection leaves
        // one in TIME_WAIT for a minute. Past about 200 new connections a
        // second to one pod that search grew slow, and at about 470 a second
        // it would run out of ports (see ARCHITECTURE.md).
        bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// A socket inside `netns` bound to `client:port` (an address of another host:
/// a transparent socket, `IP_TRANSPARENT`), marked [`HANDOVER_MARK`] so the
/// application's replies come back to it (see [`super::route`]). Connect it
/// with [`connect`].
///
/// The caller picks the port, because `sk_lookup` must know the whole 4-tuple
/// before the SYN leaves (`connect` would pick it only then). `SO_REUSEADDR`
/// lets a port be bound again while other sockets hold it (finished ones in
/// TIME_WAIT, live ones to other destinations): as with a port `connect`
/// picks, only the whole 4-tuple must be unique, and `connect` says
/// `EADDRNOTAVAIL` when it is not.
pub fn transparent_socket(
    netns: &Netns,
    dst: SocketAddr,
    client: SocketAddr,
) -> io::Result<Socket> {
    let socket = tcp_socket(netns, dst)?;
    socket.set_mark(HANDOVER_MARK)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_reuse_address(true)?;
    if dst.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    socket.bind(&client.into())?;
    Ok(socket)
}

/// Connects a socket made by [`transparent_socket`] to `dst`.
pub async fn connect(socket: Socket, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (IPv4 and IPv6 sockets alike): a later
/// `bind` to port 0 takes only the address, and `connect` chooses the port.
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a pointer to an int with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of_val(&on) as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A connection whose peer has not been heard from for this long is given up
/// by the kernel: [`keepalive`].
pub const SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// Makes the kernel notice a peer that went silent, on connections between
/// agents (HBONE, both ends): without it, an idle connection to a vanished peer
/// lives forever, and one with data in flight only fails when the
/// retransmissions give up, after about 15 minutes.
///
/// - Keepalive probes after 10 s without traffic, then every 5 s: an idle
///   connection is known dead after 10 + 4 × 5 = 30 s.
/// - `TCP_USER_TIMEOUT` of [`SILENCE_LIMIT`]: data unacknowledged for 30 s fails
///   the connection too (and bounds an orphaned socket still trying to send its
///   last bytes). A live peer's kernel acknowledges whatever its application
///   does, so only a dead peer or a black-holed path stays silent that long.
///
/// The client side also sends HTTP/2 PINGs (`hbone::client`), which notice
/// sooner; these are the floor for both sides, and the server side's only
/// check on a peer whose connection still carries streams (an idle one is
/// closed after `--hbone-server-idle`).
pub fn keepalive(stream: &TcpStream) -> io::Result<()> {
    let socket = SockRef::from(stream);
    let probes = TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(4);
    socket.set_tcp_keepalive(&probes)?;
    socket.set_tcp_user_timeout(Some(SILENCE_LIMIT))
}

/// IPv4-mapped IPv6 addresses as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Aborts the connection with a reset rather than a clean close, so the peer knows
/// it did not complete.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
