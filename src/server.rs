//! Listeners: accepts TCP connections and serves HTTP/1.1 and h2c (prior knowledge) on
//! the same port, with `TCP_NODELAY` on every accepted socket (without it, small
//! stream messages stall for ~40 ms behind Nagle and delayed ACKs).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::transport::Body;

/// A request handler: every route of a listener behind one function.
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> HandlerFuture + Send + Sync>;
/// The future a [`Handler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

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

/// Serves `handler` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    connections: Arc<ConnCounter>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(info);
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().keep_alive(true).half_close(false);
            // Streams live for hours: no per-stream limits beyond h2 flow control.
            builder.http2().max_concurrent_streams(1024);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
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
