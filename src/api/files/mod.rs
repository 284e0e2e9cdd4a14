//! The REST file routes (contract §5.5–5.7): `GET /files` (download), `POST /files`
//! (upload) and `POST /files/compose`.
//!
//! * [`sign`]: access token or signed URL (contract §2.5), checked by the handlers
//!   themselves (the router's token layer exempts `GET`/`POST /files`);
//! * [`download`]: streaming download, gzip negotiation, `Range` and conditional
//!   requests, and (guestd extension) a directory as one zip archive (`archive=zip`);
//! * [`upload`]: octet-stream and streamed multipart uploads through the domain's atomic
//!   writer, with `Content-Encoding: gzip`, metadata headers and an idle timeout;
//! * [`compose`]: concatenation of uploaded parts.
//!
//! Error bodies are `{"code":<status>,"message":"…"}` (JSON, `nosniff`), except the
//! plain-text 400 for a malformed `signature_expiration` (as the reference).

pub mod body;
pub mod compose;
pub mod content;
pub mod download;
pub mod gzip;
pub mod multipart;
pub mod sign;
pub mod upload;

use std::path::PathBuf;

use http::{HeaderValue, Response, StatusCode, header};

pub use compose::compose;
pub use download::download;
pub use upload::upload;

use super::Agent;
use crate::filesystem::{ErrorClass, FsError};
use crate::sys::users::{User, UserError};
use crate::transport::{Body, full_body};

/// A failed `/files` request: the status and the message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct FilesError {
    pub status: StatusCode,
    pub message: String,
    /// Plain text instead of the JSON error body.
    pub plain: bool,
}

impl FilesError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        FilesError {
            status,
            message: message.into(),
            plain: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// The error response.
    pub fn into_response(self) -> Response<Body> {
        if self.plain {
            let mut resp = super::plain(self.status, format!("{}\n", self.message));
            resp.headers_mut().insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            return resp;
        }
        error_response(self.status, &self.message)
    }
}

/// `{"code":<status>,"message":"…"}` with the contract's headers (§5).
pub fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message });
    let mut resp = Response::new(full_body(serde_json::to_vec(&body).unwrap_or_default()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // Out of descriptors or memory: worth retrying shortly.
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// Domain error → HTTP status:
///
/// | class | status |
/// |---|---|
/// | `NotFound` | 404 |
/// | `AlreadyExists` | 409 |
/// | `InvalidArgument`, `FailedPrecondition` | 400 |
/// | `PermissionDenied` | 403 (the kernel refused even root: read-only mount, `/proc`, immutable file) |
/// | `InsufficientStorage` | 507 |
/// | `ResourceExhausted` | 503 with `Retry-After` (EMFILE, ENFILE, ENOMEM, …) |
/// | `Internal` | 500 |
impl From<FsError> for FilesError {
    fn from(e: FsError) -> Self {
        let status = match e.class() {
            ErrorClass::NotFound => StatusCode::NOT_FOUND,
            ErrorClass::AlreadyExists => StatusCode::CONFLICT,
            ErrorClass::InvalidArgument | ErrorClass::FailedPrecondition => StatusCode::BAD_REQUEST,
            ErrorClass::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorClass::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ErrorClass::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
            ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        FilesError::new(status, e.to_string())
    }
}

/// The query parameters of `/files` (form decoding: `+` is a space; the first of a
/// repeated parameter wins).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FilesQuery {
    pub path: Option<String>,
    pub username: Option<String>,
    pub signature: Option<String>,
    /// `signature_expiration`, parsed (a non-integer is a plain-text 400).
    pub signature_expiration: Option<i64>,
    /// guestd extension (download): `archive=zip` serves a directory as a zip archive.
    pub archive: Option<String>,
    /// guestd extension (upload): `fsync=true` makes each file durable before the answer.
    pub fsync: bool,
}

impl FilesQuery {
    pub fn parse(uri: &http::Uri) -> Result<FilesQuery, FilesError> {
        let mut q = FilesQuery::default();
        let mut expiration: Option<String> = None;
        let mut fsync: Option<String> = None;
        for (k, v) in super::query_pairs(uri) {
            let slot = match k.as_str() {
                "path" => &mut q.path,
                "username" => &mut q.username,
                "signature" => &mut q.signature,
                "signature_expiration" => &mut expiration,
                "archive" => &mut q.archive,
                "fsync" => &mut fsync,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(v);
            }
        }
        if let Some(exp) = expiration {
            q.signature_expiration = Some(exp.trim().parse::<i64>().map_err(|_| FilesError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "invalid format for parameter signature_expiration: {exp:?} is not an integer \
                     (Unix seconds)"
                ),
                plain: true,
            })?);
        }
        q.fsync = match fsync.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("") | Some("false") | Some("0") | Some("no") => false,
            Some("true") | Some("1") | Some("yes") => true,
            Some(other) => {
                return Err(FilesError::bad_request(format!(
                    "invalid fsync parameter {other:?}: use fsync=true or fsync=false"
                )));
            }
        };
        Ok(q)
    }
}

/// The user of a `/files` request: the `username` parameter (absent or empty → the
/// default user). Unknown → 401 "error looking up user '<u>': …"; a lookup that ran out
/// of descriptors or memory → 503, any other lookup failure → 500 (with the errno).
pub fn lookup_user(agent: &Agent, username: Option<&str>) -> Result<User, FilesError> {
    let name = match username {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => agent.defaults().user,
    };
    agent.users.user_by_name(&name).map_err(|e| match e {
        UserError::Unknown(n) => {
            FilesError::unauthorized(format!("error looking up user '{n}': unknown user {n}"))
        }
        e if e.is_resource_exhaustion() => {
            FilesError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        e => FilesError::internal(e.to_string()),
    })
}

/// Resolves a request path for `user` (contract §2.4); failures are 400.
pub fn resolve(agent: &Agent, user: &User, path: &str) -> Result<PathBuf, FilesError> {
    let defaults = agent.defaults();
    crate::paths::resolve(path, &user.home, defaults.workdir.as_deref())
        .map_err(|e| FilesError::bad_request(format!("invalid path {path:?}: {e}")))
}

/// Runs a blocking domain call off the async workers.
pub async fn blocking<T, F>(f: F) -> Result<T, FilesError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, FsError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(FilesError::from),
        Err(e) => Err(FilesError::internal(format!(
            "the filesystem task failed: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Result<FilesQuery, FilesError> {
        FilesQuery::parse(&format!("/files?{s}").parse::<http::Uri>().expect("uri"))
    }

    #[test]
    fn query_form_decoding_and_first_value() {
        let v = q("path=a+b%2Bc&path=second&username=user&signature=v1_x&signature_expiration=17")
            .expect("ok");
        assert_eq!(v.path.as_deref(), Some("a b+c"));
        assert_eq!(v.username.as_deref(), Some("user"));
        assert_eq!(v.signature_expiration, Some(17));
        assert!(!v.fsync);
        assert!(q("fsync=true").expect("ok").fsync);
        assert!(q("fsync=maybe").is_err());
        let e = q("signature_expiration=soon").expect_err("bad exp");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.plain);
    }

    #[test]
    fn fs_errors_map_to_statuses() {
        let e = FilesError::from(FsError::NotFound("path '/x' does not exist".into()));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.message, "path '/x' does not exist");
        let e = FilesError::from(FsError::NoSpace {
            kind: crate::filesystem::NoSpaceKind::Space,
            message: "not enough disk space available".into(),
        });
        assert_eq!(e.status, StatusCode::INSUFFICIENT_STORAGE);
        let e = FilesError::from(FsError::is_a_directory(std::path::Path::new("/d")));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
