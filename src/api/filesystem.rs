//! `filesystem.Filesystem` (contract §4): maps the RPCs onto [`crate::filesystem`].
//!
//! Every path-taking call resolves its path for the caller (`Authorization: Basic`
//! user, else the default user; contract §2.2, §2.4) and runs the blocking domain call
//! in `spawn_blocking`. Domain errors map by [`ErrorClass`] (see [`rpc_error`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt as _;
use http::{Request, Response};
use hyper::body::Incoming;

use super::Agent;
use super::streams::{Next, with_keepalive};
use crate::filesystem::{
    self as domain, EntryInfo, ErrorClass, EventType, FileType, FsError, FsEvent, Owner,
    WatchOptions, WatchStream,
};
use crate::proto::filesystem as pb;
use crate::sys::users::User;
use crate::transport::rpc::{self, CallContext, ResponseStream};
use crate::transport::{Body, Code, RpcError};

/// Serves one `filesystem.Filesystem` method; `None` for an unknown method.
pub async fn route(
    agent: &Arc<Agent>,
    method: &str,
    req: Request<Incoming>,
) -> Option<Response<Body>> {
    let a = agent.clone();
    let limits = agent.limits;
    Some(match method {
        "Stat" => rpc::unary(req, limits, move |ctx, r| stat(a, ctx, r)).await,
        "MakeDir" => rpc::unary(req, limits, move |ctx, r| make_dir(a, ctx, r)).await,
        "Move" => rpc::unary(req, limits, move |ctx, r| move_entry(a, ctx, r)).await,
        "ListDir" => rpc::unary(req, limits, move |ctx, r| list_dir(a, ctx, r)).await,
        "Remove" => rpc::unary(req, limits, move |ctx, r| remove(a, ctx, r)).await,
        "WatchDir" => rpc::server_stream(req, limits, move |ctx, r| watch_dir(a, ctx, r)).await,
        "CreateWatcher" => rpc::unary(req, limits, move |ctx, r| create_watcher(a, ctx, r)).await,
        "GetWatcherEvents" => {
            rpc::unary(req, limits, move |ctx, r| get_watcher_events(a, ctx, r)).await
        }
        "RemoveWatcher" => rpc::unary(req, limits, move |ctx, r| remove_watcher(a, ctx, r)).await,
        _ => return None,
    })
}

/// Domain error → Connect code (contract §1.8, §4.4, §4.5):
///
/// | class | code |
/// |---|---|
/// | `NotFound` | `not_found` |
/// | `AlreadyExists` | `already_exists` |
/// | `InvalidArgument` | `invalid_argument` |
/// | `FailedPrecondition` | `failed_precondition` |
/// | `PermissionDenied` | `permission_denied` (the kernel refused even root: read-only mount, `/proc`, immutable file) |
/// | `InsufficientStorage` | `internal` (contract: other failures are `internal`; the SDK would call `resource_exhausted` rate limiting) |
/// | `ResourceExhausted` | `resource_exhausted` (the agent is out of descriptors or memory: retrying later may work) |
/// | `Internal` | `internal` (also inotify watch/instance limits and queue overflows) |
pub fn rpc_error(e: FsError) -> RpcError {
    let code = match e.class() {
        ErrorClass::NotFound => Code::NotFound,
        ErrorClass::AlreadyExists => Code::AlreadyExists,
        ErrorClass::InvalidArgument => Code::InvalidArgument,
        ErrorClass::FailedPrecondition => Code::FailedPrecondition,
        ErrorClass::PermissionDenied => Code::PermissionDenied,
        ErrorClass::ResourceExhausted => Code::ResourceExhausted,
        ErrorClass::InsufficientStorage | ErrorClass::Internal => Code::Internal,
    };
    RpcError::new(code, e.to_string())
}

/// Runs a blocking domain call off the async workers.
async fn blocking<T, F>(f: F) -> Result<T, RpcError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, FsError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(rpc_error),
        Err(e) => Err(RpcError::internal(format!(
            "the filesystem task failed: {e}"
        ))),
    }
}

/// Resolves a request path for `user` (contract §2.4); failures are `invalid_argument`.
fn resolve(agent: &Agent, user: &User, path: &str) -> Result<PathBuf, RpcError> {
    let defaults = agent.defaults();
    crate::paths::resolve(path, &user.home, defaults.workdir.as_deref())
        .map_err(|e| RpcError::invalid_argument(format!("invalid path {path:?}: {e}")))
}

/// Domain [`EntryInfo`] → proto (contract §4.2, §4.3).
pub fn entry_to_pb(e: EntryInfo) -> pb::EntryInfo {
    let file_type = match e.file_type {
        FileType::File => pb::FileType::File,
        FileType::Directory => pb::FileType::Directory,
        FileType::Unspecified => pb::FileType::Unspecified,
    };
    pb::EntryInfo {
        name: e.name,
        r#type: file_type as i32,
        path: path_string(&e.path),
        size: e.size,
        mode: e.mode,
        permissions: e.permissions,
        owner: e.owner,
        group: e.group,
        modified_time: e.modified_time.map(|t| crate::proto::Timestamp {
            seconds: t.seconds,
            nanos: t.nanos,
        }),
        symlink_target: e.symlink_target.as_deref().map(path_string),
        metadata: e.metadata.into_iter().collect(),
        is_symlink: e.is_symlink,
    }
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn event_to_pb(ev: FsEvent) -> pb::FilesystemEvent {
    let t = match ev.event_type {
        EventType::Create => pb::EventType::Create,
        EventType::Write => pb::EventType::Write,
        EventType::Remove => pb::EventType::Remove,
        EventType::Rename => pb::EventType::Rename,
        EventType::Chmod => pb::EventType::Chmod,
    };
    pb::FilesystemEvent {
        name: ev.name,
        r#type: t as i32,
        entry: ev.entry.map(entry_to_pb),
    }
}

async fn stat(
    agent: Arc<Agent>,
    ctx: CallContext,
    req: pb::StatRequest,
) -> Result<pb::StatResponse, RpcError> {
    let user = agent.caller(&ctx.headers)?;
    let path = resolve(&agent, &user, &req.path)?;
    let users = agent.users.clone();
    let entry = blocking(move || domain::stat(&path, users.as_ref())).await?;
    Ok(pb::StatResponse {
        entry: Some(entry_to_pb(entry)),
    })
}

async fn make_dir(
    agent: Arc<Agent>,
    ctx: CallContext,
    req: pb::MakeDirRequest,
) -> Result<pb::MakeDirResponse, RpcError> {
    let user = agent.caller(&ctx.headers)?;
    let path = resolve(&agent, &user, &req.path)?;
    let owner = Owner::from(&user);
    let users = agent.users.clone();
    let entry = blocking(move || domain::make_dir(&path, owner, users.as_ref())).await?;
    Ok(pb::MakeDirResponse {
        entry: Some(entry_to_pb(entry)),
    })
}

async fn move_entry(
    agent: Arc<Agent>,
    ctx: CallContext,
    req: pb::MoveRequest,
) -> Result<pb::MoveResponse, RpcError> {
    let user = agent.caller(&ctx.headers)?;
    let source = resolve(&agent, &user, &req.source)?;
    let destination = resolve(&agent, &user, &req.destination)?;
    let owner = Owner::from(&user);
    let users = agent.users.clone();
    let entry =
        blocking(move || domain::rename(&source, &destination, owner, users.as_ref())).await?;
    Ok(pb::MoveResponse {
        entry: Some(entry_to_pb(entry)),
    })
}

async fn list_dir(
    agent: Arc<Agent>,
    ctx: CallContext,
    req: pb::ListDirRequest,
) -> Result<pb::ListDirResponse, RpcError> {
    let user = agent.caller(&ctx.headers)?;
    let path = resolve(&agent, &user, &req.path)?;
    let users = agent.users.clone();
    let depth = req.depth;
    let entries = blocking(move || domain::list_dir(&path, depth, users.as_ref())).await?;
    Ok(pb::ListDirResponse {
        entries: entries.into_iter().map(entry_to_pb).collect(),
    })
}

async fn remove(
    agent: Arc<Agent>,
    ctx: CallContext,
    req: pb::RemoveRequest,
) -> Result<pb::RemoveResponse, RpcError> {
    let user = agent.caller(&ctx.headers)?;
    let path = resolve(&agent, &user, &req.path)?;
    blocking(move || domain::remove(&path)).await?;
    Ok(pb::RemoveResponse {})
}

fn watch_options(recursive: bool, include_entry: bool, allow_network_mounts: bool) -> WatchOptions {
    WatchOptions {
        recursive,
        include_entry,
        allow_network_mounts,
    }
}

fn watch_response(e: pb::watch_dir_response::Event) -> pb::WatchDirResponse {
    pb::WatchDirResponse { event: Some(e) }
}

fn watch_keepalive() -> pb::WatchDirResponse {
    watch_response(pb::watch_dir_response::Event::Keepalive(
        pb::watch_dir_response::KeepAlive {},
    ))
}

/// The events of a watch as a stream source; a watch failure (queue overflow, inotify
/// read error, watch limit while adding a new subdirectory) ends the stream with its
/// error, never silently.
fn watch_source(
    stream: WatchStream,
) -> impl futures_util::Stream<Item = Next<pb::WatchDirResponse>> {
    stream.map(|item| match item {
        Ok(ev) => Next::Item(watch_response(pb::watch_dir_response::Event::Filesystem(
            event_to_pb(ev),
        ))),
        Err(e) => Next::Fail(rpc_error(e)),
    })
}

async fn watch_dir(
    agent: Arc<Agent>,
    ctx: CallContext,
    req: pb::WatchDirRequest,
) -> Result<ResponseStream<pb::WatchDirResponse>, RpcError> {
    let user = agent.caller(&ctx.headers)?;
    let path = resolve(&agent, &user, &req.path)?;
    let opts = watch_options(req.recursive, req.include_entry, req.allow_network_mounts);
    let users = agent.users.clone();
    // Armed (validated, watches added) before `start` is sent (contract §4.5).
    let stream = blocking(move || domain::watch_dir(&path, opts, users)).await?;
    let first = watch_response(pb::watch_dir_response::Event::Start(
        pb::watch_dir_response::StartEvent {},
    ));
    Ok(with_keepalive(
        Some(first),
        watch_source(stream),
        ctx.keepalive_interval(),
        watch_keepalive,
    ))
}

async fn create_watcher(
    agent: Arc<Agent>,
    ctx: CallContext,
    req: pb::CreateWatcherRequest,
) -> Result<pb::CreateWatcherResponse, RpcError> {
    let user = agent.caller(&ctx.headers)?;
    let path = resolve(&agent, &user, &req.path)?;
    let opts = watch_options(req.recursive, req.include_entry, req.allow_network_mounts);
    let users = agent.users.clone();
    let registry = agent.watchers.clone();
    let watcher_id = blocking(move || registry.create(&path, opts, users)).await?;
    Ok(pb::CreateWatcherResponse { watcher_id })
}

async fn get_watcher_events(
    agent: Arc<Agent>,
    _ctx: CallContext,
    req: pb::GetWatcherEventsRequest,
) -> Result<pb::GetWatcherEventsResponse, RpcError> {
    let events = agent
        .watchers
        .get_events(&req.watcher_id)
        .map_err(rpc_error)?;
    Ok(pb::GetWatcherEventsResponse {
        events: events.into_iter().map(event_to_pb).collect(),
    })
}

async fn remove_watcher(
    agent: Arc<Agent>,
    _ctx: CallContext,
    req: pb::RemoveWatcherRequest,
) -> Result<pb::RemoveWatcherResponse, RpcError> {
    agent.watchers.remove(&req.watcher_id).map_err(rpc_error)?;
    Ok(pb::RemoveWatcherResponse {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filesystem::Timestamp;

    #[test]
    fn entry_mapping_keeps_every_field() {
        let e = EntryInfo {
            name: "l".into(),
            file_type: FileType::File,
            path: "/x/l".into(),
            size: 7,
            mode: 0o644,
            permissions: "Lrwxrwxrwx".into(),
            owner: "user".into(),
            group: "user".into(),
            modified_time: Some(Timestamp {
                seconds: 5,
                nanos: 6,
            }),
            symlink_target: Some("/x/t".into()),
            metadata: [("k".to_string(), "v".to_string())].into_iter().collect(),
            is_symlink: true,
        };
        let p = entry_to_pb(e);
        assert_eq!(p.r#type, pb::FileType::File as i32);
        assert_eq!(p.symlink_target.as_deref(), Some("/x/t"));
        assert!(p.is_symlink);
        assert_eq!(p.metadata["k"], "v");
        let json = serde_json::to_value(&p).expect("json");
        assert_eq!(json["size"], "7");
        assert_eq!(json["type"], "FILE_TYPE_FILE");
        assert_eq!(json["isSymlink"], true);
        assert_eq!(json["symlinkTarget"], "/x/t");
        assert_eq!(json["modifiedTime"], "1970-01-01T00:00:05.000000006Z");
    }

    #[test]
    fn error_classes_map_to_codes() {
        assert_eq!(
            rpc_error(FsError::NotFound("file not found: /x".into())).code,
            Code::NotFound
        );
        assert_eq!(
            rpc_error(FsError::AlreadyExists("x".into())).code,
            Code::AlreadyExists
        );
        let e = rpc_error(FsError::WatchLimit {
            path: "/w".into(),
            limit: Some(8192),
        });
        assert_eq!(e.code, Code::Internal);
        assert!(e.message.contains("max_user_watches"), "{}", e.message);
        assert_eq!(
            rpc_error(FsError::SymlinkLoop { path: "/l".into() }).code,
            Code::FailedPrecondition
        );
    }
}
