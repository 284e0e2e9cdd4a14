//! `GET /files` (contract §5.5): streams a file, gzip-encoded when the client prefers it,
//! or in identity with `Content-Length`, `Range` (206/416) and conditional requests
//! (304/412). guestd extension: `archive=zip` on a directory streams the whole tree as
//! one zip archive (without it a directory is the contract's 400).
//!
//! File data is read by one blocking task per download (positioned reads of
//! [`CHUNK`] bytes) and handed to the response through a channel of [`CHANNEL_CHUNKS`]
//! chunks: memory per download stays around 1 MiB whatever the file size, and a slow
//! client paces the reader. A read error mid-body aborts the response (the client sees a
//! truncated transfer, never a clean end).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::content::{self, Accepted, Precondition, RangeOutcome, Validators};
use super::sign::{self, Operation};
use super::{FilesError, FilesQuery, blocking, lookup_user, resolve};
use crate::api::Agent;
use crate::filesystem::{self as domain, FsError, ZipCompression};
use crate::transport::{Body, BoxError, empty_body, full_body};

/// Bytes per read and per body chunk.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the reader and the response.
const CHANNEL_CHUNKS: usize = 4;
/// Compressed bytes gathered before a gzip chunk is sent.
const GZIP_CHUNK: usize = 64 * 1024;
/// Bytes looked at to guess the type of a file without a known extension.
const SNIFF_LEN: usize = 512;

pub async fn download(agent: &Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    match serve(agent, req.uri(), req.headers()).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

/// How the response body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

/// The contract's choice (§5.5): identity for `Range`/`If-*` requests and empty files
/// whenever identity is acceptable, else by preference; `None` → 406.
fn choose(accepted: Accepted, conditional: bool, size: u64) -> Option<Encoding> {
    if accepted.identity && (conditional || size == 0 || !accepted.prefer_gzip) {
        return Some(Encoding::Identity);
    }
    if !accepted.gzip || conditional {
        return None;
    }
    Some(Encoding::Gzip)
}

/// An opened file with what the response needs.
struct Opened {
    file: File,
    size: u64,
    validators: Validators,
    /// The type by extension, else by content.
    sniffed_type: &'static str,
    /// The type by extension only.
    ext_type: Option<&'static str>,
    /// `None`: no acceptable encoding (406).
    encoding: Option<Encoding>,
    /// Files up to [`SMALL`] bytes: the whole body, already encoded (one blocking hop
    /// per download instead of two, no reader task).
    small: Option<Bytes>,
}

/// Files this small are read (and compressed) at once.
const SMALL: u64 = 64 * 1024;

fn open(path: &Path, accepted: Accepted, conditional: bool) -> Result<Opened, FsError> {
    let d = domain::open_download(path)?;
    let io_err = |e: io::Error| FsError::Io {
        op: "cannot read",
        path: path.to_path_buf(),
        source: Arc::new(e),
    };
    let meta = d.file.metadata().map_err(io_err)?;
    let etag = format!(
        "\"{:x}-{:x}-{:x}.{:x}\"",
        meta.ino(),
        d.size,
        meta.mtime(),
        meta.mtime_nsec()
    );
    let encoding = choose(accepted, conditional, d.size);
    let small = if d.size <= SMALL && encoding.is_some() {
        let mut data = vec![0u8; usize::try_from(d.size).unwrap_or(0)];
        let n = read_full_at(&d.file, &mut data, 0).map_err(io_err)?;
        data.truncate(n);
        Some(data)
    } else {
        None
    };
    let ext_type = content::type_from_extension(&path.to_string_lossy());
    let sniffed_type = match (ext_type, &small) {
        (Some(t), _) => t,
        (None, Some(data)) => content::sniff(&data[..data.len().min(SNIFF_LEN)]),
        (None, None) => {
            let mut head = vec![0u8; SNIFF_LEN];
            let n = read_full_at(&d.file, &mut head, 0).unwrap_or(0);
            content::sniff(&head[..n])
        }
    };
    let small = match (small, encoding) {
        (Some(data), Some(Encoding::Gzip)) => {
            Some(Bytes::from(super::gzip::gzip_all(&data).map_err(io_err)?))
        }
        (data, _) => data.map(Bytes::from),
    };
    Ok(Opened {
        file: d.file,
        size: d.size,
        validators: Validators {
            etag,
            modified: d.modified,
        },
        sniffed_type,
        ext_type,
        encoding,
        small,
    })
}

/// Reads until `buf` is full or the file ends.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

async fn serve(
    agent: &Arc<Agent>,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Result<Response<Body>, FilesError> {
    let q = FilesQuery::parse(uri)?;
    let presented = headers.get("x-access-token").map(HeaderValue::as_bytes);
    sign::authorize(
        &agent.token,
        presented,
        &q,
        Operation::Read,
        sign::now_unix(),
    )?;
    let user = lookup_user(agent, q.username.as_deref())?;
    let path = resolve(agent, &user, q.path.as_deref().unwrap_or(""))?;
    let accepted = content::accept_encoding(
        headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    match q.archive.as_deref() {
        None => {}
        Some(a) if a.eq_ignore_ascii_case("zip") => return zip(path, accepted).await,
        Some(other) => {
            return Err(FilesError::bad_request(format!(
                "unsupported archive format {other:?}: use archive=zip"
            )));
        }
    }
    let conditional = content::has_range_or_conditional(headers);
    let open_path = path.clone();
    let opened = blocking(move || open(&open_path, accepted, conditional)).await?;
    let name = crate::filesystem::entry::name_of(&path);
    let disposition = content::content_disposition("inline", &name);
    match opened.encoding {
        Some(Encoding::Identity) => Ok(identity(opened, headers, &disposition)),
        Some(Encoding::Gzip) => Ok(gzip(opened, &disposition)),
        None => Err(not_acceptable(headers)),
    }
}

fn not_acceptable(headers: &HeaderMap) -> FilesError {
    let offered: Vec<&str> = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    FilesError::new(
        StatusCode::NOT_ACCEPTABLE,
        format!(
            "Accept-Encoding {:?} refuses identity and offers no supported encoding \
             (Range and If-* requests are served in identity only): no acceptable encoding \
             found, supported: [gzip]",
            offered.join(", ")
        ),
    )
}

fn set(h: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

fn common_headers(h: &mut HeaderMap, disposition: &str) {
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    set(h, header::CONTENT_DISPOSITION, disposition);
}

fn validator_headers(h: &mut HeaderMap, v: &Validators) {
    set(h, header::ETAG, &v.etag);
    if let Some(m) = v.modified {
        set(h, header::LAST_MODIFIED, &httpdate::fmt_http_date(m));
    }
}

/// The identity response: preconditions, then the range or the whole file.
fn identity(opened: Opened, headers: &HeaderMap, disposition: &str) -> Response<Body> {
    let v = &opened.validators;
    match content::preconditions(headers, v) {
        Precondition::Proceed => {}
        Precondition::NotModified => {
            let mut resp = Response::new(empty_body());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            let h = resp.headers_mut();
            common_headers(h, disposition);
            validator_headers(h, v);
            return resp;
        }
        Precondition::Failed => {
            return super::error_response(
                StatusCode::PRECONDITION_FAILED,
                "precondition failed: the file does not match If-Match / If-Unmodified-Since",
            );
        }
    }
    let size = opened.size;
    let mut range = match headers.get(header::RANGE).and_then(|r| r.to_str().ok()) {
        Some(r) => content::parse_range(r, size),
        None => RangeOutcome::Full,
    };
    if range != RangeOutcome::Full
        && let Some(ir) = headers.get(header::IF_RANGE).and_then(|r| r.to_str().ok())
        && !content::if_range_allows(ir, v)
    {
        range = RangeOutcome::Full;
    }
    let (status, start, len) = match range {
        RangeOutcome::Full => (StatusCode::OK, 0, size),
        RangeOutcome::Partial { start, len } => (StatusCode::PARTIAL_CONTENT, start, len),
        RangeOutcome::Unsatisfiable => {
            let mut resp = super::error_response(
                StatusCode::RANGE_NOT_SATISFIABLE,
                &format!("range not satisfiable: the file has {size} bytes"),
            );
            set(
                resp.headers_mut(),
                header::CONTENT_RANGE,
                &format!("bytes */{size}"),
            );
            return resp;
        }
    };
    let mut resp = Response::new(match &opened.small {
        _ if len == 0 => empty_body(),
        Some(data) => {
            let (from, to) = (usize::try_from(start), usize::try_from(start + len));
            match (from, to) {
                (Ok(from), Ok(to)) if to <= data.len() => full_body(data.slice(from..to)),
                _ => file_body(opened.file, start, len),
            }
        }
        None => file_body(opened.file, start, len),
    });
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    common_headers(h, disposition);
    validator_headers(h, v);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    set(h, header::CONTENT_TYPE, opened.sniffed_type);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            h,
            header::CONTENT_RANGE,
            &format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    resp
}

/// The gzip response: compressed while read, no `Content-Length`.
fn gzip(opened: Opened, disposition: &str) -> Response<Body> {
    let body = match opened.small {
        // One chunk, but without a size hint: chunked like the streamed case (the
        // reference sends gzip without Content-Length).
        Some(data) => {
            let once =
                futures_util::stream::once(async move { Ok::<_, BoxError>(Frame::data(data)) });
            http_body_util::StreamBody::new(once).boxed_unsync()
        }
        None => gzip_body(opened.file),
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    common_headers(h, disposition);
    h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    set(
        h,
        header::CONTENT_TYPE,
        opened.ext_type.unwrap_or("application/octet-stream"),
    );
    resp
}

/// A large file compressed while it is read, by a blocking task.
fn gzip_body(file: File) -> Body {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let sink = ChunkSender {
            tx: tx.clone(),
            buf: Vec::with_capacity(GZIP_CHUNK),
        };
        if let Err(e) = compress(&file, sink)
            && !tx.is_closed()
        {
            tracing::warn!(error = %e, "gzip download failed");
            let _ = tx.blocking_send(Err(e));
        }
    });
    channel_body(rx)
}

fn compress(file: &File, sink: ChunkSender) -> io::Result<()> {
    // Level 1: most of deflate's gain for a fraction of the CPU (the Python SDK asks for
    // gzip on every download).
    let mut enc = super::gzip::GzipWriter::new(sink)?;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let n = match file.read_at(&mut buf, offset) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        offset += n as u64;
        enc.write_all(&buf[..n])?;
    }
    let mut sink = enc.finish()?;
    sink.flush()
}

/// Sends what is written as chunks of about [`GZIP_CHUNK`] bytes.
struct ChunkSender {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= GZIP_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(GZIP_CHUNK));
        self.tx
            .blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "download cancelled"))
    }
}

/// `len` bytes of `file` from `start`, read by a blocking task.
fn file_body(file: File, start: u64, len: u64) -> Body {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let end = start + len;
        let mut offset = start;
        while offset < end {
            let want = usize::try_from(end - offset).unwrap_or(CHUNK).min(CHUNK);
            let mut buf = vec![0u8; want];
            let n = match read_full_at(&file, &mut buf, offset) {
                Ok(0) => {
                    let _ = tx.blocking_send(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file shrank while it was being downloaded",
                    )));
                    return;
                }
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "download read failed");
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            buf.truncate(n);
            offset += n as u64;
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                // The client went away.
                return;
            }
        }
    });
    channel_body(rx)
}

/// A response body fed by a channel; an `Err` item aborts the response.
fn channel_body<E>(rx: mpsc::Receiver<Result<Bytes, E>>) -> Body
where
    E: Into<BoxError> + Send + 'static,
{
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item.map(Frame::data).map_err(Into::into), rx))
    });
    http_body_util::StreamBody::new(frames).boxed_unsync()
}

/// `archive=zip`: the directory as one zip archive, streamed while the tree is walked.
async fn zip(path: PathBuf, accepted: Accepted) -> Result<Response<Body>, FilesError> {
    if !accepted.identity {
        return Err(FilesError::new(
            StatusCode::NOT_ACCEPTABLE,
            "archives are sent without Content-Encoding but Accept-Encoding refuses identity: \
             no acceptable encoding found, supported: [identity]",
        ));
    }
    let name = match path.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None => "archive".to_string(),
    };
    let stream = domain::open_zip_download(path, ZipCompression::Deflated)
        .await
        .map_err(FilesError::from)?;
    use futures_util::StreamExt as _;
    // An archiver error aborts the response: a truncated zip, never a valid-looking one.
    let frames = stream.map(|item| item.map(Frame::data).map_err(BoxError::from));
    let mut resp = Response::new(http_body_util::StreamBody::new(frames).boxed_unsync());
    let h = resp.headers_mut();
    common_headers(
        h,
        &content::content_disposition("attachment", &format!("{name}.zip")),
    );
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zip"),
    );
    Ok(resp)
}
