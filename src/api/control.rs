//! Control-plane routes: `POST /init` (contract §5.4) and `GET /envs` (§5.3).

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use super::{Agent, json_response, plain};
use crate::config::ENVD_COMPAT_VERSION;
use crate::init::{InitError, InitRequest};
use crate::transport::{Body, empty_body};

/// Largest accepted `/init` body (env vars and a CA bundle fit easily).
const MAX_INIT_BODY: usize = 4 << 20;

pub async fn init(agent: &Agent, req: Request<Incoming>) -> Response<Body> {
    let mut resp = init_inner(agent, req).await;
    // Every /init response carries the version (contract §5.4 step 8, §6.6).
    resp.headers_mut().insert(
        "x-envd-version",
        HeaderValue::from_static(ENVD_COMPAT_VERSION),
    );
    resp
}

async fn init_inner(agent: &Agent, req: Request<Incoming>) -> Response<Body> {
    let body = match http_body_util::Limited::new(req.into_body(), MAX_INIT_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let why = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                format!("the body exceeds the limit of {MAX_INIT_BODY} bytes")
            } else {
                crate::transport::body::BodyFault::classify(&*e).to_string()
            };
            return plain(
                StatusCode::BAD_REQUEST,
                format!("cannot read the /init body: {why}\n"),
            );
        }
    };
    let request: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("invalid /init JSON: {e}\n"),
                );
            }
        }
    };
    match agent.init.init(request).await {
        Ok(applied) => {
            if applied.fresh {
                let mut d = agent.defaults.write().unwrap_or_else(|p| p.into_inner());
                if let Some(u) = applied.default_user {
                    d.user = u;
                }
                if let Some(w) = applied.default_workdir {
                    d.workdir = Some(w);
                }
            }
            let mut resp = Response::new(empty_body());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(InitError::Unauthorized) => plain(
            StatusCode::UNAUTHORIZED,
            format!("{}\n", InitError::Unauthorized),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "/init failed");
            plain(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

pub fn envs(agent: &Agent) -> Response<Body> {
    let env = agent.env.snapshot();
    let mut resp = json_response(StatusCode::OK, &*env);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
