//! `POST /files` (contract §5.6): `application/octet-stream` (one file, `path`
//! required) or streamed `multipart/form-data` (every part named `file`, in order).
//!
//! Processing order: signature (401) → `Content-Encoding` (gzip decoded on the fly;
//! anything but gzip/identity → 400) → user (401) → `X-Metadata-*` headers (400) →
//! body by media type. Each file goes through the domain's atomic writer: the data
//! lands in a hidden temporary file that replaces the target only when the file is
//! complete, so a client that disconnects, a stalled upload (idle timeout → 408) or a
//! full disk (507) leave the previous file as it was and no temporary file behind.
//! Memory stays flat for any size: the body is read chunk by chunk and the writer's
//! queue is bounded.
//!
//! guestd extension: `fsync=true` syncs each file and its directory before answering.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::body::{BodyError, BodySource};
use super::multipart::{self, Multipart, MultipartError};
use super::sign::{self, Operation};
use super::{FilesError, FilesQuery, lookup_user, resolve};
use crate::api::{Agent, json_response};
use crate::filesystem::{AsyncAtomicWriter, CommitOptions, Metadata, Owner, metadata_from_headers};
use crate::sys::users::User;
use crate::transport::Body;

/// After an error, this much of the rest of the body is read (and discarded) so a client
/// still sending gets to read the error response rather than a connection reset.
const DRAIN_BYTES: u64 = 8 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// One written file in the response.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WrittenFile {
    pub path: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
}

pub async fn upload(agent: &Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let mut src = BodySource::new(body, agent.upload_idle_timeout);
    let result = handle(agent, &parts.uri, &parts.headers, &mut src).await;
    match result {
        Ok(files) => json_response(StatusCode::OK, &files),
        Err(Failure { error, mut drain }) => {
            // A client waiting for `100 Continue` has not sent the body: do not ask for it.
            let expects_continue = parts
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if expects_continue && src.received() == 0 {
                drain = false;
            }
            if drain {
                src.drain(DRAIN_BYTES, DRAIN_TIME).await;
            }
            if error.status.is_server_error() || error.status == StatusCode::REQUEST_TIMEOUT {
                tracing::warn!(status = %error.status, error = %error.message, "upload failed");
            }
            let mut resp = error.into_response();
            if !drain {
                // The body was not read to its end: this connection cannot carry more
                // requests.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    }
}

/// An error and whether the rest of the body is worth draining.
struct Failure {
    error: FilesError,
    drain: bool,
}

impl From<FilesError> for Failure {
    fn from(error: FilesError) -> Self {
        Failure { error, drain: true }
    }
}

impl From<crate::filesystem::FsError> for Failure {
    fn from(e: crate::filesystem::FsError) -> Self {
        Failure::from(FilesError::from(e))
    }
}

fn body_failure(e: BodyError) -> Failure {
    let (status, drain) = match &e {
        BodyError::Stalled(_) => (StatusCode::REQUEST_TIMEOUT, false),
        BodyError::Read(_) => (StatusCode::BAD_REQUEST, false),
        BodyError::Gzip(_) => (StatusCode::BAD_REQUEST, true),
    };
    Failure {
        error: FilesError::new(status, e.to_string()),
        drain,
    }
}

impl From<MultipartError> for Failure {
    fn from(e: MultipartError) -> Self {
        match e {
            MultipartError::Body(b) => body_failure(b),
            m @ MultipartError::Malformed(_) => {
                Failure::from(FilesError::bad_request(m.to_string()))
            }
        }
    }
}

/// The request-wide settings of every file.
struct Plan {
    user: User,
    owner: Owner,
    metadata: Metadata,
    fsync: bool,
}

async fn handle(
    agent: &Arc<Agent>,
    uri: &http::Uri,
    headers: &HeaderMap,
    src: &mut BodySource,
) -> Result<Vec<WrittenFile>, Failure> {
    let q = FilesQuery::parse(uri)?;
    let presented = headers.get("x-access-token").map(HeaderValue::as_bytes);
    sign::authorize(
        &agent.token,
        presented,
        &q,
        Operation::Write,
        sign::now_unix(),
    )?;
    if content_encoding(headers)? {
        src.gunzip();
    }
    let user = lookup_user(agent, q.username.as_deref())?;
    let metadata = metadata_from_headers(
        headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes())),
    )?;
    let plan = Plan {
        owner: Owner::from(&user),
        user,
        metadata,
        fsync: q.fsync,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim();
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media == "application/octet-stream" {
        let Some(path) = q.path.as_deref() else {
            return Err(FilesError::bad_request(
                "missing path query parameter: application/octet-stream uploads need ?path=",
            )
            .into());
        };
        let target = resolve(agent, &plan.user, path)?;
        let written = write_file(target, &plan, &mut OctetStream(src)).await?;
        return Ok(vec![written]);
    }
    if media.starts_with("multipart/") {
        return upload_multipart(agent, &q, &plan, content_type, src).await;
    }
    Err(FilesError::bad_request(format!(
        "unsupported content type {content_type:?}: use multipart/form-data or \
         application/octet-stream"
    ))
    .into())
}

/// `Content-Encoding`: gzip → decode; identity/absent → as is; else 400.
fn content_encoding(headers: &HeaderMap) -> Result<bool, FilesError> {
    let mut gzip = false;
    for v in headers.get_all(header::CONTENT_ENCODING) {
        for coding in v.to_str().unwrap_or("\u{fffd}").split(',') {
            match coding.trim().to_ascii_lowercase().as_str() {
                "" | "identity" => {}
                "gzip" | "x-gzip" if !gzip => gzip = true,
                other => {
                    return Err(FilesError::bad_request(format!(
                        "unsupported Content-Encoding {other:?}: supported are gzip and identity"
                    )));
                }
            }
        }
    }
    Ok(gzip)
}

/// Where the data of one file comes from.
trait FileData {
    async fn next(&mut self) -> Result<Option<bytes::Bytes>, Failure>;
}

struct OctetStream<'a>(&'a mut BodySource);

impl FileData for OctetStream<'_> {
    async fn next(&mut self) -> Result<Option<bytes::Bytes>, Failure> {
        self.0.next().await.map_err(body_failure)
    }
}

struct Part<'a> {
    parser: &'a mut Multipart,
    src: &'a mut BodySource,
}

impl FileData for Part<'_> {
    async fn next(&mut self) -> Result<Option<bytes::Bytes>, Failure> {
        Ok(self.parser.next_chunk(self.src).await?)
    }
}

/// Writes one file atomically and reports it.
async fn write_file(
    target: PathBuf,
    plan: &Plan,
    data: &mut impl FileData,
) -> Result<WrittenFile, Failure> {
    let mut writer = AsyncAtomicWriter::create(target.clone(), plan.owner).await?;
    while let Some(chunk) = data.next().await? {
        // On any error `writer` is dropped: the temporary file goes, the target stays.
        writer.write(chunk).await?;
    }
    let done = writer
        .commit(CommitOptions {
            fsync: plan.fsync,
            metadata: Some(plan.metadata.clone()),
        })
        .await?;
    Ok(WrittenFile {
        name: crate::filesystem::entry::name_of(&done.path),
        path: done.path.to_string_lossy().into_owned(),
        kind: "file",
        metadata: done.metadata,
    })
}

async fn upload_multipart(
    agent: &Arc<Agent>,
    q: &FilesQuery,
    plan: &Plan,
    content_type: &str,
    src: &mut BodySource,
) -> Result<Vec<WrittenFile>, Failure> {
    let boundary =
        multipart::boundary(content_type).map_err(|e| FilesError::bad_request(e.to_string()))?;
    let mut parser = Multipart::new(&boundary);
    let mut written = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    while let Some(part) = parser.next_part(src).await? {
        if part.name.as_deref() != Some("file") {
            continue;
        }
        let n = parser.parts();
        let target = match (q.path.as_deref(), part.filename.as_deref()) {
            (Some(p), _) => resolve(agent, &plan.user, p)?,
            (None, Some(f)) if !f.is_empty() => resolve(agent, &plan.user, f)?,
            _ => {
                return Err(FilesError::bad_request(format!(
                    "part #{n} (field 'file') has no filename and there is no path query \
                     parameter: cannot tell where to write it"
                ))
                .into());
            }
        };
        if !seen.insert(crate::paths::normalize(&target)) {
            return Err(FilesError::bad_request(format!(
                "part #{n} resolves to {}, which an earlier part of this request already \
                 wrote: each file must have its own path",
                target.display()
            ))
            .into());
        }
        let mut data = Part {
            parser: &mut parser,
            src,
        };
        written.push(write_file(target, plan, &mut data).await?);
    }
    if written.is_empty() {
        return Err(FilesError::bad_request(
            "the multipart body has no file: send each file as a part named 'file'",
        )
        .into());
    }
    Ok(written)
}
