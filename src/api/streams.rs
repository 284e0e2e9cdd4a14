//! Server-stream plumbing shared by the API resources: keepalives after silence.

use std::time::Duration;

use futures_util::{Stream, StreamExt as _};

use crate::transport::RpcError;
use crate::transport::rpc::ResponseStream;

/// What a source of stream events produces next.
pub enum Next<T> {
    /// A message; the stream goes on.
    Item(T),
    /// The final message; the stream ends after it.
    Last(T),
    /// The stream ends with an error.
    Fail(RpcError),
    /// The stream ends.
    Done,
}

/// Builds a server stream: `first` (if any), then the items of `source`, with a
/// `keepalive()` message after every `interval` of silence (the timer restarts after
/// each message; none is sent before `first`).
pub fn with_keepalive<T, Src>(
    first: Option<T>,
    source: Src,
    interval: Duration,
    keepalive: fn() -> T,
) -> ResponseStream<T>
where
    T: Send + 'static,
    Src: Stream<Item = Next<T>> + Send + 'static,
{
    let head = futures_util::stream::iter(first.map(Ok));
    let tail = futures_util::stream::unfold(
        (Box::pin(source), false),
        move |(mut source, done)| async move {
            if done {
                return None;
            }
            let item = tokio::select! {
                n = source.next() => n.unwrap_or(Next::Done),
                _ = tokio::time::sleep(interval) => return Some((Ok(keepalive()), (source, false))),
            };
            match item {
                Next::Item(t) => Some((Ok(t), (source, false))),
                Next::Last(t) => Some((Ok(t), (source, true))),
                Next::Fail(e) => Some((Err(e), (source, true))),
                Next::Done => None,
            }
        },
    );
    head.chain(tail).boxed()
}
