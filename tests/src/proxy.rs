//! A fault-injecting TCP proxy, for harnesses that cut a service off from
//! NATS or Kafka: the service is given the proxy's address, and the harness
//! turns the link's faults on and off while real traffic flows. Loopback
//! only: no root, no network namespaces, nothing outside the harness.
//!
//! The faults are the ones a cluster network has:
//!
//! - [`Fault::Blackhole`]: nothing passes either way, but every connection
//!   stays open (a partition: the peers notice only by their timeouts and
//!   heartbeats; what was sent waits, as TCP would retransmit it, and goes
//!   on once healed, unless a peer gave up first);
//! - [`Fault::Cut`]: every open connection is closed and new ones are
//!   closed at once (a peer restarted, a connection reset);
//! - [`Fault::Delay`]: every chunk waits before it is passed on (latency).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// What the link does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: bytes pass at once.
    None,
    /// Bytes pass after this delay, each way.
    Delay(Duration),
    /// No byte passes; connections stay open.
    Blackhole,
    /// Connections are closed, new ones too.
    Cut,
}

/// A running proxy from a loopback port to `upstream`. Dropping it stops
/// it and closes every connection.
pub struct Proxy {
    listen: SocketAddr,
    upstream: SocketAddr,
    fault: watch::Sender<Fault>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listen on a free loopback port and pass every connection on to `upstream`.
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).context("binding the proxy")?;
        let listen = listener.local_addr()?;
        let (fault, faults) = watch::channel(Fault::None);
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let conns = connections.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{}", listen.port()))
            .spawn(move || runtime.block_on(accept(listener, upstream, faults, conns, stopped)))?;
        Ok(Proxy { listen, upstream, fault, connections, stop: Some(stop), thread: Some(thread) })
    }

    /// The address to give the service.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// Where it passes connections on to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Turn `fault` on (replacing the one before); [`Fault::None`] heals.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
        if fault == Fault::Cut {
            for c in self.connections.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
                c.abort();
            }
        }
    }

    /// The fault on now.
    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: watch::Receiver<Fault>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (client, _) = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        if *faults.borrow() == Fault::Cut {
            drop(client);
            continue;
        }
        let faults = faults.clone();
        let handle = tasks.spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(pipe(client_read, server_write, faults.clone()), pipe(server_read, client_write, faults));
        });
        let mut open = connections.lock().unwrap_or_else(PoisonError::into_inner);
        open.retain(|c| !c.is_finished());
        open.push(handle);
    }
}

/// Wait while the link holds everything (a blackhole).
async fn passable(faults: &mut watch::Receiver<Fault>) -> Option<Duration> {
    loop {
        match *faults.borrow_and_update() {
            Fault::None => return Some(Duration::ZERO),
            Fault::Delay(d) => return Some(d),
            Fault::Cut => return None,
            Fault::Blackhole => {}
        }
        if faults.changed().await.is_err() {
            return None;
        }
    }
}

/// One direction of a connection: read, wait out the fault, write.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut faults: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // A blackhole reads nothing: what the peer sends waits in its buffers.
        if passable(&mut faults).await.is_none() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match passable(&mut faults).await {
            None => return,
            Some(delay) if !delay.is_zero() => tokio::time::sleep(delay).await,
            Some(_) => {}
        }
        // The fault may have changed during the delay.
        if passable(&mut faults).await.is_none() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Instant;

    use super::*;

    /// An echo server on a loopback port.
    fn echo() -> anyhow::Result<SocketAddr> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = stream;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(addr)
    }

    fn connect(proxy: &Proxy) -> anyhow::Result<std::net::TcpStream> {
        let s = std::net::TcpStream::connect(proxy.addr())?;
        s.set_read_timeout(Some(Duration::from_millis(400)))?;
        Ok(s)
    }

    /// Send `msg` and read its echo (an error on timeout or close).
    fn round_trip(s: &mut std::net::TcpStream, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)?;
        Ok(got)
    }

    #[test]
    fn bytes_pass_then_wait_in_a_blackhole_and_go_on_when_healed() -> anyhow::Result<()> {
        let proxy = Proxy::start(echo()?)?;
        let mut s = connect(&proxy)?;
        assert_eq!(round_trip(&mut s, b"one")?, b"one");
        proxy.set(Fault::Blackhole);
        assert!(round_trip(&mut s, b"two").is_err(), "nothing passes a blackhole");
        proxy.set(Fault::None);
        let mut late = vec![0u8; 3];
        s.read_exact(&mut late)?;
        assert_eq!(late, b"two", "what waited goes on, on the same connection");
        Ok(())
    }

    #[test]
    fn a_cut_closes_connections_and_refuses_new_ones_until_healed() -> anyhow::Result<()> {
        let proxy = Proxy::start(echo()?)?;
        let mut s = connect(&proxy)?;
        assert_eq!(round_trip(&mut s, b"a")?, b"a");
        proxy.set(Fault::Cut);
        std::thread::sleep(Duration::from_millis(50));
        assert!(round_trip(&mut s, b"b").is_err(), "the open connection is closed");
        let mut fresh = connect(&proxy)?;
        assert!(round_trip(&mut fresh, b"c").is_err(), "a new one is closed at once");
        proxy.set(Fault::None);
        let mut healed = connect(&proxy)?;
        assert_eq!(round_trip(&mut healed, b"d")?, b"d");
        Ok(())
    }

    #[test]
    fn a_delay_holds_each_way() -> anyhow::Result<()> {
        let proxy = Proxy::start(echo()?)?;
        let mut s = connect(&proxy)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        proxy.set(Fault::Delay(Duration::from_millis(100)));
        let t0 = Instant::now();
        assert_eq!(round_trip(&mut s, b"slow")?, b"slow");
        assert!(t0.elapsed() >= Duration::from_millis(200), "there and back: {:?}", t0.elapsed());
        Ok(())
    }
}
