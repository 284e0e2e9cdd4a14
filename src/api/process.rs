//! `process.Process`: maps the RPCs onto [`crate::process::ProcessManager`].

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use super::Agent;
use super::streams::{Next, with_keepalive};
use crate::process::{
    self as domain, CommandConfig, Event, ExitInfo, Input, OutputKind, ProcessError, PtySize,
    Selector, Signal, StartSpec, SubscriptionError,
};
use crate::proto::process as pb;
use crate::transport::rpc::{self, CallContext, RequestStream, ResponseStream};
use crate::transport::{Body, Code, RpcError};

/// Serves one `process.Process` method; `None` for an unknown method.
pub async fn route(
    agent: &Arc<Agent>,
    method: &str,
    req: Request<Incoming>,
) -> Option<Response<Body>> {
    let a = agent.clone();
    let limits = agent.limits;
    Some(match method {
        "Start" => rpc::server_stream(req, limits, move |ctx, r| start(a, ctx, r)).await,
        "Connect" => rpc::server_stream(req, limits, move |ctx, r| connect(a, ctx, r)).await,
        "List" => rpc::unary(req, limits, move |ctx, r| list(a, ctx, r)).await,
        "SendInput" => rpc::unary(req, limits, move |ctx, r| send_input(a, ctx, r)).await,
        "StreamInput" => {
            rpc::client_stream(req, limits, move |ctx, s| stream_input(a, ctx, s)).await
        }
        "SendSignal" => rpc::unary(req, limits, move |ctx, r| send_signal(a, ctx, r)).await,
        "CloseStdin" => rpc::unary(req, limits, move |ctx, r| close_stdin(a, ctx, r)).await,
        "Update" => rpc::unary(req, limits, move |ctx, r| update(a, ctx, r)).await,
        _ => return None,
    })
}

impl From<ProcessError> for RpcError {
    fn from(e: ProcessError) -> Self {
        let code = match &e {
            ProcessError::NotFound(_) => Code::NotFound,
            ProcessError::CwdMissing(_)
            | ProcessError::CwdNotDirectory(_)
            | ProcessError::Spawn(_)
            | ProcessError::TooLarge(_) => Code::InvalidArgument,
            ProcessError::ResourceExhausted(_) => Code::ResourceExhausted,
            // Out of descriptors or memory while writing input or signalling: not the
            // caller's fault; the errno is in the message.
            ProcessError::Io(io) | ProcessError::Signal(io)
                if crate::sys::limits::is_resource_exhaustion(io) =>
            {
                Code::ResourceExhausted
            }
            ProcessError::CloseStdinOnPty => Code::Unknown,
            _ => Code::Internal,
        };
        RpcError::new(code, e.to_string())
    }
}

fn selector(sel: Option<pb::ProcessSelector>) -> Result<Selector, RpcError> {
    match sel.and_then(|s| s.selector) {
        Some(pb::process_selector::Selector::Pid(pid)) => Ok(Selector::Pid(pid)),
        Some(pb::process_selector::Selector::Tag(tag)) => Ok(Selector::Tag(tag)),
        None => Err(RpcError::unimplemented(
            "the process selector is empty: set `pid` or `tag`",
        )),
    }
}

fn pty_size(p: Option<pb::Pty>) -> Option<PtySize> {
    p.map(|p| {
        let size = p.size.unwrap_or_default();
        let clamp = |v: u32, default: u16| {
            if v == 0 {
                default
            } else {
                u16::try_from(v).unwrap_or(u16::MAX)
            }
        };
        PtySize {
            cols: clamp(size.cols, 80),
            rows: clamp(size.rows, 24),
        }
    })
}

fn event(e: pb::process_event::Event) -> pb::ProcessEvent {
    pb::ProcessEvent { event: Some(e) }
}

fn data_event(kind: OutputKind, bytes: bytes::Bytes) -> pb::ProcessEvent {
    use pb::process_event::data_event::Output;
    let output = match kind {
        OutputKind::Stdout => Output::Stdout(bytes),
        OutputKind::Stderr => Output::Stderr(bytes),
        OutputKind::Pty => Output::Pty(bytes),
    };
    event(pb::process_event::Event::Data(
        pb::process_event::DataEvent {
            output: Some(output),
        },
    ))
}

fn end_event(x: ExitInfo) -> pb::ProcessEvent {
    event(pb::process_event::Event::End(pb::process_event::EndEvent {
        exit_code: x.exit_code,
        exited: x.exited,
        status: x.status,
        error: x.error,
        oom_killed: x.oom_killed,
    }))
}

fn start_event(pid: u32, replay_offset: Option<u64>) -> pb::ProcessEvent {
    event(pb::process_event::Event::Start(
        pb::process_event::StartEvent { pid, replay_offset },
    ))
}

fn keepalive_event() -> pb::ProcessEvent {
    event(pb::process_event::Event::Keepalive(
        pb::process_event::KeepAlive {},
    ))
}

/// The events of a subscription as a stream source: data, then the end, or the
/// subscriber's failure.
fn subscription_source(
    sub: domain::Subscription,
) -> impl futures_util::Stream<Item = Next<pb::ProcessEvent>> {
    futures_util::stream::unfold(Some(sub), |sub| async move {
        let mut sub = sub?;
        let next = match sub.next().await {
            Some(Ok(Event::Data(kind, bytes))) => Next::Item(data_event(kind, bytes)),
            Some(Ok(Event::End(x))) => return Some((Next::Last(end_event(x)), None)),
            Some(Err(e)) => return Some((Next::Fail(subscription_error(e)), None)),
            None => return Some((Next::Done, None)),
        };
        Some((next, Some(sub)))
    })
}

fn subscription_error(e: SubscriptionError) -> RpcError {
    RpcError::new(Code::ResourceExhausted, e.to_string())
}

fn process_stream<T: Send + 'static>(
    ctx: &CallContext,
    first: pb::ProcessEvent,
    sub: domain::Subscription,
    wrap: fn(pb::ProcessEvent) -> T,
) -> ResponseStream<T> {
    use futures_util::StreamExt as _;
    let inner = with_keepalive(
        Some(first),
        subscription_source(sub),
        ctx.keepalive_interval(),
        keepalive_event,
    );
    inner.map(move |r| r.map(wrap)).boxed()
}

async fn start(
    agent: Arc<Agent>,
    ctx: CallContext,
    req: pb::StartRequest,
) -> Result<ResponseStream<pb::StartResponse>, RpcError> {
    let user = agent.caller(&ctx.headers)?;
    let Some(config) = req.process else {
        return Err(RpcError::invalid_argument(
            "missing `process`: the command to start",
        ));
    };
    if config.cmd.is_empty() {
        return Err(RpcError::invalid_argument(
            "missing `process.cmd`: the command to start",
        ));
    }
    let defaults = agent.defaults();
    let cwd = crate::paths::resolve(
        config.cwd.as_deref().unwrap_or(""),
        &user.home,
        defaults.workdir.as_deref(),
    )
    .map_err(|e| RpcError::invalid_argument(e.to_string()))?;
    let spec = StartSpec {
        config: CommandConfig {
            cmd: config.cmd,
            args: config.args,
            envs: config.envs.into_iter().collect(),
            cwd: config.cwd,
        },
        cwd,
        user,
        global_env: agent.global_env(),
        pty: pty_size(req.pty),
        stdin: req.stdin.unwrap_or(true),
        tag: req.tag,
        // Start's deadline is also the process's lifetime (contract §3.3.6).
        timeout: ctx.timeout,
    };
    let sub = agent.processes.start(spec).await?;
    let first = start_event(sub.pid(), None);
    Ok(process_stream(&ctx, first, sub, |e| pb::StartResponse {
        event: Some(e),
    }))
}

async fn connect(
    agent: Arc<Agent>,
    ctx: CallContext,
    req: pb::ConnectRequest,
) -> Result<ResponseStream<pb::ConnectResponse>, RpcError> {
    let sel = selector(req.process)?;
    let sub = agent.processes.connect(&sel, req.replay_from)?;
    let first = start_event(sub.pid(), sub.replay_offset());
    Ok(process_stream(&ctx, first, sub, |e| pb::ConnectResponse {
        event: Some(e),
    }))
}

async fn list(
    agent: Arc<Agent>,
    _ctx: CallContext,
    _req: pb::ListRequest,
) -> Result<pb::ListResponse, RpcError> {
    let processes = agent
        .processes
        .list()
        .into_iter()
        .map(|p| pb::ProcessInfo {
            pid: p.pid,
            tag: p.tag,
            config: Some(pb::ProcessConfig {
                cmd: p.config.cmd,
                args: p.config.args,
                envs: p.config.envs.into_iter().collect(),
                cwd: p.config.cwd,
            }),
        })
        .collect();
    Ok(pb::ListResponse { processes })
}

fn input(i: Option<pb::ProcessInput>) -> Result<Input, RpcError> {
    match i.and_then(|i| i.input) {
        Some(pb::process_input::Input::Stdin(b)) => Ok(Input::Stdin(b)),
        Some(pb::process_input::Input::Pty(b)) => Ok(Input::Pty(b)),
        None => Err(RpcError::unimplemented(
            "the input is empty: set `stdin` or `pty`",
        )),
    }
}

async fn send_input(
    agent: Arc<Agent>,
    _ctx: CallContext,
    req: pb::SendInputRequest,
) -> Result<pb::SendInputResponse, RpcError> {
    let sel = selector(req.process)?;
    let input = input(req.input)?;
    agent.processes.send_input(&sel, input).await?;
    Ok(pb::SendInputResponse {})
}

async fn stream_input(
    agent: Arc<Agent>,
    _ctx: CallContext,
    mut requests: RequestStream<pb::StreamInputRequest>,
) -> Result<pb::StreamInputResponse, RpcError> {
    use pb::stream_input_request::Event as E;
    let mut target: Option<Selector> = None;
    while let Some(msg) = requests.message().await? {
        match msg.event {
            Some(E::Start(start)) => {
                if target.is_some() {
                    return Err(RpcError::invalid_argument(
                        "`start` was sent twice: select the process once, then send `data`",
                    ));
                }
                let sel = selector(start.process)?;
                // Fail fast on an unknown process, before any data arrives.
                agent.processes.connect(&sel, None)?;
                target = Some(sel);
            }
            Some(E::Data(data)) => {
                let Some(sel) = target.as_ref() else {
                    return Err(RpcError::invalid_argument(
                        "`data` arrived before `start`: the first message must select the process",
                    ));
                };
                agent.processes.send_input(sel, input(data.input)?).await?;
            }
            Some(E::Keepalive(_)) => {}
            None => {
                return Err(RpcError::unimplemented(
                    "empty StreamInput message: set `start`, `data` or `keepalive`",
                ));
            }
        }
    }
    Ok(pb::StreamInputResponse {})
}

async fn send_signal(
    agent: Arc<Agent>,
    _ctx: CallContext,
    req: pb::SendSignalRequest,
) -> Result<pb::SendSignalResponse, RpcError> {
    let sel = selector(req.process)?;
    let sig = match pb::Signal::try_from(req.signal) {
        Ok(pb::Signal::Sigterm) => Signal::Term,
        Ok(pb::Signal::Sigkill) => Signal::Kill,
        _ => {
            return Err(RpcError::unimplemented(format!(
                "invalid signal {}: only SIGNAL_SIGTERM and SIGNAL_SIGKILL are supported",
                req.signal
            )));
        }
    };
    agent.processes.signal(&sel, sig)?;
    Ok(pb::SendSignalResponse {})
}

async fn close_stdin(
    agent: Arc<Agent>,
    _ctx: CallContext,
    req: pb::CloseStdinRequest,
) -> Result<pb::CloseStdinResponse, RpcError> {
    let sel = selector(req.process)?;
    agent.processes.close_stdin(&sel)?;
    Ok(pb::CloseStdinResponse {})
}

async fn update(
    agent: Arc<Agent>,
    _ctx: CallContext,
    req: pb::UpdateRequest,
) -> Result<pb::UpdateResponse, RpcError> {
    let sel = selector(req.process)?;
    agent.processes.resize(&sel, pty_size(req.pty))?;
    Ok(pb::UpdateResponse {})
}
