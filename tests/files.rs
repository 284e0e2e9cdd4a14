//! REST `/files` (download, upload) and `/files/compose` over the real port.

#![allow(clippy::disallowed_methods)] // the tests run `useradd` directly

mod common;

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use common::{Client, Guestd, ensure_test_user, files_url, multipart_body};
use http::{HeaderMap, Method, StatusCode};
use sha2::Digest as _;

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

type Fetched = (StatusCode, HeaderMap, Bytes);

async fn get(c: &Client, pairs: &[(&str, &str)], headers: &[(&str, &str)]) -> Fetched {
    c.fetch(Method::GET, &files_url(pairs), headers, Vec::new())
        .await
}

async fn post(
    c: &Client,
    pairs: &[(&str, &str)],
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Fetched {
    c.fetch(Method::POST, &files_url(pairs), headers, body)
        .await
}

async fn post_octet(c: &Client, pairs: &[(&str, &str)], body: impl Into<Bytes>) -> Fetched {
    post(
        c,
        pairs,
        &[("content-type", "application/octet-stream")],
        body,
    )
    .await
}

/// The `{"code","message"}` error body, checking the contract's headers.
fn error_of(f: &Fetched) -> (u64, String) {
    let (status, headers, body) = f;
    assert_eq!(
        headers["content-type"], "application/json; charset=utf-8",
        "error content type ({status})"
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let v: serde_json::Value = serde_json::from_slice(body).expect("error JSON");
    assert_eq!(v["code"].as_u64(), Some(u64::from(status.as_u16())), "{v}");
    (
        v["code"].as_u64().unwrap_or(0),
        v["message"].as_str().unwrap_or_default().to_string(),
    )
}

fn json(f: &Fetched) -> serde_json::Value {
    assert_eq!(f.0, StatusCode::OK, "{}", String::from_utf8_lossy(&f.2));
    serde_json::from_slice(&f.2).expect("JSON body")
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha(data: &[u8]) -> Vec<u8> {
    sha2::Sha256::digest(data).to_vec()
}

/// Names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Waits until `dir` holds exactly `expected` (a dropped upload's temp file goes away
/// asynchronously).
async fn wait_names(dir: &Path, expected: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = names(dir);
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "directory holds {now:?}, want {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------
// Download

#[tokio::test]
async fn download_identity_with_all_headers() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("notes.txt");
    fs::write(&f, b"hello world").expect("write");
    let r = get(&c, &[("path", &p(&f))], &[]).await;
    assert_eq!(r.0, StatusCode::OK);
    let h = &r.1;
    assert_eq!(h["content-length"], "11");
    assert_eq!(h["content-type"], "text/plain; charset=utf-8");
    assert_eq!(h["content-disposition"], "inline; filename=notes.txt");
    assert_eq!(h["vary"], "Accept-Encoding");
    assert_eq!(h["accept-ranges"], "bytes");
    assert!(h.contains_key("last-modified") && h.contains_key("etag"));
    assert!(!h.contains_key("content-encoding"));
    assert_eq!(&r.2[..], b"hello world");

    // No extension: sniffed.
    let bin = dir.path().join("blob");
    fs::write(&bin, [0u8, 1, 2, 3]).expect("write");
    let r = get(&c, &[("path", &p(&bin))], &[]).await;
    assert_eq!(r.1["content-type"], "application/octet-stream");
    // Non-ASCII names: RFC 2231.
    let u = dir.path().join("résumé 1.txt");
    fs::write(&u, b"x").expect("write");
    let r = get(&c, &[("path", &p(&u))], &[]).await;
    assert_eq!(
        r.1["content-disposition"],
        "inline; filename*=utf-8''r%C3%A9sum%C3%A9%201.txt"
    );
    // Through a symlink.
    std::os::unix::fs::symlink(&f, dir.path().join("link")).expect("symlink");
    let r = get(&c, &[("path", &p(&dir.path().join("link")))], &[]).await;
    assert_eq!(&r.2[..], b"hello world");
}

#[tokio::test]
async fn download_gzip_negotiation() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("data.json");
    let content = br#"{"k":"v"}"#.repeat(1000);
    fs::write(&f, &content).expect("write");
    let path = p(&f);

    // What the Python SDK sends.
    let r = get(
        &c,
        &[("path", &path)],
        &[("accept-encoding", "gzip, deflate")],
    )
    .await;
    assert_eq!(r.0, StatusCode::OK);
    assert_eq!(r.1["content-encoding"], "gzip");
    assert_eq!(r.1["content-type"], "application/json");
    assert_eq!(r.1["vary"], "Accept-Encoding");
    assert!(!r.1.contains_key("content-length"), "streamed");
    assert!(r.2.len() < content.len());
    assert_eq!(gunzip(&r.2), content);

    // Identity preferred by q-value.
    let r = get(
        &c,
        &[("path", &path)],
        &[("accept-encoding", "gzip;q=0.5, identity")],
    )
    .await;
    assert!(!r.1.contains_key("content-encoding"));
    assert_eq!(&r.2[..], &content[..]);

    // Identity refused, gzip offered.
    let r = get(
        &c,
        &[("path", &path)],
        &[("accept-encoding", "*, identity;q=0")],
    )
    .await;
    assert_eq!(r.1["content-encoding"], "gzip");

    // Identity refused and nothing supported: 406.
    for ae in ["identity;q=0", "br, *;q=0"] {
        let r = get(&c, &[("path", &path)], &[("accept-encoding", ae)]).await;
        assert_eq!(r.0, StatusCode::NOT_ACCEPTABLE, "{ae}");
        let (_, msg) = error_of(&r);
        assert!(
            msg.ends_with("no acceptable encoding found, supported: [gzip]"),
            "{msg}"
        );
    }
    // Range requests are identity only: 406 when identity is refused.
    let r = get(
        &c,
        &[("path", &path)],
        &[
            ("accept-encoding", "gzip, identity;q=0"),
            ("range", "bytes=0-1"),
        ],
    )
    .await;
    assert_eq!(r.0, StatusCode::NOT_ACCEPTABLE);
    // … and identity even when gzip is preferred.
    let r = get(
        &c,
        &[("path", &path)],
        &[("accept-encoding", "gzip"), ("range", "bytes=0-1")],
    )
    .await;
    assert_eq!(r.0, StatusCode::PARTIAL_CONTENT);
    assert!(!r.1.contains_key("content-encoding"));

    // An empty file is identity with Content-Length: 0 even when gzip is preferred.
    let empty = dir.path().join("empty.txt");
    fs::write(&empty, b"").expect("write");
    let r = get(&c, &[("path", &p(&empty))], &[("accept-encoding", "gzip")]).await;
    assert_eq!(r.0, StatusCode::OK);
    assert_eq!(r.1["content-length"], "0");
    assert!(!r.1.contains_key("content-encoding"));
    assert!(r.2.is_empty());
}

#[tokio::test]
async fn download_ranges_and_conditionals() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("r.bin");
    let data: Vec<u8> = (0..=255u8).collect();
    fs::write(&f, &data).expect("write");
    let path = p(&f);
    let full = get(&c, &[("path", &path)], &[]).await;
    let etag = full.1["etag"].to_str().expect("etag").to_string();
    let last_modified = full.1["last-modified"].to_str().expect("lm").to_string();

    let r = get(&c, &[("path", &path)], &[("range", "bytes=10-19")]).await;
    assert_eq!(r.0, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.1["content-range"], "bytes 10-19/256");
    assert_eq!(r.1["content-length"], "10");
    assert_eq!(&r.2[..], &data[10..20]);
    let r = get(&c, &[("path", &path)], &[("range", "bytes=-6")]).await;
    assert_eq!(&r.2[..], &data[250..]);
    let r = get(&c, &[("path", &path)], &[("range", "bytes=300-")]).await;
    assert_eq!(r.0, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.1["content-range"], "bytes */256");

    let r = get(&c, &[("path", &path)], &[("if-none-match", &etag)]).await;
    assert_eq!(r.0, StatusCode::NOT_MODIFIED);
    assert!(r.2.is_empty());
    let r = get(
        &c,
        &[("path", &path)],
        &[("if-modified-since", &last_modified)],
    )
    .await;
    assert_eq!(r.0, StatusCode::NOT_MODIFIED);
    let r = get(&c, &[("path", &path)], &[("if-match", "\"other\"")]).await;
    assert_eq!(r.0, StatusCode::PRECONDITION_FAILED);
    // If-Range with a stale validator: the whole file.
    let r = get(
        &c,
        &[("path", &path)],
        &[("range", "bytes=0-1"), ("if-range", "\"stale\"")],
    )
    .await;
    assert_eq!(r.0, StatusCode::OK);
    assert_eq!(r.2.len(), 256);
    let r = get(
        &c,
        &[("path", &path)],
        &[("range", "bytes=0-1"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(r.0, StatusCode::PARTIAL_CONTENT);
}

#[tokio::test]
async fn download_errors() {
    let (user, _, _, home) = ensure_test_user();
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");

    let missing = dir.path().join("missing");
    let r = get(&c, &[("path", &p(&missing))], &[]).await;
    assert_eq!(r.0, StatusCode::NOT_FOUND);
    assert_eq!(
        error_of(&r).1,
        format!("path '{}' does not exist", missing.display())
    );
    let r = get(&c, &[("path", &p(dir.path()))], &[]).await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_of(&r).1,
        format!("path '{}' is a directory", dir.path().display())
    );
    let r = get(&c, &[("path", "/x"), ("username", "no-such-user-x")], &[]).await;
    assert_eq!(r.0, StatusCode::UNAUTHORIZED);
    assert!(
        error_of(&r)
            .1
            .starts_with("error looking up user 'no-such-user-x': "),
        "{:?}",
        r.2
    );
    let r = get(&c, &[("path", "~other/x")], &[]).await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);
    let r = get(&c, &[("path", &p(dir.path())), ("archive", "tar")], &[]).await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);
    let (status, _, _) = c
        .fetch(Method::PUT, &files_url(&[("path", "/x")]), &[], Vec::new())
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // Relative paths resolve against the user's home; files are read as root whatever
    // the user.
    let name = format!("dl-{}.txt", std::process::id());
    fs::write(home.join(&name), b"home file").expect("write");
    fs::set_permissions(home.join(&name), fs::Permissions::from_mode(0o600)).expect("chmod");
    let r = get(&c, &[("path", &name), ("username", user)], &[]).await;
    assert_eq!(r.0, StatusCode::OK);
    assert_eq!(&r.2[..], b"home file");
    fs::remove_file(home.join(&name)).expect("cleanup");
}

#[tokio::test]
async fn download_a_directory_as_zip() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = dir.path().join("proj");
    fs::create_dir_all(b.join("src/deep")).expect("mkdir");
    fs::write(b.join("README.md"), b"# proj").expect("write");
    let big = noise(300_000, 7);
    fs::write(b.join("src/deep/data.bin"), &big).expect("write");
    std::os::unix::fs::symlink("../README.md", b.join("src/link")).expect("symlink");

    let r = get(
        &c,
        &[("path", &p(&b)), ("archive", "zip")],
        &[("accept-encoding", "gzip, deflate")],
    )
    .await;
    assert_eq!(r.0, StatusCode::OK);
    assert_eq!(r.1["content-type"], "application/zip");
    assert_eq!(r.1["content-disposition"], "attachment; filename=proj.zip");
    assert!(!r.1.contains_key("content-encoding"));
    let mut ar = zip::ZipArchive::new(std::io::Cursor::new(r.2.to_vec())).expect("zip");
    let entries: Vec<String> = (0..ar.len())
        .map(|i| {
            ar.by_index(i)
                .expect("entry")
                .name()
                .expect("name")
                .to_string()
        })
        .collect();
    assert_eq!(
        entries,
        [
            "README.md",
            "src/",
            "src/deep/",
            "src/deep/data.bin",
            "src/link"
        ]
    );
    let mut got = Vec::new();
    ar.by_name("src/deep/data.bin")
        .expect("data")
        .read_to_end(&mut got)
        .expect("read");
    assert_eq!(sha(&got), sha(&big));

    let r = get(
        &c,
        &[("path", &p(&b.join("README.md"))), ("archive", "zip")],
        &[],
    )
    .await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);
    let r = get(
        &c,
        &[("path", &p(&b.join("nope"))), ("archive", "zip")],
        &[],
    )
    .await;
    assert_eq!(r.0, StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------------
// Signatures

/// The SDK's recipe, written out independently of guestd's code.
fn sdk_signature(path: &str, op: &str, user: &str, token: &str, exp: Option<i64>) -> String {
    let raw = match exp {
        Some(e) => format!("{path}:{op}:{user}:{token}:{e}"),
        None => format!("{path}:{op}:{user}:{token}"),
    };
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(raw))
    )
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

async fn set_token(c: &Client, token: &str) {
    let (status, _, body) = c
        .fetch(
            Method::POST,
            "/init",
            &[("content-type", "application/json")],
            serde_json::to_vec(&serde_json::json!({ "accessToken": token })).expect("json"),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body:?}");
}

#[tokio::test]
async fn signed_urls_and_access_tokens() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("secret file+1.txt");
    fs::write(&f, b"top").expect("write");
    let path = p(&f);
    set_token(&c, "tok123").await;

    let r = get(&c, &[("path", &path)], &[("x-access-token", "tok123")]).await;
    assert_eq!(r.0, StatusCode::OK, "token header");
    let r = get(&c, &[("path", &path)], &[("x-access-token", "nope")]).await;
    assert_eq!(r.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        error_of(&r).1,
        "access token present in header but does not match"
    );
    let r = get(&c, &[("path", &path)], &[]).await;
    assert_eq!(error_of(&r).1, "missing signature query parameter");

    let sig = sdk_signature(&path, "read", "", "tok123", None);
    let r = get(&c, &[("path", &path), ("signature", &sig)], &[]).await;
    assert_eq!(r.0, StatusCode::OK, "signed read");
    assert_eq!(&r.2[..], b"top");
    // The same signature does not allow writing, nor another user.
    let r = post_octet(&c, &[("path", &path), ("signature", &sig)], "x").await;
    assert_eq!(error_of(&r).1, "invalid signature");
    let r = get(
        &c,
        &[("path", &path), ("signature", &sig), ("username", "root")],
        &[],
    )
    .await;
    assert_eq!(error_of(&r).1, "invalid signature");
    let user_sig = sdk_signature(&path, "read", "root", "tok123", None);
    let r = get(
        &c,
        &[
            ("path", &path),
            ("signature", &user_sig),
            ("username", "root"),
        ],
        &[],
    )
    .await;
    assert_eq!(r.0, StatusCode::OK, "username is part of the signature");

    // Expiry.
    let exp = now() + 60;
    let s = sdk_signature(&path, "read", "", "tok123", Some(exp));
    let exp_s = exp.to_string();
    let r = get(
        &c,
        &[
            ("path", &path),
            ("signature", &s),
            ("signature_expiration", &exp_s),
        ],
        &[],
    )
    .await;
    assert_eq!(r.0, StatusCode::OK);
    let old = now() - 5;
    let s = sdk_signature(&path, "read", "", "tok123", Some(old));
    let old_s = old.to_string();
    let r = get(
        &c,
        &[
            ("path", &path),
            ("signature", &s),
            ("signature_expiration", &old_s),
        ],
        &[],
    )
    .await;
    assert_eq!(r.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        &r.2[..],
        br#"{"code":401,"message":"signature is already expired"}"#
    );
    let r = get(
        &c,
        &[
            ("path", &path),
            ("signature", &s),
            ("signature_expiration", "soon"),
        ],
        &[],
    )
    .await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);
    assert!(
        r.1["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/plain"),
        "plain-text 400"
    );

    // Signed upload.
    let target = p(&dir.path().join("up.txt"));
    let s = sdk_signature(&target, "write", "", "tok123", None);
    let r = post_octet(&c, &[("path", &target), ("signature", &s)], "signed").await;
    assert_eq!(r.0, StatusCode::OK, "{:?}", r.2);
    assert_eq!(
        fs::read(dir.path().join("up.txt")).expect("read"),
        b"signed"
    );

    // Compose and the RPCs need the header.
    let (status, _, _) = c
        .fetch(
            Method::POST,
            "/files/compose",
            &[("content-type", "application/json")],
            "{}",
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = c
        .fetch(
            Method::POST,
            "/filesystem.Filesystem/Stat",
            &[("content-type", "application/json")],
            "{\"path\":\"/\"}",
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------------
// Upload

#[tokio::test]
async fn octet_stream_upload_rules() {
    let (user, uid, gid, _) = ensure_test_user();
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("new/dirs/file.txt");

    let r = post_octet(&c, &[], "x").await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);
    assert!(error_of(&r).1.contains("missing path"), "{:?}", r.2);

    let r = post_octet(&c, &[("path", &p(&target)), ("username", user)], "content").await;
    let v = json(&r);
    assert_eq!(
        v,
        serde_json::json!([{ "path": p(&target), "name": "file.txt", "type": "file" }])
    );
    assert_eq!(
        r.1["content-type"].to_str().expect("ct"),
        "application/json"
    );
    let m = fs::metadata(&target).expect("written");
    assert_eq!((m.uid(), m.gid()), (uid, gid));
    assert_eq!(m.mode() & 0o7777, 0o644);
    let parent = fs::metadata(dir.path().join("new")).expect("parent");
    assert_eq!((parent.uid(), parent.mode() & 0o7777), (uid, 0o755));

    // Overwrite: mode kept, owner set to the (default, root) user, content replaced.
    fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).expect("chmod");
    let r = post_octet(&c, &[("path", &p(&target)), ("fsync", "true")], "v2").await;
    json(&r);
    let m = fs::metadata(&target).expect("written");
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o600));
    assert_eq!(fs::read(&target).expect("read"), b"v2");
    let r = post_octet(&c, &[("path", &p(&target)), ("fsync", "maybe")], "v3").await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);

    // gzip request bodies.
    let data = b"compressible ".repeat(10_000);
    let r = post(
        &c,
        &[("path", &p(&target))],
        &[
            ("content-type", "application/octet-stream"),
            ("content-encoding", "gzip"),
        ],
        gzip(&data),
    )
    .await;
    json(&r);
    assert_eq!(fs::read(&target).expect("read"), data);
    let r = post(
        &c,
        &[("path", &p(&target))],
        &[
            ("content-type", "application/octet-stream"),
            ("content-encoding", "gzip"),
        ],
        &b"not gzip at all"[..],
    )
    .await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);
    assert!(error_of(&r).1.contains("gzip"), "{:?}", r.2);
    assert_eq!(fs::read(&target).expect("read"), data, "old file kept");
    let r = post(
        &c,
        &[("path", &p(&target))],
        &[
            ("content-type", "application/octet-stream"),
            ("content-encoding", "br"),
        ],
        "x",
    )
    .await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&r).1.contains("unsupported Content-Encoding"),
        "{:?}",
        r.2
    );

    let r = post(
        &c,
        &[("path", &p(&target))],
        &[("content-type", "text/plain")],
        "x",
    )
    .await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&r).1.starts_with("unsupported content type"),
        "{:?}",
        r.2
    );

    // A directory where a file is expected; a file where a directory is expected.
    let r = post_octet(&c, &[("path", &p(dir.path()))], "x").await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_of(&r).1,
        format!("path is a directory: {}", dir.path().display())
    );
    let r = post_octet(&c, &[("path", &p(&target.join("below")))], "x").await;
    assert_eq!(r.0, StatusCode::INTERNAL_SERVER_ERROR);
    let r = post_octet(&c, &[("path", "/x"), ("username", "no-such-user-x")], "x").await;
    assert_eq!(r.0, StatusCode::UNAUTHORIZED);
    assert!(
        error_of(&r)
            .1
            .starts_with("error looking up user 'no-such-user-x'")
    );
    assert_eq!(names(dir.path()), ["new"], "no temp files anywhere");
    assert_eq!(names(&dir.path().join("new/dirs")), ["file.txt"]);
}

#[tokio::test]
async fn metadata_headers() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("m.txt");
    let r = post(
        &c,
        &[("path", &p(&target))],
        &[
            ("content-type", "application/octet-stream"),
            ("x-metadata-Owner", "alice"),
            ("X-METADATA-kind", "report v1"),
        ],
        "x",
    )
    .await;
    let v = json(&r);
    assert_eq!(
        v[0]["metadata"],
        serde_json::json!({ "owner": "alice", "kind": "report v1" })
    );
    assert_eq!(
        xattr::get(&target, "user.e2b.owner")
            .expect("xattr")
            .as_deref(),
        Some(&b"alice"[..])
    );
    // Stat shows it.
    let (_, _, body) = c
        .fetch(
            Method::POST,
            "/filesystem.Filesystem/Stat",
            &[("content-type", "application/json")],
            serde_json::to_vec(&serde_json::json!({ "path": p(&target) })).expect("json"),
        )
        .await;
    let st: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(st["entry"]["metadata"]["kind"], "report v1");
    // A new upload replaces the set; without headers it is cleared.
    let r = post(
        &c,
        &[("path", &p(&target))],
        &[
            ("content-type", "application/octet-stream"),
            ("x-metadata-kind", "v2"),
        ],
        "y",
    )
    .await;
    assert_eq!(json(&r)[0]["metadata"], serde_json::json!({ "kind": "v2" }));
    let r = post_octet(&c, &[("path", &p(&target))], "z").await;
    assert!(json(&r)[0].get("metadata").is_none());
    assert_eq!(xattr::get(&target, "user.e2b.kind").expect("xattr"), None);

    // Invalid metadata: 400, nothing written.
    let long_key = format!("x-metadata-{}", "k".repeat(247));
    let big_value = "v".repeat(4100);
    for (name, value) in [
        (long_key.as_str(), "v"),
        ("x-metadata-big", big_value.as_str()),
    ] {
        let r = post(
            &c,
            &[("path", &p(&target))],
            &[("content-type", "application/octet-stream"), (name, value)],
            "bad",
        )
        .await;
        assert_eq!(r.0, StatusCode::BAD_REQUEST);
        assert!(
            error_of(&r).1.starts_with("invalid metadata: "),
            "{:?}",
            r.2
        );
    }
    // A non-ASCII value (raw bytes in the header).
    let mut req = http::Request::builder()
        .method(Method::POST)
        .uri(format!(
            "{}{}",
            g.base(),
            files_url(&[("path", &p(&target))])
        ))
        .header("content-type", "application/octet-stream");
    req = req.header(
        "x-metadata-name",
        http::HeaderValue::from_bytes("é".as_bytes()).expect("value"),
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    let resp = client
        .request(
            req.body(http_body_util::Full::new(Bytes::from("bad")))
                .expect("req"),
        )
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(fs::read(&target).expect("read"), b"z", "untouched");
}

#[tokio::test]
async fn multipart_uploads() {
    let (user, uid, _, home) = ensure_test_user();
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let rel = format!("mp-{}", std::process::id());
    let abs = dir.path().join("abs.bin");
    let big = noise(3 << 20, 3);
    let abs_s = p(&abs);
    let rel_a = format!("{rel}/a.txt");
    let rel_b = format!("{rel}/sub/b.txt");
    let body = multipart_body(
        "BoUnDaRy123",
        &[
            ("file", Some(&rel_a), b"alpha"),
            ("note", None, b"ignored field"),
            ("file", Some(&rel_b), b"beta"),
            ("file", Some(&abs_s), &big),
        ],
    );
    let ct = "multipart/form-data; boundary=BoUnDaRy123";
    let r = post(&c, &[("username", user)], &[("content-type", ct)], body).await;
    let v = json(&r);
    let paths: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["path"].as_str().expect("path"))
        .collect();
    assert_eq!(
        paths,
        [p(&home.join(&rel_a)), p(&home.join(&rel_b)), abs_s.clone()],
        "in order, relative names under the user's home"
    );
    assert_eq!(v[1]["name"], "b.txt");
    assert_eq!(fs::read(home.join(&rel_a)).expect("a"), b"alpha");
    assert_eq!(sha(&fs::read(&abs).expect("abs")), sha(&big));
    assert_eq!(fs::metadata(home.join(&rel_b)).expect("b").uid(), uid);

    // `path` in the query: the single part goes there whatever its filename.
    let q_target = dir.path().join("by-query.txt");
    let body = multipart_body("b0", &[("file", Some("ignored-name.txt"), b"q")]);
    let r = post(
        &c,
        &[("path", &p(&q_target))],
        &[("content-type", "multipart/form-data; boundary=b0")],
        body,
    )
    .await;
    assert_eq!(json(&r)[0]["path"], p(&q_target));
    assert_eq!(fs::read(&q_target).expect("read"), b"q");

    // Two parts resolving to the same path: 400; the first stays written.
    let dup = dir.path().join("dup.txt");
    let dup_s = p(&dup);
    let dup_alias = format!("{}/./dup.txt", dir.path().display());
    let body = multipart_body(
        "b1",
        &[
            ("file", Some(&dup_s), b"first"),
            ("file", Some(&dup_alias), b"second"),
        ],
    );
    let r = post(
        &c,
        &[],
        &[("content-type", "multipart/form-data; boundary=b1")],
        body,
    )
    .await;
    assert_eq!(r.0, StatusCode::BAD_REQUEST);
    assert!(error_of(&r).1.contains("already wrote"), "{:?}", r.2);
    assert_eq!(fs::read(&dup).expect("read"), b"first");

    // No filename and no path; no file part; malformed bodies.
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (
            "multipart/form-data; boundary=b2".into(),
            multipart_body("b2", &[("file", None, b"x")]),
            "has no filename",
        ),
        (
            "multipart/form-data; boundary=b3".into(),
            multipart_body("b3", &[("other", Some("x.txt"), b"x")]),
            "has no file",
        ),
        (
            "multipart/form-data; boundary=b4".into(),
            format!("--b4\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\r\ntruncated", p(&dir.path().join("trunc.txt"))).into_bytes(),
            "malformed multipart body",
        ),
        (
            "multipart/form-data; boundary=other".into(),
            multipart_body("b5", &[("file", Some("x"), b"x")]),
            "malformed multipart body",
        ),
        (
            "multipart/form-data".into(),
            multipart_body("b6", &[("file", Some("x"), b"x")]),
            "no boundary",
        ),
    ];
    for (ct, body, want) in cases {
        let r = post(&c, &[], &[("content-type", &ct)], body).await;
        assert_eq!(r.0, StatusCode::BAD_REQUEST, "{ct}");
        let (_, msg) = error_of(&r);
        assert!(msg.contains(want), "{ct}: {msg}");
    }
    assert!(
        !dir.path().join("trunc.txt").exists(),
        "incomplete part not published"
    );
    wait_names(dir.path(), &["abs.bin", "by-query.txt", "dup.txt"]).await;
    fs::remove_dir_all(home.join(&rel)).expect("cleanup");
}

#[tokio::test]
async fn multi_megabyte_round_trip_with_checksums() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("big.bin");
    let data = noise(24 << 20, 11);
    let sum = sha(&data);
    let r = post_octet(&c, &[("path", &p(&target))], data.clone()).await;
    json(&r);
    assert_eq!(sha(&fs::read(&target).expect("read")), sum);

    let r = get(&c, &[("path", &p(&target))], &[]).await;
    assert_eq!(r.1["content-length"], (24u64 << 20).to_string().as_str());
    assert_eq!(sha(&r.2), sum, "identity");
    let r = get(&c, &[("path", &p(&target))], &[("accept-encoding", "gzip")]).await;
    assert_eq!(r.1["content-encoding"], "gzip");
    assert_eq!(sha(&gunzip(&r.2)), sum, "gzip");
    let r = get(
        &c,
        &[("path", &p(&target))],
        &[("range", "bytes=5000000-5999999")],
    )
    .await;
    assert_eq!(&r.2[..], &data[5_000_000..6_000_000]);

    // The same through multipart with a gzip-encoded body.
    let mp = multipart_body("zz", &[("file", Some(&p(&target)), &data[..])]);
    let r = post(
        &c,
        &[],
        &[
            ("content-type", "multipart/form-data; boundary=zz"),
            ("content-encoding", "gzip"),
        ],
        gzip(&mp),
    )
    .await;
    json(&r);
    assert_eq!(sha(&fs::read(&target).expect("read")), sum);
    assert_eq!(names(dir.path()), ["big.bin"]);
}

/// Sends `head` (request line + headers) and `body_part` over a raw connection.
fn raw_send(port: u16, head: &str, body_part: &[u8]) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(head.as_bytes()).expect("head");
    s.write_all(body_part).expect("body");
    s.flush().expect("flush");
    s
}

#[tokio::test]
async fn a_cut_upload_leaves_the_old_file_and_no_temp_file() {
    let g = Guestd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("keep.txt");
    fs::write(&target, b"old content").expect("write");
    let url = files_url(&[("path", &p(&target))]);

    // Octet-stream: 10 MB announced, 2 MB sent, then the connection is closed.
    let head = format!(
        "POST {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: 10000000\r\n\r\n"
    );
    let s = raw_send(g.port, &head, &noise(2 << 20, 5));
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    wait_names(dir.path(), &["keep.txt"]).await;
    assert_eq!(fs::read(&target).expect("read"), b"old content");

    // Multipart: cut inside the part.
    let mut body = format!(
        "--cut\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\r\n",
        p(&target)
    )
    .into_bytes();
    body.extend_from_slice(&noise(1 << 20, 6));
    let head = "POST /files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; \
                boundary=cut\r\nContent-Length: 50000000\r\n\r\n";
    let s = raw_send(g.port, head, &body);
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    wait_names(dir.path(), &["keep.txt"]).await;
    assert_eq!(fs::read(&target).expect("read"), b"old content");
}

#[tokio::test]
async fn a_stalled_upload_times_out() {
    let g = Guestd::start_with(&[
        "--default-user",
        "root",
        "--no-code-interpreter",
        "--upload-idle-timeout-secs",
        "1",
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("keep.txt");
    fs::write(&target, b"old").expect("write");
    let url = files_url(&[("path", &p(&target))]);
    let head = format!(
        "POST {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: 1000\r\n\r\n"
    );
    let mut s = raw_send(g.port, &head, b"partial");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&resp).contains("stalled") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            Err(e) => panic!("no response: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("no data received for 1 s"), "{text}");
    wait_names(dir.path(), &["keep.txt"]).await;
    assert_eq!(fs::read(&target).expect("read"), b"old");
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(opts: &str, flags: nix::mount::MsFlags) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        match nix::mount::mount(Some("tmpfs"), dir.path(), Some("tmpfs"), flags, Some(opts)) {
            Ok(()) => Some(Tmpfs(dir)),
            // tests/run.sh runs as root: a tmpfs that cannot be mounted is a failure,
            // never a skip.
            Err(e) => panic!("cannot mount a tmpfs for the test ({e}); run as root"),
        }
    }

    fn path(&self) -> PathBuf {
        self.0.path().to_path_buf()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test]
async fn full_disk_read_only_mounts_and_proc() {
    let g = Guestd::start();
    let c = g.client();
    let Some(small) = Tmpfs::mount("size=256k,mode=755", nix::mount::MsFlags::empty()) else {
        return;
    };
    let target = small.path().join("f.bin");
    fs::write(&target, b"old").expect("write");
    let r = post_octet(&c, &[("path", &p(&target))], noise(1 << 20, 9)).await;
    assert_eq!(r.0, StatusCode::INSUFFICIENT_STORAGE);
    assert!(
        error_of(&r)
            .1
            .starts_with("not enough disk space available"),
        "{:?}",
        r.2
    );
    assert_eq!(fs::read(&target).expect("read"), b"old");
    wait_names(&small.path(), &["f.bin"]).await;

    let Some(inodes) = Tmpfs::mount("size=1m,nr_inodes=3,mode=755", nix::mount::MsFlags::empty())
    else {
        return;
    };
    let mut last = None;
    for i in 0..5 {
        let r = post_octet(
            &c,
            &[("path", &p(&inodes.path().join(format!("f{i}"))))],
            "x",
        )
        .await;
        if r.0 != StatusCode::OK {
            last = Some(r);
            break;
        }
    }
    let r = last.expect("the inode limit is reached");
    assert_eq!(r.0, StatusCode::INSUFFICIENT_STORAGE);
    assert!(
        error_of(&r).1.starts_with("not enough inodes available"),
        "{:?}",
        r.2
    );

    let Some(ro) = Tmpfs::mount("size=64k", nix::mount::MsFlags::MS_RDONLY) else {
        return;
    };
    let r = post_octet(&c, &[("path", &p(&ro.path().join("x")))], "x").await;
    assert_eq!(r.0, StatusCode::FORBIDDEN);
    assert!(
        error_of(&r).1.contains("Read-only file system"),
        "{:?}",
        r.2
    );
    let r = post_octet(&c, &[("path", "/proc/self/guestd-upload")], "x").await;
    assert!(r.0.is_server_error() || r.0.is_client_error());
    assert!(
        error_of(&r).1.contains("/proc/self/guestd-upload"),
        "{:?}",
        r.2
    );
}

#[tokio::test]
async fn uploads_show_the_real_name_to_watchers() {
    use guestd::proto::filesystem::{self as pb, watch_dir_response::Event};
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("seen.txt");
    let mut s = c
        .server_stream(
            common::Codec::Json,
            "/filesystem.Filesystem/WatchDir",
            &pb::WatchDirRequest {
                path: p(dir.path()),
                ..Default::default()
            },
            &[],
        )
        .await;
    assert!(
        s.next_message::<pb::WatchDirResponse>().await.is_ok(),
        "start"
    );
    json(&post_octet(&c, &[("path", &p(&target))], "data").await);
    let mut seen = Vec::new();
    loop {
        let m = s
            .next_message::<pb::WatchDirResponse>()
            .await
            .expect("event");
        if let Some(Event::Filesystem(e)) = m.event {
            let done = e.name == "seen.txt" && e.r#type == pb::EventType::Write as i32;
            seen.push((e.name, e.r#type));
            if done {
                break;
            }
        }
    }
    assert!(
        seen.iter().all(|(n, _)| n == "seen.txt"),
        "no temp names: {seen:?}"
    );
    assert!(seen.contains(&("seen.txt".into(), pb::EventType::Create as i32)));
    assert!(seen.contains(&("seen.txt".into(), pb::EventType::Chmod as i32)));
}

// ---------------------------------------------------------------------------------
// Compose

async fn compose(c: &Client, body: serde_json::Value) -> Fetched {
    c.fetch(
        Method::POST,
        "/files/compose",
        &[("content-type", "application/json")],
        serde_json::to_vec(&body).expect("json"),
    )
    .await
}

#[tokio::test]
async fn compose_rules() {
    let (user, uid, _, _) = ensure_test_user();
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let parts: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("part{i}")))
        .collect();
    for (i, part) in parts.iter().enumerate() {
        fs::write(part, format!("<{i}>")).expect("write");
    }
    let dest = dir.path().join("out/joined.txt");
    let srcs: Vec<String> = parts.iter().map(|x| p(x)).collect();
    let r = compose(
        &c,
        serde_json::json!({ "source_paths": srcs, "destination": p(&dest), "username": user }),
    )
    .await;
    assert_eq!(
        json(&r),
        serde_json::json!({ "path": p(&dest), "name": "joined.txt", "type": "file" })
    );
    assert_eq!(fs::read(&dest).expect("read"), b"<0><1><2>");
    assert!(parts.iter().all(|x| !x.exists()), "sources deleted");
    assert_eq!(fs::metadata(&dest).expect("dest").uid(), uid);

    let missing = dir.path().join("missing");
    let r = compose(
        &c,
        serde_json::json!({ "source_paths": [p(&missing)], "destination": p(&dest) }),
    )
    .await;
    assert_eq!(r.0, StatusCode::NOT_FOUND);
    assert_eq!(
        error_of(&r).1,
        format!("source file not found: {}", missing.display())
    );
    for body in [
        serde_json::json!({ "source_paths": [], "destination": p(&dest) }),
        serde_json::json!({ "source_paths": [p(&dest)] }),
        serde_json::json!({ "source_paths": [p(&dest)], "destination": p(&dest) }),
        serde_json::json!({ "source_paths": [p(dir.path())], "destination": p(&dest) }),
    ] {
        let r = compose(&c, body.clone()).await;
        assert_eq!(r.0, StatusCode::BAD_REQUEST, "{body}");
    }
    let (status, _, _) = c
        .fetch(
            Method::POST,
            "/files/compose",
            &[("content-type", "application/json")],
            "{not json",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let r = compose(
        &c,
        serde_json::json!({ "source_paths": [p(&dest)], "destination": p(&dest.with_extension("x")), "username": "no-such-user-x" }),
    )
    .await;
    assert_eq!(r.0, StatusCode::UNAUTHORIZED);
    assert_eq!(fs::read(&dest).expect("read"), b"<0><1><2>", "untouched");
}
