//! The agent API on the main port: one file per resource, each turning typed calls
//! from the transport into domain calls. This file holds the shared state and the
//! route table, with the two layers every request passes first: CORS (outermost, so
//! preflights are answered before auth) and the access-token check (before routing,
//! so unknown paths are 401 too while a token is set).

pub mod control;
pub mod files;
pub mod filesystem;
pub mod health;
pub mod metrics;
pub mod process;
pub mod streams;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::config::Config;
use crate::env::GlobalEnv;
use crate::init::{AccessToken, Initializer};
use crate::server::{ConnCounter, Handler};
use crate::sys::users::{SystemUsers, User, UserDb, UserError};
use crate::transport::rpc::Limits;
use crate::transport::{Body, RpcError, full_body};

/// Settings `/init` may change at run time.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub user: String,
    pub workdir: Option<PathBuf>,
}

/// Everything the agent API handlers share.
pub struct Agent {
    pub users: Arc<dyn UserDb>,
    pub processes: Arc<crate::process::ProcessManager>,
    pub defaults: RwLock<Defaults>,
    /// Global environment of every process and kernel (internal variables + `/init`).
    pub env: GlobalEnv,
    pub token: Arc<AccessToken>,
    pub init: Initializer,
    pub metrics: Arc<crate::metrics::Ring>,
    pub connections: Arc<ConnCounter>,
    pub limits: Limits,
    /// The polling watchers of CreateWatcher / GetWatcherEvents / RemoveWatcher.
    pub watchers: Arc<crate::filesystem::WatcherRegistry>,
    /// `POST /files`: a body read that waits longer than this fails the upload.
    pub upload_idle_timeout: std::time::Duration,
}

impl Agent {
    pub fn new(
        config: &Config,
        env: &GlobalEnv,
        metrics: Arc<crate::metrics::Ring>,
        connections: Arc<ConnCounter>,
        cgroups: Option<Arc<crate::sys::cgroup::Cgroups>>,
    ) -> Arc<Agent> {
        let processes = crate::process::ProcessManager::new(crate::process::ManagerConfig {
            replay_buffer_bytes: config.replay_buffer_bytes,
            replay_budget_bytes: config.replay_budget_bytes,
            pace_bytes: config.output_pace_bytes,
            subscriber_buffer_bytes: config.subscriber_buffer_bytes,
            stall_timeout: config.output_stall_timeout,
            exit_retention: config.exit_retention,
            exit_retention_bytes: config.exit_retention_bytes,
            agent_path_env: std::env::var("PATH").unwrap_or_else(|_| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
            }),
            cgroups,
            child_rlimits: config.child_rlimits.clone(),
        });
        let token = Arc::new(AccessToken::default());
        // Recursive watches of a template's tree need more than the kernel's 8192.
        crate::filesystem::raise_inotify_limits();
        let watchers = Arc::new(crate::filesystem::WatcherRegistry::new(
            crate::filesystem::RegistryConfig {
                queue_capacity: config.watcher_queue_events,
                idle_timeout: config.watcher_idle_timeout,
            },
        ));
        // Polling watchers nobody polls expire (contract §7 "Watcher leaks").
        if tokio::runtime::Handle::try_current().is_ok() {
            let every = (config.watcher_idle_timeout / 4).clamp(
                std::time::Duration::from_millis(100),
                std::time::Duration::from_secs(30),
            );
            watchers.spawn_sweeper(every);
        }
        let init = Initializer::new(
            token.clone(),
            env.clone(),
            config.init_paths.clone(),
            Box::new(crate::init::SystemClock),
        );
        Arc::new(Agent {
            users: Arc::new(SystemUsers),
            processes,
            defaults: RwLock::new(Defaults {
                user: config.default_user.clone(),
                workdir: config.default_workdir.clone(),
            }),
            env: env.clone(),
            token,
            init,
            metrics,
            connections,
            limits: Limits {
                max_message_bytes: config.max_message_bytes,
            },
            watchers,
            upload_idle_timeout: config.upload_idle_timeout,
        })
    }

    pub fn defaults(&self) -> Defaults {
        self.defaults
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn global_env(&self) -> Vec<(String, String)> {
        self.env.pairs()
    }

    /// Live filesystem watchers (for metrics).
    pub fn watcher_count(&self) -> usize {
        self.watchers.stats().watchers
    }

    /// The user a call acts as: the `Authorization: Basic` name, else the default user.
    pub fn caller(&self, headers: &http::HeaderMap) -> Result<User, RpcError> {
        let name =
            crate::transport::auth::basic_username(headers).unwrap_or_else(|| self.defaults().user);
        self.users.user_by_name(&name).map_err(user_error)
    }
}

/// Unknown users are `unauthenticated` (contract §2.2). A lookup that failed for lack
/// of descriptors or memory is `resource_exhausted` (the user may well exist; retrying
/// later may work), any other lookup failure `internal`; both keep the errno.
pub fn user_error(e: UserError) -> RpcError {
    use crate::transport::Code;
    let code = match &e {
        UserError::Unknown(_) => Code::Unauthenticated,
        e if e.is_resource_exhaustion() => Code::ResourceExhausted,
        UserError::Lookup { .. } => Code::Internal,
    };
    RpcError::new(code, e.to_string())
}

/// The request handler of the agent port.
pub fn handler(agent: Arc<Agent>) -> Handler {
    Handler::new(
        move |req: Request<Incoming>| {
            let agent = agent.clone();
            Box::pin(async move {
                let origin_request = req.method() == Method::OPTIONS;
                let mut resp = if origin_request {
                    preflight(&req)
                } else {
                    authorized_route(agent, req).await
                };
                add_cors_headers(&mut resp);
                resp
            })
        },
        bad_request_page,
    )
}

/// The error body for a request hyper rejected before routing: a Connect error on the
/// RPC paths (`invalid_argument` for 400, `resource_exhausted` for 414/431), the REST
/// JSON shape `{"code":<status>,"message"}` elsewhere (also when the request line
/// could not be read).
pub fn bad_request_page(
    bad: &crate::transport::h1guard::BadRequest<'_>,
) -> crate::transport::h1guard::ErrorBody {
    let path = bad.target.map(|t| match t.parse::<http::Uri>() {
        Ok(u) => u.path().to_string(),
        Err(_) => t.to_string(),
    });
    let rpc = path.as_deref().is_some_and(|p| {
        p.starts_with("/process.Process/") || p.starts_with("/filesystem.Filesystem/")
    });
    if !rpc {
        return crate::server::rest_error_page(bad);
    }
    let code = if bad.status == StatusCode::BAD_REQUEST {
        crate::transport::Code::InvalidArgument
    } else {
        crate::transport::Code::ResourceExhausted
    };
    let body = RpcError::new(code, bad.message).to_connect_json();
    crate::transport::h1guard::ErrorBody {
        content_type: "application/json",
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// Routes that do not need `X-Access-Token` (contract §2.1): `/health`, and `/files`
/// and `/init`, which check credentials themselves.
fn token_exempt(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::GET, "/health")
            | (&Method::HEAD, "/health")
            | (&Method::GET, "/files")
            | (&Method::POST, "/files")
            | (&Method::POST, "/init")
    )
}

async fn authorized_route(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    if !token_exempt(req.method(), req.uri().path()) {
        let presented = req.headers().get("x-access-token").map(|v| v.as_bytes());
        if !agent.token.admits(presented) {
            let keep_alive = drain_request(req).await;
            let mut resp = unauthorized_token();
            if !keep_alive {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return resp;
        }
    }
    route(agent, req).await
}

/// Most of a refused request's body read (and dropped) before the answer: the body of
/// a request answered without reading it may still be on its way, and hyper then
/// closes the connection after the answer, without saying so in it. A client that put
/// the connection back in its pool meanwhile had its next request (the SDK's `/health`
/// after a refused `Start`) fail with "connection closed before message completed".
const DRAIN_BYTES: usize = 64 * 1024;
const DRAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads the request body to its end within [`DRAIN_BYTES`] and [`DRAIN_WITHIN`];
/// false when it did not end there (the answer then says `Connection: close`).
async fn drain_request(req: Request<Incoming>) -> bool {
    use http_body_util::BodyExt as _;
    let mut body = req.into_body();
    let read = async {
        let mut n = 0usize;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    n += f.data_ref().map_or(0, |d| d.len());
                    if n > DRAIN_BYTES {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_WITHIN, read)
        .await
        .unwrap_or(false)
}

/// The contract's exact 401 for a missing or wrong access token.
pub fn unauthorized_token() -> Response<Body> {
    let body = br#"{"code":401,"message":"unauthorized access, please provide a valid access token or method signing if supported"}"#;
    let mut resp = Response::new(full_body(&body[..]));
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

async fn route(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Some(rpc) = path.strip_prefix("/process.Process/") {
        if method != Method::POST {
            return method_not_allowed("POST");
        }
        return match process::route(&agent, rpc, req).await {
            Some(resp) => resp,
            None => not_found(&path),
        };
    }
    if let Some(rpc) = path.strip_prefix("/filesystem.Filesystem/") {
        if method != Method::POST {
            return method_not_allowed("POST");
        }
        return match filesystem::route(&agent, rpc, req).await {
            Some(resp) => resp,
            None => not_found(&path),
        };
    }
    match (path.as_str(), &method) {
        ("/health", &Method::GET | &Method::HEAD) => health::health(),
        ("/health", _) => method_not_allowed("GET"),
        ("/metrics", &Method::GET) => metrics::metrics(&agent, &req),
        ("/metrics", _) => method_not_allowed("GET"),
        ("/envs", &Method::GET) => control::envs(&agent),
        ("/envs", _) => method_not_allowed("GET"),
        ("/init", &Method::POST) => control::init(&agent, req).await,
        ("/init", _) => method_not_allowed("POST"),
        ("/files", &Method::GET) => files::download(&agent, req).await,
        ("/files", &Method::POST) => files::upload(&agent, req).await,
        ("/files", _) => method_not_allowed("GET, POST"),
        ("/files/compose", &Method::POST) => files::compose(&agent, req).await,
        ("/files/compose", _) => method_not_allowed("POST"),
        _ => not_found(&path),
    }
}

/// Answers a CORS preflight (contract §1.9): any origin, the usual methods, the
/// requested headers reflected.
fn preflight(req: &Request<Incoming>) -> Response<Body> {
    let mut resp = Response::new(crate::transport::empty_body());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("HEAD, GET, POST, PUT, PATCH, DELETE"),
    );
    if let Some(requested) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested.clone());
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("7200"),
    );
    resp
}

fn add_cors_headers(resp: &mut Response<Body>) {
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "Grpc-Status, Grpc-Message, Grpc-Status-Details-Bin, Location, Cache-Control, X-Content-Type-Options",
        ),
    );
}

/// Decoded query parameters (form rules: `+` is a space).
pub fn query_pairs(uri: &http::Uri) -> impl Iterator<Item = (String, String)> + '_ {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
}

/// A JSON response.
pub fn json_response<T: serde::Serialize + ?Sized>(
    status: StatusCode,
    value: &T,
) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    let mut resp = Response::new(full_body(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// 404 in plain text (contract §1.2).
pub fn not_found(path: &str) -> Response<Body> {
    plain(
        StatusCode::NOT_FOUND,
        format!("404 page not found: no route for {path}\n"),
    )
}

/// 405 with the allowed method.
pub fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = plain(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed: use {allow}\n"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// A plain-text response.
pub fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut resp = Response::new(full_body(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
