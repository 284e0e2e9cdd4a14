//! Listeners: accepts TCP connections and serves HTTP/1.1 and h2c (prior knowledge) on
//! the same port, with `TCP_NODELAY` on every accepted socket (without it, small
//! stream messages stall for ~40 ms behind Nagle and delayed ACKs).
//!
//! Every socket is wrapped in [`h1guard::Guarded`]: a request head hyper cannot parse
//! gets the listener's error page naming the problem instead of hyper's empty 400.
//! When the agent runs out of descriptors, accepting backs off and resumes by itself
//! once descriptors are free again; pending clients wait in the listen backlog.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::transport::Body;
use crate::transport::h1guard::{self, Dispatches, ErrorPage, Guarded};

/// The future a [`Handler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// A listener's request handling: every route behind one function, and the error page
/// for requests hyper rejects before routing.
#[derive(Clone)]
pub struct Handler {
    call: Arc<dyn Fn(Request<Incoming>) -> HandlerFuture + Send + Sync>,
    error_page: ErrorPage,
}

impl Handler {
    pub fn new(
        call: impl Fn(Request<Incoming>) -> HandlerFuture + Send + Sync + 'static,
        error_page: ErrorPage,
    ) -> Handler {
        Handler {
            call: Arc::new(call),
            error_page,
        }
    }

    /// Serves one request.
    pub fn call(&self, req: Request<Incoming>) -> HandlerFuture {
        (self.call)(req)
    }

    /// The body of an error for a request hyper rejected.
    pub fn error_page(&self) -> ErrorPage {
        self.error_page
    }
}

/// Attached to every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// Live connection count of a listener (reported by the metrics).
#[derive(Debug, Default)]
pub struct ConnCounter(AtomicUsize);

impl ConnCounter {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

struct ConnGuard(Arc<ConnCounter>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// First and longest pause after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(200);
/// At most one warning per this interval while accepting keeps failing.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// Failed accepts: the pause before the next try, and rate-limited warnings.
struct AcceptErrors {
    backoff: Duration,
    failed: u64,
    last_warn: Option<Instant>,
}

impl AcceptErrors {
    fn new() -> Self {
        AcceptErrors {
            backoff: ACCEPT_BACKOFF_MIN,
            failed: 0,
            last_warn: None,
        }
    }

    /// Notes a failure; returns how long to wait before accepting again.
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        self.failed += 1;
        let now = Instant::now();
        if self
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_EVERY)
        {
            let hint = if crate::sys::limits::is_resource_exhaustion(e) {
                "out of descriptors or memory: new connections wait in the backlog until some \
                 are free"
            } else {
                "retrying"
            };
            tracing::warn!(error = %e, failed = self.failed, "accept failed: {hint}");
            self.last_warn = Some(now);
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
        pause
    }

    fn succeeded(&mut self) {
        if self.failed > 0 {
            tracing::info!(
                failed = self.failed,
                "accepting connections again after failures"
            );
        }
        *self = AcceptErrors::new();
    }
}

/// Serves `handler` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    connections: Arc<ConnCounter>,
    shutdown: CancellationToken,
) {
    let mut errors = AcceptErrors::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    errors.succeeded();
                    a
                }
                Err(e) => {
                    // EMFILE/ENFILE and friends: the connection stays in the backlog
                    // and the listener stays readable; pause instead of spinning.
                    let pause = errors.failed(&e);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let local = stream.local_addr().unwrap_or(peer);
        let info = ConnInfo { peer, local };
        let handler = handler.clone();
        connections.0.fetch_add(1, Ordering::Relaxed);
        let guard = ConnGuard(connections.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let dispatches = Arc::new(Dispatches::default());
            let io = Guarded::new(stream, dispatches.clone(), handler.error_page());
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                dispatches.dispatched(req.method(), req.version());
                req.extensions_mut().insert(info);
                let fut = handler.call(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().keep_alive(true).half_close(false);
            // Streams live for hours: no per-stream limits beyond h2 flow control.
            builder.http2().max_concurrent_streams(1024);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// The error body in the JSON shape of the REST routes: `{"code":<status>,"message"}`.
pub fn rest_error_page(bad: &h1guard::BadRequest<'_>) -> h1guard::ErrorBody {
    let body = serde_json::json!({ "code": bad.status.as_u16(), "message": bad.message });
    h1guard::ErrorBody {
        content_type: "application/json; charset=utf-8",
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}
