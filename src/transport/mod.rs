//! Transport: HTTP serving, RPC protocols, authentication. Turns requests into typed
//! calls for the API layer; nothing below `api` sees HTTP.

pub mod auth;
pub mod body;
pub mod envelope;
pub mod error;
pub mod h1guard;
pub mod rpc;

use bytes::Bytes;

pub use error::{Code, RpcError};

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type of every route: a boxed, streaming body.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A complete (non-streaming) body.
pub fn full_body(data: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt as _;
    http_body_util::Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty_body() -> Body {
    full_body(Bytes::new())
}
