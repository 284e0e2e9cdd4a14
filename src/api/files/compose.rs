//! `POST /files/compose` (contract §5.7; not used by the SDKs; the router requires the
//! access token when one is set): concatenates files into a destination atomically.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use super::{FilesError, blocking, lookup_user, resolve};
use crate::api::{Agent, json_response};
use crate::filesystem::{self as domain, Owner};
use crate::transport::Body;

/// Largest accepted request body.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, serde::Deserialize)]
struct ComposeRequest {
    #[serde(default)]
    source_paths: Vec<String>,
    #[serde(default)]
    destination: String,
    #[serde(default)]
    username: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct Composed {
    path: String,
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
}

pub async fn compose(agent: &Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    match handle(agent, req).await {
        Ok(c) => json_response(StatusCode::OK, &c),
        Err(e) => e.into_response(),
    }
}

async fn handle(agent: &Arc<Agent>, req: Request<Incoming>) -> Result<Composed, FilesError> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                FilesError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body exceeds the limit of {MAX_BODY} bytes"),
                )
            } else {
                FilesError::bad_request(crate::transport::body::BodyFault::classify(&*e).message())
            }
        })?
        .to_bytes();
    let r: ComposeRequest = serde_json::from_slice(&body)
        .map_err(|e| FilesError::bad_request(format!("invalid JSON body: {e}")))?;
    if r.source_paths.is_empty() {
        return Err(FilesError::bad_request("source_paths must not be empty"));
    }
    if r.destination.is_empty() {
        return Err(FilesError::bad_request("destination must not be empty"));
    }
    let user = lookup_user(agent, r.username.as_deref())?;
    let sources = r
        .source_paths
        .iter()
        .map(|p| resolve(agent, &user, p))
        .collect::<Result<Vec<_>, _>>()?;
    let destination = resolve(agent, &user, &r.destination)?;
    let owner = Owner::from(&user);
    let done = blocking(move || domain::compose(&sources, &destination, owner)).await?;
    Ok(Composed {
        name: crate::filesystem::entry::name_of(&done.path),
        path: done.path.to_string_lossy().into_owned(),
        kind: "file",
    })
}
