//! A TCP fault proxy for the fault tests of every transport: a test puts it between a
//! client and a broker and breaks connections on purpose.
//!
//! [`FaultProxy::start`] listens on 127.0.0.1 with a port the OS chooses and forwards each
//! connection it accepts to the broker, bytes both ways, until the test breaks it:
//!
//! - [`FaultProxy::cut`] drops every connection open now (the client sees EOF or a reset);
//!   new connections are accepted again right away, as after a broker's restart.
//! - [`FaultProxy::refuse`] closes every new connection as soon as it is accepted, as a
//!   broker that is down.
//! - [`FaultProxy::pause`] holds the bytes in both directions without dropping them, as a
//!   stalled network; they flow again when it is lifted.
//! - [`FaultProxy::latency`] holds each chunk of bytes for a while before passing it on, in
//!   both directions, as a slow broker or a long network path (chunks are pipelined: each
//!   arrives that much late, however many are on their way).
//!
//! ```
//! # cloudbus_testkit::run(async {
//! use cloudbus_testkit::FaultProxy;
//!
//! # let broker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! # let broker_addr = broker.local_addr().unwrap();
//! let proxy = FaultProxy::start(broker_addr).await.expect("start the proxy");
//! // point the client at `proxy.addr()` instead of the broker, connect, then:
//! let _client = tokio::net::TcpStream::connect(proxy.addr()).await.expect("connect");
//! # let _accepted = broker.accept().await.unwrap();
//! assert!(proxy.wait_for_connections(1, std::time::Duration::from_secs(10)).await);
//! assert_eq!(proxy.cut(), 1);
//! # });
//! ```

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// A TCP proxy on 127.0.0.1 in front of one upstream address (a broker), which cuts,
/// refuses and stalls connections when a test asks. Dropping it stops listening and cuts
/// every connection.
///
/// Its methods take `&self`, so a test can share it (in an `Arc`) with the tasks that
/// break the network while others use it.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

/// What the proxy shares with its accept loop and its connections.
struct Shared {
    /// The connections open now, each with the sender whose drop cuts it.
    open: Mutex<Open>,
    /// How many connections are open, for [`FaultProxy::wait_for_connections`]; written
    /// under the `open` lock, so it follows the map.
    count: watch::Sender<usize>,
    /// Every connection accepted so far, refused ones included.
    accepted: AtomicUsize,
    /// New connections are closed at once.
    refusing: AtomicBool,
    /// Bytes are held in both directions.
    paused: watch::Sender<bool>,
    /// How long each chunk of bytes is held before it is passed on.
    latency: watch::Sender<Duration>,
    /// The proxy was dropped: a connection accepted since is closed at once.
    stopped: AtomicBool,
}

/// The connections open now, by id.
#[derive(Default)]
struct Open {
    next: u64,
    connections: HashMap<u64, oneshot::Sender<()>>,
}

impl Shared {
    fn open(&self) -> MutexGuard<'_, Open> {
        // Nothing that holds the lock panics; a poisoned map is still a valid map.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops every connection open now; how many there were. With a `flag` (`refusing`,
    /// `stopped`), sets it under the same lock, so no connection registers in between and
    /// escapes both.
    fn cut(&self, flag: Option<&AtomicBool>) -> usize {
        let cut = {
            let mut open = self.open();
            if let Some(flag) = flag {
                flag.store(true, Ordering::SeqCst);
            }
            let cut = std::mem::take(&mut open.connections);
            self.count.send_replace(0);
            cut
        };
        // Dropping each sender wakes its connection, which drops both of its sockets.
        cut.len()
    }

    /// Registers a new connection: its id, and the receiver that says it was cut; `None`
    /// while the proxy refuses connections or is gone.
    fn register(&self) -> Option<(u64, oneshot::Receiver<()>)> {
        let mut open = self.open();
        if self.refusing.load(Ordering::SeqCst) || self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        let (cut, cut_off) = oneshot::channel();
        let id = open.next;
        open.next += 1;
        open.connections.insert(id, cut);
        self.count.send_replace(open.connections.len());
        Some((id, cut_off))
    }

    /// Forgets a connection that ended by itself (a cut one is already gone).
    fn deregister(&self, id: u64) {
        let mut open = self.open();
        if open.connections.remove(&id).is_some() {
            self.count.send_replace(open.connections.len());
        }
    }
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 (a port the OS chooses) that forwards every connection
    /// to `upstream`. Call it inside a tokio runtime, which runs the proxy's tasks; fails
    /// only if it cannot listen. A connection whose upstream connect fails is closed.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        FaultProxy::reserve().await?.start(upstream)
    }

    /// Listens on 127.0.0.1 (a port the OS chooses) without forwarding yet: for a broker
    /// that must know the proxy's port before it starts (one that advertises the address
    /// clients come back to). [`ReservedProxy::start`] then forwards to it.
    pub async fn reserve() -> io::Result<ReservedProxy> {
        Ok(ReservedProxy {
            listener: TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?,
        })
    }

    /// Where the proxy listens: the address to give the client instead of the broker's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port the proxy listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Drops every connection open now, closing its client and upstream sockets together
    /// (the client's next read returns EOF, or an error), and returns how many it cut. New
    /// connections are accepted and forwarded again right away.
    pub fn cut(&self) -> usize {
        self.shared.cut(None)
    }

    /// How many connections are open now: from when the proxy accepts one (while it still
    /// connects upstream, too) until it ends or is cut.
    pub fn connections(&self) -> usize {
        *self.shared.count.borrow()
    }

    /// How many connections the proxy has accepted so far, refused ones included.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` connections are open; `false` if `timeout` passes first.
    pub async fn wait_for_connections(&self, n: usize, timeout: Duration) -> bool {
        let mut count = self.shared.count.subscribe();
        matches!(
            tokio::time::timeout(timeout, count.wait_for(|open| *open >= n)).await,
            Ok(Ok(_))
        )
    }

    /// While `on`, the proxy behaves as a broker that is down: it cuts the connections open
    /// now, and closes each new connection as soon as it accepts it (the client connects,
    /// then reads EOF). With `false`, new connections are forwarded again.
    pub fn refuse(&self, on: bool) {
        if on {
            self.shared.cut(Some(&self.shared.refusing));
        } else {
            self.shared.refusing.store(false, Ordering::SeqCst);
        }
    }

    /// While `on`, the network stalls: the proxy forwards nothing in either direction but
    /// drops nothing either, and connections stay open (the sender blocks once the socket
    /// buffers are full). With `false`, the held bytes flow on, in order.
    pub fn pause(&self, on: bool) {
        self.shared.paused.send_replace(on);
    }

    /// From now on, each chunk of bytes read from either side is held for `delay` before it
    /// is written to the other, as a slow broker: every request and every answer arrives
    /// `delay` late. The chunks are pipelined, as on a long network path: each is written
    /// `delay` after it was read, however many are on their way. `Duration::ZERO` ends it.
    pub fn latency(&self, delay: Duration) {
        self.shared.latency.send_replace(delay);
    }
}

/// A proxy's listening socket, from [`FaultProxy::reserve`]: connections wait in its
/// backlog until [`ReservedProxy::start`].
#[derive(Debug)]
pub struct ReservedProxy {
    listener: TcpListener,
}

impl ReservedProxy {
    /// The port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map_or(0, |addr| addr.port())
    }

    /// Starts forwarding every connection to `upstream`, inside a tokio runtime.
    pub fn start(self, upstream: SocketAddr) -> io::Result<FaultProxy> {
        let addr = self.listener.local_addr()?;
        let shared = Arc::new(Shared {
            open: Mutex::new(Open::default()),
            count: watch::Sender::new(0),
            accepted: AtomicUsize::new(0),
            refusing: AtomicBool::new(false),
            paused: watch::Sender::new(false),
            latency: watch::Sender::new(Duration::ZERO),
            stopped: AtomicBool::new(false),
        });
        let acceptor = tokio::spawn(accept(self.listener, upstream, shared.clone()));
        Ok(FaultProxy {
            addr,
            upstream,
            shared,
            acceptor,
        })
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("connections", &self.connections())
            .field("accepted", &self.accepted())
            .field("refusing", &self.shared.refusing.load(Ordering::SeqCst))
            .field("paused", &*self.shared.paused.borrow())
            .field("latency", &*self.shared.latency.borrow())
            .finish()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The listener closes when the runtime drops the aborted task; a connection
        // accepted before then is closed at once (`stopped`).
        self.acceptor.abort();
        self.shared.cut(Some(&self.shared.stopped));
    }
}

/// The accept loop: each connection gets a task that forwards it until it ends or is cut.
async fn accept(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(error) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // keep listening, without spinning.
                tracing::debug!(%error, "fault proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        // Registered before the task starts, so a cut from now on reaches it.
        let Some((id, cut_off)) = shared.register() else {
            // Refused (or the proxy is gone): closed at once.
            drop(client);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = cut_off => {}
                outcome = forward(client, upstream, Faults::of(&shared)) => {
                    if let Err(error) = outcome {
                        tracing::debug!(%error, "fault proxy: connection ended");
                    }
                }
            }
            // Both sockets are dropped here, whichever way it ended.
            shared.deregister(id);
        });
    }
}

/// Connects to `upstream` and copies bytes both ways until both sides have finished
/// (each EOF is passed on as a shutdown of the other side) or one fails.
async fn forward(mut client: TcpStream, upstream: SocketAddr, faults: Faults) -> io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    tokio::try_join!(
        pump(&mut client_read, &mut server_write, faults.clone()),
        pump(&mut server_read, &mut client_write, faults),
    )?;
    Ok(())
}

/// What one direction of a connection watches: the pause and the latency.
#[derive(Clone)]
struct Faults {
    paused: watch::Receiver<bool>,
    latency: watch::Receiver<Duration>,
}

impl Faults {
    fn of(shared: &Shared) -> Faults {
        Faults {
            paused: shared.paused.subscribe(),
            latency: shared.latency.subscribe(),
        }
    }

    /// Waits until the proxy is not paused.
    async fn resumed(&mut self) -> io::Result<()> {
        match self.paused.wait_for(|paused| !*paused).await {
            Ok(_) => Ok(()),
            // The proxy is gone; its drop cuts this connection anyway.
            Err(_) => Err(io::Error::other("the fault proxy was dropped")),
        }
    }

    /// When a chunk read now may be written: after the latency set now.
    fn due(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + *self.latency.borrow()
    }
}

/// Chunks read and not yet written, per direction: bounds the proxy's memory when the
/// reader side is faster than the latency lets the writer go.
const CHUNKS_IN_FLIGHT: usize = 64;

/// Copies `from` to `to` until EOF, holding the bytes while the proxy is paused (it reads
/// nothing while paused, and a chunk read just before the pause waits to be written) and
/// each chunk for the latency. Chunks are pipelined, as on a long network path: each is
/// written `latency` after it was read, however many are on their way.
async fn pump<R, W>(from: &mut R, to: &mut W, faults: Faults) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (chunks, mut ready) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    let read = {
        let mut faults = faults.clone();
        async move {
            loop {
                faults.resumed().await?;
                let mut buffer = vec![0; 16 * 1024];
                let read = from.read(&mut buffer).await?;
                if read == 0 {
                    return io::Result::Ok(());
                }
                buffer.truncate(read);
                if chunks.send((faults.due(), buffer)).await.is_err() {
                    return Ok(());
                }
            }
        }
    };
    let write = {
        let mut faults = faults;
        async move {
            while let Some((due, chunk)) = ready.recv().await {
                tokio::time::sleep_until(due).await;
                faults.resumed().await?;
                to.write_all(&chunk).await?;
            }
            to.shutdown().await
        }
    };
    tokio::try_join!(read, write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound on every wait that should succeed: generous, so a slow machine passes.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// How long a read must stay unanswered to count as held.
    const HELD: Duration = Duration::from_millis(300);

    /// An echo server on 127.0.0.1 with a port of its own; its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the echo server");
        let addr = listener.local_addr().expect("echo server address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    /// A client connected through `proxy`.
    async fn client(proxy: &FaultProxy) -> TcpStream {
        TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy")
    }

    /// Sends `bytes` and checks they come back (reading while it writes, so a large
    /// message cannot fill the socket buffers and stall).
    async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) {
        let (mut read, mut write) = stream.split();
        let mut echoed = vec![0; bytes.len()];
        let (written, echo) = tokio::join!(
            write.write_all(bytes),
            tokio::time::timeout(PATIENCE, read.read_exact(&mut echoed)),
        );
        written.expect("write");
        echo.expect("the echo arrives in time")
            .expect("read the echo");
        assert_eq!(echoed, bytes);
    }

    /// Whether the peer closed `stream`: its next read returns EOF or an error (a reset).
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut buffer = [0; 64];
        match tokio::time::timeout(PATIENCE, stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    #[tokio::test]
    async fn proxy_forwards_bytes_both_ways() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("start");
        assert_ne!(proxy.port(), 0);
        let mut stream = client(&proxy).await;
        round_trip(&mut stream, b"hello through the proxy").await;
        let large: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        round_trip(&mut stream, &large).await;
        assert_eq!(proxy.connections(), 1);
        assert_eq!(proxy.accepted(), 1);
    }

    #[tokio::test]
    async fn proxy_wait_for_connections_sees_them_open() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("start");
        assert!(!proxy.wait_for_connections(1, HELD).await);
        let _first = client(&proxy).await;
        let _second = client(&proxy).await;
        assert!(proxy.wait_for_connections(2, PATIENCE).await);
        assert_eq!(proxy.connections(), 2);
    }

    #[tokio::test]
    async fn proxy_cut_closes_open_connections_and_accepts_new_ones() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("start");
        let mut first = client(&proxy).await;
        let mut second = client(&proxy).await;
        round_trip(&mut first, b"one").await;
        round_trip(&mut second, b"two").await;
        assert!(proxy.wait_for_connections(2, PATIENCE).await);

        assert_eq!(proxy.cut(), 2);
        assert_eq!(proxy.connections(), 0);
        assert!(closed(&mut first).await, "the first client is cut off");
        assert!(closed(&mut second).await, "the second client is cut off");
        assert_eq!(proxy.cut(), 0, "nothing is left to cut");

        let mut third = client(&proxy).await;
        round_trip(&mut third, b"after the cut").await;
        assert_eq!(proxy.connections(), 1);
        assert_eq!(proxy.accepted(), 3);
    }

    #[tokio::test]
    async fn proxy_refuse_closes_connections_at_once() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("start");
        let mut open = client(&proxy).await;
        round_trip(&mut open, b"before").await;

        proxy.refuse(true);
        assert!(closed(&mut open).await, "the open connection is cut");
        let mut refused = client(&proxy).await;
        let _ = refused.write_all(b"anyone there?").await;
        assert!(closed(&mut refused).await, "a new connection is closed");
        assert_eq!(proxy.connections(), 0);
        assert_eq!(proxy.accepted(), 2);

        proxy.refuse(false);
        let mut again = client(&proxy).await;
        round_trip(&mut again, b"back up").await;
    }

    #[tokio::test]
    async fn proxy_pause_holds_bytes_until_resumed() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("start");
        let mut stream = client(&proxy).await;
        round_trip(&mut stream, b"flowing").await;

        proxy.pause(true);
        stream.write_all(b"held").await.expect("write while paused");
        let mut echoed = [0; 4];
        assert!(
            tokio::time::timeout(HELD, stream.read_exact(&mut echoed))
                .await
                .is_err(),
            "nothing arrives while paused"
        );
        assert_eq!(proxy.connections(), 1, "a paused connection stays open");

        proxy.pause(false);
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut echoed))
            .await
            .expect("the held bytes arrive after the pause")
            .expect("read the held bytes");
        assert_eq!(&echoed, b"held");
        round_trip(&mut stream, b"flowing again").await;
    }

    #[tokio::test]
    async fn proxy_latency_holds_each_chunk_then_passes_it_on() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("start");
        let mut stream = client(&proxy).await;
        round_trip(&mut stream, b"fast").await;

        // Each way is held this long, so the echo comes back after twice that.
        proxy.latency(HELD);
        stream.write_all(b"slow").await.expect("write");
        let mut echoed = [0; 4];
        assert!(
            tokio::time::timeout(HELD, stream.read_exact(&mut echoed))
                .await
                .is_err(),
            "nothing arrives before the latency has passed"
        );
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut echoed))
            .await
            .expect("the bytes arrive after the latency")
            .expect("read the delayed bytes");
        assert_eq!(&echoed, b"slow");

        proxy.latency(Duration::ZERO);
        round_trip(&mut stream, b"fast again").await;
    }

    #[tokio::test]
    async fn proxy_closes_the_client_when_upstream_is_down() {
        // A port that was just free: nothing listens on it.
        let gone = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let upstream = gone.local_addr().expect("address");
        drop(gone);
        let proxy = FaultProxy::start(upstream).await.expect("start");
        let mut stream = client(&proxy).await;
        assert!(closed(&mut stream).await, "the client is closed");
    }

    #[tokio::test]
    async fn dropping_the_proxy_cuts_and_stops_listening() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("start");
        let addr = proxy.addr();
        let mut stream = client(&proxy).await;
        round_trip(&mut stream, b"before the drop").await;

        drop(proxy);
        assert!(closed(&mut stream).await, "the open connection is cut");
        // Refused outright, or (accepted into the backlog just before the listener
        // closed) closed at once.
        if let Ok(mut late) = TcpStream::connect(addr).await {
            assert!(closed(&mut late).await, "nothing forwards after the drop");
        }
    }
}
