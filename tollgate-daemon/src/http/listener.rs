//! Serving a router on a TCP listener with the bounds a LAN-facing daemon needs: every device
//! in the café can open connections to us, paid or not.
//!
//! ```text
//!  accept ─> Caps::admit: global cap and per-IP cap (over either ─> 503 written, closed at once:
//!            a full server must not leave SYNs queued behind a slowloris)
//!         ─> hyper HTTP/1 with a timer: header_read_timeout covers slow heads AND idle
//!            keep-alive (hyper arms it whenever it waits for a request head)
//!         ─> the body carries a deadline (body_read_timeout from its head) ─> the router,
//!            with ConnectInfo<Peer> in the request's extensions
//!  close   ─> FIN, then read and discard what the client still sends (bounded: LINGER_FOR,
//!            LINGER_BYTES) so an answer sent before the body was read (413) is not destroyed
//!            by the RST the kernel sends when a socket closes with unread data
//!  shutdown ─> stop accepting; every connection shuts down gracefully (bounded wait)
//! ```
//! [`Caps`] is shared by listeners that count together (the LAN API and the portal port: the
//! unpaid clients' redirected TCP/80 counts against the same caps).

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Bytes, extract::ConnectInfo, Router};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use super::Peer;
use crate::config::HttpLimits;

/// How long shutdown waits for open connections to finish their current request.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// hyper's read buffer per connection (its minimum is 8 KiB; heads larger than this get 431).
const MAX_BUF: usize = 16 * 1024;
/// How long a closing connection keeps reading what the client still sends (nginx's
/// `lingering_time` idea), and how much it reads at most before it gives up.
const LINGER_FOR: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 * 1024 * 1024;
/// What a refused connection is told before it is closed.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// Connection caps shared by the listeners that count together.
pub struct Caps {
    limits: HttpLimits,
    global: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection's place under the caps; released on drop.
pub struct Slot {
    caps: Arc<Caps>,
    ip: IpAddr,
    _global: OwnedSemaphorePermit,
}

impl Caps {
    pub fn new(limits: &HttpLimits) -> Arc<Caps> {
        Arc::new(Caps {
            limits: limits.clone(),
            global: Arc::new(Semaphore::new(limits.max_connections)),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or None when a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let permit = self.global.clone().try_acquire_owned().ok()?;
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.limits.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(Slot {
            caps: self.clone(),
            ip,
            _global: permit,
        })
    }

    /// Connections open now (all addresses).
    pub fn open(&self) -> usize {
        self.limits.max_connections - self.global.available_permits()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.caps.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // The map holds only addresses with open connections: at most max_connections.
                map.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` under `caps` until `shutdown` completes. Handlers find the
/// [`Peer`] as `ConnectInfo<Peer>` (the portal gate turns it into `ConnectInfo<SocketAddr>`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    caps: Arc<Caps>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(caps.limits.header_read_timeout)
        .max_buf_size(MAX_BUF);
    let body_timeout = caps.limits.body_read_timeout;
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = caps.admit(remote.ip()) else {
            tracing::debug!(peer = %remote, "connection refused: connection cap reached");
            // Best effort: the peer learns why, if its buffer takes it; the socket closes anyway.
            if let Err(e) = stream.try_write(BUSY) {
                tracing::trace!(peer = %remote, error = %e, "503 not written");
            }
            continue;
        };
        let peer = Peer::of(&stream, remote);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut req = req.map(|b| axum::body::Body::new(DeadlineBody::new(b, body_timeout)));
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let conn = http.serve_connection(TokioIo::new(Linger::new(stream)), svc);
        let stop = stop.clone();
        tracker.spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::trace!(peer = %remote, error = %e, "connection ended");
                    }
                }
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    if tokio::time::timeout(SHUTDOWN_GRACE, conn).await.is_err() {
                        tracing::debug!(peer = %remote, "connection cut at the end of the shutdown grace");
                    }
                }
            }
        });
    }
    drop(listener);
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace");
    }
    Ok(())
}

/// A connection that lingers on close: hyper shuts the write side down when it is done (after
/// a 413, without reading the body); if we then closed the socket while the client's body was
/// still arriving, the kernel would answer with RST and the client could lose our answer (and
/// sees EPIPE on its write). So shutdown sends FIN and then drains the read side until EOF, the
/// deadline or the byte bound, whichever comes first. The connection keeps its slot meanwhile.
struct Linger<S> {
    inner: S,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    drained: usize,
}

impl<S> Linger<S> {
    fn new(inner: S) -> Self {
        Linger {
            inner,
            deadline: None,
            drained: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Linger<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Linger<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.deadline.is_none() {
            std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.deadline = Some(Box::pin(tokio::time::sleep(LINGER_FOR)));
        }
        let mut scratch = [0u8; 8192];
        loop {
            if let Some(d) = this.deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(()));
                }
            }
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    this.drained += rb.filled().len();
                    if this.drained >= LINGER_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                // The peer reset or the socket failed: nothing left to protect.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A request body that fails once its deadline passes (a client dripping a body one byte at a
/// time holds its connection no longer than `body_read_timeout`).
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, within: Duration) -> Self {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(within)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body not received within the body read timeout")]
struct BodyTimeout;

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(f) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(f.map(|r| r.map_err(Into::into)));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyTimeout.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::{get, post};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpSocket, TcpStream},
    };

    use super::*;

    /// A server under `limits` on 127.0.0.1 (an ephemeral port); it stops when the token does.
    async fn server(limits: HttpLimits) -> (SocketAddr, CancellationToken) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let app = Router::new()
            .route(
                "/",
                get(|ConnectInfo(p): ConnectInfo<Peer>| async move { p.remote.ip().to_string() }),
            )
            .route("/echo", post(|b: Bytes| async move { b.len().to_string() }))
            .route(
                "/small",
                post(|b: Bytes| async move { b.len().to_string() })
                    .layer(axum::extract::DefaultBodyLimit::max(1024)),
            );
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            l,
            app,
            Caps::new(&limits),
            stop.clone().cancelled_owned(),
        ));
        (addr, stop)
    }

    fn limits() -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_millis(300),
            body_read_timeout: Duration::from_millis(300),
            max_connections: 4,
            max_connections_per_ip: 2,
            admin_token: None,
        }
    }

    /// Connects from `from` (any 127/8 address is a distinct client on loopback).
    async fn connect(to: SocketAddr, from: [u8; 4]) -> TcpStream {
        let s = TcpSocket::new_v4().expect("socket");
        s.bind(SocketAddr::from((from, 0))).expect("bind client");
        s.connect(to).await.expect("connect")
    }

    /// Reads until the server closes (a generous bound: a hang is the failure being tested).
    async fn read_to_close(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
            .await
            .expect("the server must close this connection")
            .ok();
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get_ok(to: SocketAddr, from: [u8; 4]) -> String {
        let mut s = connect(to, from).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        read_to_close(&mut s).await
    }

    /// Slowloris: a head that never completes, an idle connection and an idle keep-alive
    /// connection after a request are all closed by the server (issue 11).
    #[tokio::test]
    async fn slow_heads_and_idle_connections_are_closed() {
        let (addr, stop) = server(limits()).await;
        let mut partial = connect(addr, [127, 0, 0, 1]).await;
        partial
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("write");
        let mut silent = connect(addr, [127, 0, 0, 1]).await;
        assert!(!read_to_close(&mut partial).await.contains("200 OK"));
        assert_eq!(read_to_close(&mut silent).await, "");
        let mut kept = connect(addr, [127, 0, 0, 3]).await;
        kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let answer = read_to_close(&mut kept).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        stop.cancel();
    }

    /// A body dripped slower than body_read_timeout is cut off; the handler never sees it.
    #[tokio::test]
    async fn a_dripped_body_is_cut_off() {
        let (addr, stop) = server(limits()).await;
        let mut s = connect(addr, [127, 0, 0, 1]).await;
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
            .await
            .expect("write");
        let answer = read_to_close(&mut s).await;
        assert!(!answer.contains("\r\n\r\n100"), "{answer}");
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer}"
        );
        stop.cancel();
    }

    /// A body over the cap is answered 413 before it is read; the client still writes its whole
    /// body without EPIPE/ECONNRESET and reads the 413 (without the lingering close the server's
    /// close with unread data sends RST: the client's write fails and the answer can be lost).
    #[tokio::test]
    async fn an_oversized_body_gets_its_413_not_a_reset() {
        let (addr, stop) = server(limits()).await;
        let body = vec![b'A'; 8 * 1024 * 1024];
        let mut s = connect(addr, [127, 0, 0, 1]).await;
        let head = format!(
            "POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.expect("write head");
        s.write_all(&body)
            .await
            .expect("the server drains the body it refused instead of resetting");
        let answer = read_to_close(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        stop.cancel();
    }

    /// One client cannot take more than its share; others are still served while it holds
    /// its connections; the global cap holds for many clients; slots come back on close.
    #[tokio::test]
    async fn per_ip_and_global_caps() {
        let (addr, stop) = server(HttpLimits {
            header_read_timeout: Duration::from_secs(30),
            ..limits()
        })
        .await;
        let hog = [127, 0, 0, 9];
        let _h1 = connect(addr, hog).await;
        let _h2 = connect(addr, hog).await;
        // The loop admits connections in accept order: the third finds the first two counted.
        let mut third = connect(addr, hog).await;
        assert!(read_to_close(&mut third).await.starts_with("HTTP/1.1 503"));
        assert_eq!(
            get_ok(addr, [127, 0, 0, 1]).await.lines().last(),
            Some("127.0.0.1")
        );
        // Global: 2 (hog) + 2 more idle clients = 4 = max_connections.
        let _o1 = connect(addr, [127, 0, 0, 10]).await;
        let _o2 = connect(addr, [127, 0, 0, 11]).await;
        let mut over = connect(addr, [127, 0, 0, 12]).await;
        assert!(read_to_close(&mut over).await.starts_with("HTTP/1.1 503"));
        drop((_h1, _h2, _o1, _o2));
        // Freed slots are reusable (the server notices the closes asynchronously).
        let mut served = String::new();
        for _ in 0..200 {
            served = get_ok(addr, [127, 0, 0, 9]).await;
            if served.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
        stop.cancel();
    }
}
