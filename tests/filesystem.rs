//! `filesystem.Filesystem` over the real port, with Connect JSON and Connect binary proto.

#![allow(clippy::disallowed_methods)] // the tests run `unshare`, `useradd` directly

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Client, Codec, ConnectError, Guestd, RawStream, basic_auth, ensure_test_user};
use guestd::proto::filesystem::{self as pb, watch_dir_response::Event as WatchEvent};
use http::{Method, StatusCode};

const CODECS: [Codec; 2] = [Codec::Json, Codec::Proto];

fn rpc(method: &str) -> String {
    format!("/filesystem.Filesystem/{method}")
}

async fn call<Req: guestd::transport::rpc::RpcMessage, Res: guestd::transport::rpc::RpcMessage>(
    c: &Client,
    codec: Codec,
    method: &str,
    req: &Req,
    headers: &[(&str, &str)],
) -> Result<Res, ConnectError> {
    c.unary(codec, &rpc(method), req, headers).await
}

async fn stat(c: &Client, codec: Codec, path: &str) -> Result<pb::EntryInfo, ConnectError> {
    let r: pb::StatResponse = call(
        c,
        codec,
        "Stat",
        &pb::StatRequest { path: path.into() },
        &[],
    )
    .await?;
    Ok(r.entry.expect("entry"))
}

/// A Connect JSON call returning the raw response JSON.
async fn raw_json(
    c: &Client,
    method: &str,
    body: serde_json::Value,
) -> (StatusCode, serde_json::Value) {
    let (status, _, b) = c
        .fetch(
            Method::POST,
            &rpc(method),
            &[("content-type", "application/json")],
            serde_json::to_vec(&body).expect("json"),
        )
        .await;
    (status, serde_json::from_slice(&b).expect("response JSON"))
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn assert_err(r: Result<impl std::fmt::Debug, ConnectError>, code: &str, status: u16) -> String {
    let e = r.expect_err("expected an error");
    assert_eq!(e.code, code, "{e:?}");
    assert_eq!(e.http_status.as_u16(), status, "{e:?}");
    e.message
}

#[tokio::test]
async fn stat_reports_entry_info_as_specified() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = dir.path();
    let f = b.join("f.txt");
    fs::write(&f, b"hello").expect("write");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
    xattr::set(&f, "user.e2b.owner", b"alice").expect("xattr");
    xattr::set(&f, "user.other", b"ignored").expect("xattr");
    fs::create_dir(b.join("d")).expect("mkdir");
    fs::set_permissions(b.join("d"), fs::Permissions::from_mode(0o755)).expect("chmod");
    symlink("f.txt", b.join("l")).expect("symlink");
    symlink("nowhere", b.join("dangling")).expect("symlink");

    // The raw JSON: canonical proto3 field names and encodings.
    let (status, v) = raw_json(&c, "Stat", serde_json::json!({ "path": p(&f) })).await;
    assert_eq!(status, StatusCode::OK);
    let e = &v["entry"];
    assert_eq!(e["name"], "f.txt");
    assert_eq!(e["type"], "FILE_TYPE_FILE");
    assert_eq!(e["path"], p(&f));
    assert_eq!(e["size"], "5", "int64 as a JSON string");
    assert_eq!(e["mode"], 0o644);
    assert_eq!(e["permissions"], "-rw-r--r--");
    assert_eq!(e["owner"], "root");
    assert_eq!(e["group"], "root");
    let mtime = e["modifiedTime"].as_str().expect("modifiedTime");
    assert!(mtime.ends_with('Z') && mtime.contains('T'), "{mtime}");
    assert_eq!(e["metadata"], serde_json::json!({ "owner": "alice" }));
    assert!(e.get("symlinkTarget").is_none(), "only for symlinks: {e}");
    assert!(e.get("isSymlink").is_none(), "false is omitted: {e}");

    let (_, v) = raw_json(&c, "Stat", serde_json::json!({ "path": p(&b.join("l")) })).await;
    let e = &v["entry"];
    assert_eq!(
        e["type"], "FILE_TYPE_FILE",
        "a symlink has its target's type"
    );
    assert_eq!(e["isSymlink"], true);
    assert_eq!(e["symlinkTarget"], p(&fs::canonicalize(&f).expect("canon")));
    assert_eq!(e["permissions"], "Lrwxrwxrwx");
    assert_eq!(e["mode"], 0o644, "the target's permission bits");
    assert_eq!(e["size"], "5", "length of the link text");

    for codec in CODECS {
        let d = stat(&c, codec, &p(&b.join("d"))).await.expect("dir");
        assert_eq!(d.r#type, pb::FileType::Directory as i32);
        assert_eq!(d.permissions, "drwxr-xr-x");
        assert_eq!(d.mode, 0o755);
        let dang = stat(&c, codec, &p(&b.join("dangling")))
            .await
            .expect("dangling");
        assert_eq!(dang.r#type, pb::FileType::Unspecified as i32);
        assert!(dang.is_symlink);
        assert_eq!(dang.mode, 0);
        let tmp = stat(&c, codec, "/tmp").await.expect("/tmp");
        assert_eq!(tmp.permissions, "dtrwxrwxrwx");
        let root = stat(&c, codec, "/").await.expect("/");
        assert_eq!(root.name, "/");
        let f2 = stat(&c, codec, &p(&f)).await.expect("file");
        assert_eq!(f2.metadata.get("owner").map(String::as_str), Some("alice"));
        assert!(f2.modified_time.is_some());

        let missing = b.join("missing");
        let msg = assert_err(stat(&c, codec, &p(&missing)).await, "not_found", 404);
        assert_eq!(msg, format!("file not found: {}", missing.display()));
    }
}

#[tokio::test]
async fn paths_resolve_for_the_caller_and_unknown_users_are_refused() {
    let (user, uid, gid, home) = ensure_test_user();
    let g = Guestd::start();
    let c = g.client();
    let auth = basic_auth(user);
    let name = format!("rel-{}", std::process::id());
    for codec in CODECS {
        let r: pb::MakeDirResponse = call(
            &c,
            codec,
            "MakeDir",
            &pb::MakeDirRequest {
                path: format!("{name}/{codec:?}/sub"),
            },
            &[("authorization", &auth)],
        )
        .await
        .expect("mkdir relative");
        let e = r.entry.expect("entry");
        let expected = home.join(&name).join(format!("{codec:?}")).join("sub");
        assert_eq!(e.path, p(&expected), "relative to the user's home");
        assert_eq!(e.owner, user);
        let m = fs::metadata(&expected).expect("created");
        assert_eq!((m.uid(), m.gid()), (uid, gid), "chowned to the user");
        assert_eq!(m.mode() & 0o7777, 0o755);
        // The existing home is untouched.
        assert_eq!(fs::metadata(&home).expect("home").uid(), uid);

        let r: pb::StatResponse = call(
            &c,
            codec,
            "Stat",
            &pb::StatRequest {
                path: format!("~/{name}"),
            },
            &[("authorization", &auth)],
        )
        .await
        .expect("tilde");
        assert_eq!(r.entry.expect("entry").path, p(&home.join(&name)));

        let msg = assert_err(
            call::<_, pb::StatResponse>(
                &c,
                codec,
                "Stat",
                &pb::StatRequest {
                    path: "~root/x".into(),
                },
                &[],
            )
            .await,
            "invalid_argument",
            400,
        );
        assert!(
            msg.contains("cannot expand user-specific home dir"),
            "{msg}"
        );

        let msg = assert_err(
            call::<_, pb::StatResponse>(
                &c,
                codec,
                "Stat",
                &pb::StatRequest { path: "/".into() },
                &[("authorization", &basic_auth("no-such-user-x"))],
            )
            .await,
            "unauthenticated",
            401,
        );
        assert_eq!(msg, "invalid username: 'no-such-user-x'");
    }
    // An empty path is the home of the default user (root here).
    let e = stat(&c, Codec::Json, "").await.expect("empty path");
    assert_eq!(e.path, "/root");
    fs::remove_dir_all(home.join(&name)).expect("cleanup");
}

#[tokio::test]
async fn make_dir_move_remove_rules() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = dir.path();
    for codec in CODECS {
        let base = b.join(format!("{codec:?}"));
        let target = base.join("a/b");
        let r: pb::MakeDirResponse = call(
            &c,
            codec,
            "MakeDir",
            &pb::MakeDirRequest { path: p(&target) },
            &[],
        )
        .await
        .expect("mkdir");
        assert_eq!(r.entry.expect("entry").permissions, "drwxr-xr-x");
        let msg = assert_err(
            call::<_, pb::MakeDirResponse>(
                &c,
                codec,
                "MakeDir",
                &pb::MakeDirRequest { path: p(&target) },
                &[],
            )
            .await,
            "already_exists",
            409,
        );
        assert!(msg.contains(&p(&target)), "{msg}");
        let file = base.join("file");
        fs::write(&file, b"x").expect("write");
        assert_err(
            call::<_, pb::MakeDirResponse>(
                &c,
                codec,
                "MakeDir",
                &pb::MakeDirRequest { path: p(&file) },
                &[],
            )
            .await,
            "invalid_argument",
            400,
        );
        let msg = assert_err(
            call::<_, pb::MakeDirResponse>(
                &c,
                codec,
                "MakeDir",
                &pb::MakeDirRequest {
                    path: p(&file.join("sub")),
                },
                &[],
            )
            .await,
            "internal",
            500,
        );
        assert!(msg.contains("Not a directory"), "{msg}");

        // Move: parents created, replaces an existing file, missing source → not_found.
        let dest = base.join("x/y/moved");
        let r: pb::MoveResponse = call(
            &c,
            codec,
            "Move",
            &pb::MoveRequest {
                source: p(&file),
                destination: p(&dest),
            },
            &[],
        )
        .await
        .expect("move");
        let e = r.entry.expect("entry");
        assert_eq!((e.name.as_str(), e.path.clone()), ("moved", p(&dest)));
        assert!(!file.exists() && dest.exists());
        fs::write(&file, b"new").expect("write");
        let _: pb::MoveResponse = call(
            &c,
            codec,
            "Move",
            &pb::MoveRequest {
                source: p(&file),
                destination: p(&dest),
            },
            &[],
        )
        .await
        .expect("replace");
        assert_eq!(fs::read(&dest).expect("read"), b"new");
        let msg = assert_err(
            call::<_, pb::MoveResponse>(
                &c,
                codec,
                "Move",
                &pb::MoveRequest {
                    source: p(&file),
                    destination: p(&dest),
                },
                &[],
            )
            .await,
            "not_found",
            404,
        );
        assert_eq!(msg, format!("source file not found: {}", file.display()));

        // Remove: recursive, and success on a missing path.
        let _: pb::RemoveResponse = call(
            &c,
            codec,
            "Remove",
            &pb::RemoveRequest { path: p(&base) },
            &[],
        )
        .await
        .expect("rm -rf");
        assert!(!base.exists());
        let _: pb::RemoveResponse = call(
            &c,
            codec,
            "Remove",
            &pb::RemoveRequest { path: p(&base) },
            &[],
        )
        .await
        .expect("missing is fine");
    }
}

#[tokio::test]
async fn list_dir_order_depth_and_errors() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = dir.path();
    for d in ["d/sub/deeper", "a"] {
        fs::create_dir_all(b.join(d)).expect("mkdir");
    }
    for f in [
        "f.txt",
        "B.txt",
        "d/z.txt",
        "d/_x",
        "d/sub/file",
        "d/sub/deeper/leaf",
    ] {
        fs::write(b.join(f), b"x").expect("write");
    }
    symlink(b.join("d"), b.join("link_to_d")).expect("symlink");
    symlink(b.join("loop2"), b.join("loop1")).expect("symlink");
    symlink(b.join("loop1"), b.join("loop2")).expect("symlink");
    let rel = |entries: &[pb::EntryInfo]| -> Vec<String> {
        entries
            .iter()
            .map(|e| {
                Path::new(&e.path)
                    .strip_prefix(b)
                    .expect("under base")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    };
    for codec in CODECS {
        let list = |depth: u32, path: PathBuf| {
            let c = c.clone();
            async move {
                call::<_, pb::ListDirResponse>(
                    &c,
                    codec,
                    "ListDir",
                    &pb::ListDirRequest {
                        path: p(&path),
                        depth,
                    },
                    &[],
                )
                .await
            }
        };
        let l = list(0, b.to_path_buf()).await.expect("depth 0 = 1");
        assert_eq!(
            rel(&l.entries),
            ["B.txt", "a", "d", "f.txt", "link_to_d", "loop1", "loop2"]
        );
        let l = list(9, b.to_path_buf()).await.expect("deep");
        assert_eq!(
            rel(&l.entries),
            [
                "B.txt",
                "a",
                "d",
                "d/_x",
                "d/sub",
                "d/sub/deeper",
                "d/sub/deeper/leaf",
                "d/sub/file",
                "d/z.txt",
                "f.txt",
                "link_to_d",
                "loop1",
                "loop2"
            ]
        );
        let l = list(2, b.to_path_buf()).await.expect("depth 2");
        assert_eq!(rel(&l.entries).len(), 10);
        // Through a symlinked directory: paths stay under the requested path.
        let l = list(1, b.join("link_to_d")).await.expect("via link");
        assert_eq!(
            l.entries.iter().map(|e| e.path.clone()).collect::<Vec<_>>(),
            vec![
                p(&b.join("link_to_d/_x")),
                p(&b.join("link_to_d/sub")),
                p(&b.join("link_to_d/z.txt"))
            ]
        );
        let msg = assert_err(list(1, b.join("f.txt")).await, "invalid_argument", 400);
        assert_eq!(
            msg,
            format!("path is not a directory: {}", b.join("f.txt").display())
        );
        assert_err(list(1, b.join("missing")).await, "not_found", 404);
        assert_err(list(1, b.join("loop1")).await, "failed_precondition", 400);
    }
}

#[tokio::test]
async fn read_only_mounts_and_pseudo_filesystems_are_clear_errors() {
    // All I/O runs as root (contract §2.3): what is "not writable" is what the kernel
    // refuses even to root. A read-only mount → permission_denied naming the reason;
    // a pseudo filesystem that cannot hold the entry → internal with the kernel's reason.
    let dir = tempfile::tempdir().expect("tempdir");
    if nix::mount::mount(
        Some("tmpfs"),
        dir.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::MS_RDONLY,
        Some("size=64k"),
    )
    .is_err()
    {
        // tests/run.sh runs as root: never a silent skip.
        panic!("cannot mount a tmpfs for the test; run as root");
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _u = Unmount(dir.path().to_path_buf());
    let g = Guestd::start();
    let c = g.client();
    for codec in CODECS {
        let msg = assert_err(
            call::<_, pb::MakeDirResponse>(
                &c,
                codec,
                "MakeDir",
                &pb::MakeDirRequest {
                    path: p(&dir.path().join("x")),
                },
                &[],
            )
            .await,
            "permission_denied",
            403,
        );
        assert!(msg.contains("Read-only file system"), "{msg}");
        let msg = assert_err(
            call::<_, pb::MakeDirResponse>(
                &c,
                codec,
                "MakeDir",
                &pb::MakeDirRequest {
                    path: "/proc/guestd-test-dir".into(),
                },
                &[],
            )
            .await,
            "internal",
            500,
        );
        assert!(msg.contains("/proc/guestd-test-dir"), "{msg}");
        let msg = assert_err(
            call::<_, pb::RemoveResponse>(
                &c,
                codec,
                "Remove",
                &pb::RemoveRequest {
                    path: "/proc/self/status".into(),
                },
                &[],
            )
            .await,
            "permission_denied",
            403,
        );
        assert!(msg.contains("/proc/self/status"), "{msg}");
    }
}

// ---------------------------------------------------------------------------------
// Watching

async fn watch(
    c: &Client,
    codec: Codec,
    req: &pb::WatchDirRequest,
    headers: &[(&str, &str)],
) -> RawStream {
    let s = c.server_stream(codec, &rpc("WatchDir"), req, headers).await;
    assert_eq!(s.status, StatusCode::OK);
    assert_eq!(s.headers["content-type"], codec.stream_ct());
    s
}

fn watch_req(path: &Path, recursive: bool, include_entry: bool) -> pb::WatchDirRequest {
    pb::WatchDirRequest {
        path: p(path),
        recursive,
        include_entry,
        allow_network_mounts: false,
    }
}

/// Filesystem events until `until` matches one (inclusive); keepalives are counted.
async fn events_until(
    s: &mut RawStream,
    until: impl Fn(&pb::FilesystemEvent) -> bool,
) -> (Vec<pb::FilesystemEvent>, usize) {
    let mut out = Vec::new();
    let mut keepalives = 0;
    loop {
        match s.next_message::<pb::WatchDirResponse>().await {
            Ok(m) => match m.event {
                Some(WatchEvent::Filesystem(ev)) => {
                    let done = until(&ev);
                    out.push(ev);
                    if done {
                        return (out, keepalives);
                    }
                }
                Some(WatchEvent::Keepalive(_)) => keepalives += 1,
                Some(WatchEvent::Start(_)) => panic!("second start"),
                None => panic!("empty event"),
            },
            Err(end) => panic!("stream ended: {end} after {out:?}"),
        }
    }
}

fn is(ev: &pb::FilesystemEvent, name: &str, t: pb::EventType) -> bool {
    ev.name == name && ev.r#type == t as i32
}

#[tokio::test]
async fn watch_dir_streams_events_after_start() {
    let g = Guestd::start();
    let c = g.client();
    for codec in CODECS {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = dir.path().to_path_buf();
        fs::create_dir(b.join("old")).expect("mkdir");
        let mut s = watch(&c, codec, &watch_req(&b, true, true), &[]).await;
        match s.next_message::<pb::WatchDirResponse>().await {
            Ok(m) => assert!(matches!(m.event, Some(WatchEvent::Start(_))), "{m:?}"),
            Err(e) => panic!("no start: {e}"),
        }
        // Armed before `start`: an immediate write is seen.
        fs::write(b.join("a.txt"), b"1").expect("write");
        let (evs, _) = events_until(&mut s, |e| is(e, "a.txt", pb::EventType::Write)).await;
        let create = evs
            .iter()
            .find(|e| is(e, "a.txt", pb::EventType::Create))
            .expect("create first");
        let entry = create.entry.as_ref().expect("include_entry");
        assert_eq!(entry.path, p(&b.join("a.txt")), "absolute path");
        // Recursive: existing and new subdirectories.
        fs::write(b.join("old/x"), b"1").expect("write");
        events_until(&mut s, |e| is(e, "old/x", pb::EventType::Write)).await;
        fs::create_dir_all(b.join("new/inner")).expect("mkdir");
        fs::write(b.join("new/inner/y"), b"1").expect("write");
        events_until(&mut s, |e| is(e, "new/inner/y", pb::EventType::Write)).await;
        fs::rename(b.join("a.txt"), b.join("b.txt")).expect("mv");
        let (evs, _) = events_until(&mut s, |e| is(e, "b.txt", pb::EventType::Create)).await;
        let renamed = evs
            .iter()
            .find(|e| is(e, "a.txt", pb::EventType::Rename))
            .expect("rename of the source");
        assert!(renamed.entry.is_none(), "never an entry for RENAME");
        fs::remove_file(b.join("b.txt")).expect("rm");
        events_until(&mut s, |e| is(e, "b.txt", pb::EventType::Remove)).await;
    }
}

#[tokio::test]
async fn watch_dir_keepalives_and_deadline() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    // Raw JSON: the watch keepalive is `{"keepalive":{}}`.
    let mut s = watch(
        &c,
        Codec::Json,
        &watch_req(dir.path(), false, false),
        &[
            ("keepalive-ping-interval", "1"),
            ("connect-timeout-ms", "2600"),
        ],
    )
    .await;
    let mut frames = Vec::new();
    let end = loop {
        match s.next_frame_within(Duration::from_secs(10)).await {
            Some(common::Frame::Message(m)) => {
                frames.push(serde_json::from_slice::<serde_json::Value>(&m).expect("json"))
            }
            Some(common::Frame::End(v)) => break v,
            None => panic!("no end-of-stream"),
        }
    };
    assert_eq!(frames[0], serde_json::json!({ "start": {} }));
    assert!(frames.len() >= 3, "keepalives after silence: {frames:?}");
    assert!(
        frames[1..]
            .iter()
            .all(|f| *f == serde_json::json!({ "keepalive": {} })),
        "{frames:?}"
    );
    assert_eq!(end["error"]["code"], "deadline_exceeded", "{end}");
}

#[tokio::test]
async fn watch_dir_validation_errors_end_the_stream() {
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("file");
    fs::write(&f, b"").expect("write");
    for codec in CODECS {
        let missing = dir.path().join("missing");
        let mut s = watch(&c, codec, &watch_req(&missing, false, false), &[]).await;
        let end = s
            .next_message::<pb::WatchDirResponse>()
            .await
            .expect_err("end");
        assert_eq!(end["error"]["code"], "not_found", "{end}");
        assert_eq!(
            end["error"]["message"],
            format!("path {} not found", missing.display())
        );
        let mut s = watch(&c, codec, &watch_req(&f, false, false), &[]).await;
        let end = s
            .next_message::<pb::WatchDirResponse>()
            .await
            .expect_err("end");
        assert_eq!(end["error"]["code"], "invalid_argument", "{end}");
        let mut s = watch(
            &c,
            codec,
            &watch_req(dir.path(), false, false),
            &[("authorization", &basic_auth("no-such-user-x"))],
        )
        .await;
        let end = s
            .next_message::<pb::WatchDirResponse>()
            .await
            .expect_err("end");
        assert_eq!(end["error"]["code"], "unauthenticated", "{end}");
    }
}

/// A reader that does not read: the kernel queue overflows, and the stream must end with
/// an error saying so after the events that made it (never a silent stop).
#[tokio::test]
async fn watch_dir_queue_overflow_is_an_error() {
    let limit: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16_384);
    let g = Guestd::start();
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = watch(&c, Codec::Json, &watch_req(dir.path(), false, false), &[]).await;
    assert!(
        s.next_message::<pb::WatchDirResponse>().await.is_ok(),
        "start"
    );
    let root = dir.path().to_path_buf();
    // One IN_MODIFY per write(2), alternating between two files so the kernel cannot
    // merge them: more events than the kernel queue, the agent's buffer and the socket
    // buffers hold together.
    let n = limit + 400_000;
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt as _;
        let a = fs::File::create(root.join("a")).expect("a");
        let b = fs::File::create(root.join("b")).expect("b");
        for i in 0..n / 2 {
            a.write_at(b"x", (i % 64) as u64).expect("write a");
            b.write_at(b"y", (i % 64) as u64).expect("write b");
        }
    })
    .await
    .expect("writer");
    let mut seen = 0usize;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(30), s.next_frame()).await {
            Ok(Some(common::Frame::Message(_))) => seen += 1,
            Ok(Some(common::Frame::End(v))) => break v,
            Ok(None) => panic!("no end-of-stream"),
            Err(_) => panic!(
                "stalled after {seen} events of {}; log:\n{}",
                n,
                g.log_text()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    };
    assert!(seen > 0);
    assert_eq!(end["error"]["code"], "internal", "{end}");
    let msg = end["error"]["message"].as_str().expect("message");
    assert!(msg.contains("overflowed"), "{msg}");
}

/// The watch limit (ENOSPC from inotify_add_watch) reaches the client as `internal`
/// naming the sysctl, both when arming and when a new subdirectory cannot be added.
/// guestd runs in its own user namespace whose inotify watch limit is lowered, so the
/// machine's limit is not touched.
#[tokio::test]
async fn watch_limit_is_a_clear_error() {
    let probe = std::process::Command::new("unshare")
        .args([
            "-U",
            "-r",
            "sh",
            "-c",
            "echo 25 > /proc/sys/user/max_inotify_watches",
        ])
        .status();
    // tests/run.sh runs as root on Linux >= 5.11: never a silent skip.
    assert!(
        probe.map(|s| s.success()).unwrap_or(false),
        "cannot set a per-namespace inotify limit (unshare -U -r)"
    );
    let g = Guestd::start_wrapped(
        &[
            "unshare",
            "-U",
            "-r",
            "sh",
            "-c",
            "echo 25 > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\"",
        ],
        &["--default-user", "root", "--no-code-interpreter"],
    );
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big");
    for i in 0..40 {
        fs::create_dir_all(big.join(format!("d{i}"))).expect("mkdir");
    }
    let r: Result<pb::CreateWatcherResponse, _> = call(
        &c,
        Codec::Json,
        "CreateWatcher",
        &pb::CreateWatcherRequest {
            path: p(&big),
            recursive: true,
            include_entry: false,
            allow_network_mounts: false,
        },
        &[],
    )
    .await;
    let msg = assert_err(r, "internal", 500);
    assert!(msg.contains("inotify watch limit was reached"), "{msg}");
    assert!(msg.contains("max_user_watches"), "{msg}");

    let mut s = watch(&c, Codec::Json, &watch_req(&big, true, false), &[]).await;
    let end = s
        .next_message::<pb::WatchDirResponse>()
        .await
        .expect_err("end");
    assert_eq!(end["error"]["code"], "internal", "{end}");

    // Growing past the limit while watching: the stream ends with the error.
    let small = dir.path().join("small");
    fs::create_dir(&small).expect("mkdir");
    let mut s = watch(&c, Codec::Json, &watch_req(&small, true, false), &[]).await;
    assert!(
        s.next_message::<pb::WatchDirResponse>().await.is_ok(),
        "start"
    );
    for i in 0..40 {
        fs::create_dir(small.join(format!("n{i}"))).expect("mkdir");
    }
    let end = loop {
        match s.next_message::<pb::WatchDirResponse>().await {
            Ok(_) => {}
            Err(end) => break end,
        }
    };
    assert_eq!(end["error"]["code"], "internal", "{end}");
    let msg = end["error"]["message"].as_str().expect("message");
    assert!(msg.contains("inotify watch limit was reached"), "{msg}");
}

async fn metrics_watchers(c: &Client) -> u64 {
    let (_, _, body) = c
        .fetch(Method::GET, "/metrics?format=prometheus", &[], Vec::new())
        .await;
    let text = String::from_utf8_lossy(&body).into_owned();
    text.lines()
        .find(|l| l.starts_with("guestd_watchers "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no guestd_watchers in {text}"))
}

#[tokio::test]
async fn polling_watchers_lifecycle() {
    let g = Guestd::start();
    let c = g.client();
    for codec in CODECS {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = dir.path();
        let r: pb::CreateWatcherResponse = call(
            &c,
            codec,
            "CreateWatcher",
            &pb::CreateWatcherRequest {
                path: p(b),
                recursive: false,
                include_entry: true,
                allow_network_mounts: false,
            },
            &[],
        )
        .await
        .expect("create");
        let id = r.watcher_id;
        assert!(id.starts_with('w') && id.len() == 21, "{id}");
        assert_eq!(metrics_watchers(&c).await, 1);
        fs::write(b.join("one"), b"1").expect("write");
        fs::write(b.join("two"), b"2").expect("write");
        let mut all = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all.iter().any(|e| is(e, "two", pb::EventType::Write)) {
            assert!(Instant::now() < deadline, "no events: {all:?}");
            let r: pb::GetWatcherEventsResponse = call(
                &c,
                codec,
                "GetWatcherEvents",
                &pb::GetWatcherEventsRequest {
                    watcher_id: id.clone(),
                },
                &[],
            )
            .await
            .expect("events");
            all.extend(r.events);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first_one = all.iter().position(|e| e.name == "one").expect("one");
        let first_two = all.iter().position(|e| e.name == "two").expect("two");
        assert!(first_one < first_two, "oldest first: {all:?}");
        let create = all
            .iter()
            .find(|e| is(e, "one", pb::EventType::Create))
            .expect("create");
        assert_eq!(
            create.entry.as_ref().expect("entry").path,
            p(&b.join("one"))
        );
        let _: pb::RemoveWatcherResponse = call(
            &c,
            codec,
            "RemoveWatcher",
            &pb::RemoveWatcherRequest {
                watcher_id: id.clone(),
            },
            &[],
        )
        .await
        .expect("remove");
        assert_eq!(metrics_watchers(&c).await, 0);
        let msg = assert_err(
            call::<_, pb::GetWatcherEventsResponse>(
                &c,
                codec,
                "GetWatcherEvents",
                &pb::GetWatcherEventsRequest {
                    watcher_id: id.clone(),
                },
                &[],
            )
            .await,
            "not_found",
            404,
        );
        assert_eq!(msg, format!("watcher with id {id} not found"));
        assert_err(
            call::<_, pb::RemoveWatcherResponse>(
                &c,
                codec,
                "RemoveWatcher",
                &pb::RemoveWatcherRequest { watcher_id: id },
                &[],
            )
            .await,
            "not_found",
            404,
        );
        let msg = assert_err(
            call::<_, pb::CreateWatcherResponse>(
                &c,
                codec,
                "CreateWatcher",
                &pb::CreateWatcherRequest {
                    path: p(&b.join("missing")),
                    ..Default::default()
                },
                &[],
            )
            .await,
            "not_found",
            404,
        );
        assert!(msg.contains("not found"), "{msg}");
    }
}

#[tokio::test]
async fn polling_watchers_overflow_and_expire() {
    let g = Guestd::start_with(&[
        "--default-user",
        "root",
        "--no-code-interpreter",
        "--watcher-queue-events",
        "5",
        "--watcher-idle-timeout-secs",
        "1",
    ]);
    let c = g.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let create = || async {
        let r: pb::CreateWatcherResponse = call(
            &c,
            Codec::Json,
            "CreateWatcher",
            &pb::CreateWatcherRequest {
                path: p(dir.path()),
                ..Default::default()
            },
            &[],
        )
        .await
        .expect("create");
        r.watcher_id
    };
    let get = |id: String| async {
        call::<_, pb::GetWatcherEventsResponse>(
            &c,
            Codec::Json,
            "GetWatcherEvents",
            &pb::GetWatcherEventsRequest { watcher_id: id },
            &[],
        )
        .await
    };
    let id = create().await;
    for i in 0..10 {
        fs::write(dir.path().join(format!("f{i}")), b"x").expect("write");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let msg = assert_err(get(id.clone()).await, "internal", 500);
    assert!(
        msg.contains("5 events") && msg.contains("events were lost"),
        "{msg}"
    );
    let again = assert_err(get(id.clone()).await, "internal", 500);
    assert_eq!(
        again, msg,
        "a failed watcher reports its failure on every call"
    );

    // Nobody polls: the watcher is removed after the idle timeout.
    let idle = create().await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_err(get(idle).await, "not_found", 404);
    assert_eq!(metrics_watchers(&c).await, 0, "the failed one expired too");
}

#[tokio::test]
async fn unknown_methods_and_wrong_verbs() {
    let g = Guestd::start();
    let c = g.client();
    let (status, _, _) = c
        .fetch(
            Method::POST,
            &rpc("Chmod"),
            &[("content-type", "application/json")],
            "{}",
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = c.fetch(Method::GET, &rpc("Stat"), &[], Vec::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}
