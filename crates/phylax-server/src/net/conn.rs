//! Connections: the accept loop (TLS, or plaintext on loopback), with the
//! limits that keep a few slow or idle clients from holding the server.
//!
//! - **At most `http.max_connections` at once.** Past it, new connections
//!   wait in the kernel's backlog until one ends (nothing is accepted that
//!   cannot be served).
//! - **TLS handshake:** `http.header_timeout_secs`.
//! - **Request headers:** `http.header_timeout_secs` from the first byte
//!   of a request (hyper's HTTP/1 header read timeout).
//! - **Idle:** a connection with no request in flight (a response still
//!   being sent counts as in flight) for `http.idle_timeout_secs` after its
//!   last one ended is closed: HTTP/1 keep-alive and HTTP/2 alike, a
//!   connection that never sends a request, and one kept "alive" only by
//!   PING frames.
//! - **Per address:** at most `http.max_connections_per_ip` connections
//!   from one address (0: no limit); more are closed at once.
//! - **Request body:** the whole body must arrive within
//!   `http.body_timeout_secs` of the request's start; a body still
//!   trickling in after that ends with 408 (the handler sees
//!   [`BodyTimeout`]).
//!
//! docs/OPERATIONS.md ("Connections and limits") says how to choose them.

use hyper::body::{Body, Bytes, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};

/// The limits of [`serve`]; from `[http]` in the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Most connections from one address (0: no limit).
    pub max_per_ip: usize,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_per_ip: 256,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
        }
    }
}

/// The TLS client certificate the connection presented (mutual TLS,
/// `[tls] client_ca`), as its SHA-256 thumbprint in base64url: RFC 8705's
/// `x5t#S256`. In the request extensions of every request on such a
/// connection; absent otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert(pub String);

impl ClientCert {
    /// The thumbprint of a certificate (DER).
    pub fn of(der: &[u8]) -> ClientCert {
        use base64::Engine;
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        ClientCert(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d.as_ref()))
    }
}

/// The request body did not arrive within `http.body_timeout_secs`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimeout;

/// When a connection last started or finished answering a request, and
/// how many of its requests are being answered (body sent included).
/// Bytes moving do not count: an HTTP/2 PING, or a client's own, must not
/// keep an otherwise idle connection open.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A request in flight; the connection is not idle while one lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> InFlight {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A response body that keeps its request in flight until it has been
/// sent (or dropped): a slow download is not an idle connection.
struct Held<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Body for Held<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that must end by a deadline.
struct Deadline<B> {
    inner: B,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl<B> Body for Deadline<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(r.map(|f| f.map_err(Into::into)));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Was this body error the deadline of [`Limits::body_timeout`]?
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if x.is::<BodyTimeout>() {
            return true;
        }
        cur = x.source();
    }
    false
}

/// Serve `router` on `listener` until `shutdown` resolves: over TLS with
/// `tls`, else plaintext (the caller allows that on loopback only).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let per_ip: Arc<parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Default::default();
    tokio::pin!(shutdown);
    loop {
        // A free place first: past the cap, connections wait in the backlog.
        let permit = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Ok(()),
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // One address may not hold every place.
        let ip = peer.ip();
        {
            let mut m = per_ip.lock();
            let n = m.entry(ip).or_insert(0);
            if limits.max_per_ip > 0 && *n >= limits.max_per_ip {
                tracing::debug!(peer = %ip, "connection refused: too many from this address");
                continue;
            }
            *n += 1;
        }
        let counted = PerIp {
            map: per_ip.clone(),
            ip,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _counted = counted;
            match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await
                    {
                        Ok(Ok(s)) => {
                            // The leaf a verified client presented (the
                            // verifier has checked its chain already).
                            let cert = s
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| ClientCert::of(c.as_ref()));
                            serve_connection(s, peer, cert, router, limits).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer.ip(), error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer.ip(), "TLS handshake timed out"),
                    }
                }
                None => serve_connection(tcp, peer, None, router, limits).await,
            }
        });
    }
}

/// One connection counted against its address until it ends.
struct PerIp {
    map: Arc<parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl Drop for PerIp {
    fn drop(&mut self) {
        let mut m = self.map.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

async fn serve_connection<IO>(
    io: IO,
    peer: std::net::SocketAddr,
    cert: Option<ClientCert>,
    router: axum::Router,
    limits: Limits,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let activity = Activity::new();
    activity.touch();
    let body_timeout = limits.body_timeout;
    let act = activity.clone();
    let svc = tower::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let guard = InFlight::new(&act);
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        if let Some(c) = &cert {
            req.extensions_mut().insert(c.clone());
        }
        let req = req.map(|b| {
            axum::body::Body::new(Deadline {
                inner: b,
                sleep: Box::pin(tokio::time::sleep(body_timeout)),
            })
        });
        let router = router.clone();
        async move {
            let r = router.oneshot(req).await;
            // In flight until its body has gone out.
            r.map(|resp| {
                resp.map(|b| {
                    axum::body::Body::new(Held {
                        inner: b,
                        _in_flight: guard,
                    })
                })
            })
        }
    });
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    // No server PINGs: idleness is judged by requests alone.
    builder.http2().timer(TokioTimer::new());
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    loop {
        let wait = limits
            .idle_timeout
            .saturating_sub(activity.idle_for())
            .max(Duration::from_millis(100));
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(wait) => {
                if activity.in_flight.load(Ordering::Relaxed) == 0
                    && activity.idle_for() >= limits.idle_timeout
                {
                    // Idle: say goodbye (HTTP/2 GOAWAY, HTTP/1 close), and
                    // drop it if that does not end it at once.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                    return;
                }
            }
        }
    }
}
