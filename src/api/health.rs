//! `GET /health`: 204 as soon as the HTTP server is up (contract §5.1).

use http::{HeaderValue, Response, StatusCode, header};

use crate::transport::{Body, empty_body};

pub fn health() -> Response<Body> {
    let mut resp = Response::new(empty_body());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
