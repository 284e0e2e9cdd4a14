//! Executions: what a run of user code produces (contract §3.2, §3.3, §4), the tracker
//! that turns kernel messages into outputs and decides completion (§4.2, §4.3), and the
//! per-execution output queue between the context worker and the client (§5.3, §10 #14).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::time::stream_timestamp;
use super::wire::Message;

/// One rich output (a Jupyter MIME bundle mapped to the result fields, §3.3).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecResult {
    pub text: Option<String>,
    pub html: Option<String>,
    pub markdown: Option<String>,
    pub svg: Option<String>,
    pub png: Option<String>,
    pub jpeg: Option<String>,
    pub pdf: Option<String>,
    pub latex: Option<String>,
    pub json: Option<Value>,
    pub javascript: Option<String>,
    pub data: Option<Value>,
    pub chart: Option<Value>,
    /// Every other MIME key, unchanged.
    pub extra: Map<String, Value>,
    pub is_main_result: bool,
}

/// Reference quote stripping of `text/plain` (§3.3): a non-empty value that starts and
/// ends with the same quote character loses its first and last character.
pub fn strip_quotes(s: &str) -> String {
    for q in ['\'', '"'] {
        if !s.is_empty() && s.starts_with(q) && s.ends_with(q) {
            // A single quote character: starts and ends with it, becomes "".
            if s.len() == 1 {
                return String::new();
            }
            return s[1..s.len() - 1].to_string();
        }
    }
    s.to_string()
}

/// A MIME value as a string: strings as-is, a list of strings joined (the notebook
/// format's multi-line form), anything else as JSON text.
fn mime_string(v: Value) -> String {
    match v {
        Value::String(s) => s,
        Value::Array(parts) if parts.iter().all(Value::is_string) => parts
            .into_iter()
            .filter_map(|p| match p {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        other => other.to_string(),
    }
}

impl ExecResult {
    /// Maps a `data` bundle of `execute_result` (main) or `display_data`.
    pub fn from_bundle(data: Map<String, Value>, is_main_result: bool) -> ExecResult {
        let mut r = ExecResult {
            is_main_result,
            ..ExecResult::default()
        };
        for (mime, value) in data {
            match mime.as_str() {
                "text/plain" => r.text = Some(strip_quotes(&mime_string(value))),
                "text/html" => r.html = Some(mime_string(value)),
                "text/markdown" => r.markdown = Some(mime_string(value)),
                "image/svg+xml" => r.svg = Some(mime_string(value)),
                "image/png" => r.png = Some(mime_string(value)),
                "image/jpeg" => r.jpeg = Some(mime_string(value)),
                "application/pdf" => r.pdf = Some(mime_string(value)),
                "text/latex" => r.latex = Some(mime_string(value)),
                "application/json" => r.json = Some(value),
                "application/javascript" => r.javascript = Some(mime_string(value)),
                "e2b/data" => r.data = Some(value),
                "e2b/chart" => r.chart = Some(value),
                _ => {
                    r.extra.insert(mime, value);
                }
            }
        }
        r
    }
}

/// An error line (§3.2): kernel errors and the synthetic ones of §4.4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecError {
    pub name: String,
    pub value: String,
    pub traceback: String,
}

impl ExecError {
    pub fn aborted() -> ExecError {
        ExecError::synthetic("ExecutionAborted", "Execution was aborted")
    }
    pub fn context_restarting() -> ExecError {
        ExecError::synthetic("ContextRestarting", "Context was restarted")
    }
    pub fn unexpected_end() -> ExecError {
        ExecError::synthetic(
            "UnexpectedEndOfExecution",
            "Connection to the execution was closed before the execution was finished",
        )
    }
    fn synthetic(name: &str, value: &str) -> ExecError {
        ExecError {
            name: name.to_string(),
            value: value.to_string(),
            traceback: String::new(),
        }
    }
    /// Whether the kernel gave nothing beyond a name and a message (Deno's kernel says
    /// only `Error: Execution failed` when a cell fails before it runs).
    pub fn is_blank(&self) -> bool {
        self.traceback.trim().is_empty()
    }

    /// With a detail in the traceback (the only free-form field).
    pub fn with_detail(mut self, detail: impl Into<String>) -> ExecError {
        self.traceback = detail.into();
        self
    }

    /// From the `ename`/`evalue`/`traceback` of an `error` message or an error reply;
    /// the traceback list is joined without separators (§4.2).
    fn from_content(content: &Value) -> ExecError {
        let s = |k: &str| {
            content
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let traceback = match content.get("traceback") {
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| match p {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect(),
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        ExecError {
            name: s("ename"),
            value: s("evalue"),
            traceback,
        }
    }
}

/// What an execution produces, in order. The stream always ends with `End`.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    ExecutionCount(i64),
    Stdout { text: String, timestamp: String },
    Stderr { text: String, timestamp: String },
    Result(Box<ExecResult>),
    Error(ExecError),
    End,
}

impl Output {
    fn weight(&self) -> usize {
        match self {
            Output::Stdout { text, .. } | Output::Stderr { text, .. } => text.len() + 64,
            Output::Result(r) => {
                let s = |o: &Option<String>| o.as_ref().map_or(0, String::len);
                s(&r.text)
                    + s(&r.html)
                    + s(&r.markdown)
                    + s(&r.svg)
                    + s(&r.png)
                    + s(&r.jpeg)
                    + s(&r.pdf)
                    + s(&r.latex)
                    + s(&r.javascript)
                    + 256
            }
            Output::Error(e) => e.name.len() + e.value.len() + e.traceback.len() + 64,
            _ => 32,
        }
    }
}

/// Reply status of `execute_reply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Ok,
    Error,
    Aborted,
}

/// Follows one `execute_request` (§4.2, §4.3): maps the messages parented to it into
/// outputs and knows when it is complete (iopub `idle` and shell `execute_reply`).
#[derive(Debug)]
pub struct Tracker {
    msg_id: String,
    count_written: bool,
    error_written: bool,
    idle: bool,
    reply: Option<Reply>,
    reply_count: Option<i64>,
    reply_error: Option<ExecError>,
    /// The first error the kernel reported (iopub `error` or error reply).
    first_error: Option<ExecError>,
}

impl Tracker {
    pub fn new(msg_id: &str) -> Tracker {
        Tracker {
            msg_id: msg_id.to_string(),
            count_written: false,
            error_written: false,
            idle: false,
            reply: None,
            reply_count: None,
            reply_error: None,
            first_error: None,
        }
    }

    pub fn msg_id(&self) -> &str {
        &self.msg_id
    }

    fn mine(&self, msg: &Message) -> bool {
        msg.parent_id() == Some(self.msg_id.as_str())
    }

    /// An iopub message; returns the outputs to write. Large strings (stream text,
    /// MIME bundles) are moved out of `msg`'s content, not copied.
    pub fn on_iopub(&mut self, msg: &mut Message) -> Vec<Output> {
        if !self.mine(msg) {
            return Vec::new();
        }
        match msg.header.msg_type.as_str() {
            "execute_input" => match msg.content.get("execution_count").and_then(Value::as_i64) {
                Some(n) if !self.count_written => {
                    self.count_written = true;
                    vec![Output::ExecutionCount(n)]
                }
                _ => Vec::new(),
            },
            "stream" => {
                let text = match msg.content.get_mut("text") {
                    Some(Value::String(s)) => std::mem::take(s),
                    _ => String::new(),
                };
                let timestamp = stream_timestamp(msg.header.date.as_deref());
                match msg.content_str("name") {
                    Some("stderr") => vec![Output::Stderr { text, timestamp }],
                    _ => vec![Output::Stdout { text, timestamp }],
                }
            }
            t @ ("execute_result" | "display_data") => {
                let is_main_result = t == "execute_result";
                let data = match msg.content.get_mut("data") {
                    Some(Value::Object(m)) => std::mem::take(m),
                    _ => Map::new(),
                };
                vec![Output::Result(Box::new(ExecResult::from_bundle(
                    data,
                    is_main_result,
                )))]
            }
            "error" => {
                if self.error_written {
                    return Vec::new();
                }
                self.error_written = true;
                let e = ExecError::from_content(&msg.content);
                self.first_error.get_or_insert_with(|| e.clone());
                vec![Output::Error(e)]
            }
            "status" => {
                if msg.content_str("execution_state") == Some("idle") {
                    self.idle = true;
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// A shell message (only `execute_reply` matters).
    pub fn on_shell(&mut self, msg: &Message) {
        if !self.mine(msg) || msg.msg_type() != "execute_reply" {
            return;
        }
        let c = &msg.content;
        self.reply_count = c.get("execution_count").and_then(Value::as_i64);
        self.reply = Some(match msg.content_str("status") {
            Some("error") => {
                let e = ExecError::from_content(c);
                self.first_error.get_or_insert_with(|| e.clone());
                self.reply_error = Some(e);
                Reply::Error
            }
            Some("aborted") | Some("abort") => Reply::Aborted,
            _ => Reply::Ok,
        });
    }

    pub fn idle_seen(&self) -> bool {
        self.idle
    }

    pub fn reply_seen(&self) -> bool {
        self.reply.is_some()
    }

    /// Complete: idle and reply both arrived, or the kernel said it aborted the request
    /// (aborted requests may never publish an `idle`).
    pub fn is_complete(&self) -> bool {
        (self.idle && self.reply.is_some()) || self.reply == Some(Reply::Aborted)
    }

    /// The outputs due at completion (before the end line): the execution count from
    /// the reply if `execute_input` never came, then the pending error.
    pub fn finish(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        if !self.count_written
            && let Some(n) = self.reply_count
            && self.reply != Some(Reply::Aborted)
        {
            self.count_written = true;
            out.push(Output::ExecutionCount(n));
        }
        match self.reply {
            Some(Reply::Aborted) if !self.error_written => {
                self.error_written = true;
                out.push(Output::Error(ExecError::aborted()));
            }
            Some(Reply::Error) if !self.error_written => {
                self.error_written = true;
                if let Some(e) = self.reply_error.take() {
                    out.push(Output::Error(e));
                }
            }
            _ => {}
        }
        out
    }

    /// Whether the request failed (error message or error/aborted reply).
    pub fn failed(&self) -> bool {
        self.error_written || matches!(self.reply, Some(Reply::Error | Reply::Aborted))
    }

    /// The first error seen, for logging setup failures.
    pub fn error_summary(&self) -> Option<String> {
        self.first_error
            .as_ref()
            .map(|e| format!("{}: {}", e.name, e.value))
    }

    /// The first error the kernel reported, as it reported it.
    pub fn first_error(&self) -> Option<&ExecError> {
        self.first_error.as_ref()
    }
}

// ---------------------------------------------------------------------------------------
// Output queue

/// Queued bytes above which consecutive stdout/stderr chunks are merged (a slow client
/// must not make guestd's memory grow without bound; results and errors are never
/// dropped).
pub const OUTPUT_BUFFER_LIMIT: usize = 8 << 20;

#[derive(Default)]
struct QueueState {
    items: VecDeque<Output>,
    bytes: usize,
    /// `End` was pushed: nothing more will come.
    ended: bool,
}

struct Shared {
    state: Mutex<QueueState>,
    waker: AtomicWaker,
    /// Cancelled when the consumer goes away (client disconnect).
    abandoned: CancellationToken,
    limit: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Creates the two ends of an execution's output queue.
pub fn output_channel() -> (ExecSender, ExecStream) {
    output_channel_with_limit(OUTPUT_BUFFER_LIMIT)
}

pub(crate) fn output_channel_with_limit(limit: usize) -> (ExecSender, ExecStream) {
    let shared = Arc::new(Shared {
        state: Mutex::new(QueueState::default()),
        waker: AtomicWaker::new(),
        abandoned: CancellationToken::new(),
        limit,
    });
    (
        ExecSender {
            shared: shared.clone(),
        },
        ExecStream { shared },
    )
}

/// The producing end (the context worker). Dropping it before `End` was sent ends the
/// stream with an `UnexpectedEndOfExecution` error, so a client never sees a clean end
/// of an unfinished execution.
pub struct ExecSender {
    shared: Arc<Shared>,
}

impl ExecSender {
    /// Queues one output. Past the buffer limit, a stdout/stderr chunk following a chunk
    /// of the same stream is merged into it.
    pub fn push(&self, out: Output) {
        let mut st = self.shared.lock();
        if st.ended {
            return;
        }
        if matches!(out, Output::End) {
            st.ended = true;
        }
        let w = out.weight();
        if st.bytes + w > self.shared.limit {
            match (st.items.back_mut(), &out) {
                (Some(Output::Stdout { text: a, .. }), Output::Stdout { text: b, .. })
                | (Some(Output::Stderr { text: a, .. }), Output::Stderr { text: b, .. }) => {
                    a.push_str(b);
                    st.bytes += b.len();
                    drop(st);
                    self.shared.waker.wake();
                    return;
                }
                _ => {}
            }
        }
        st.bytes += w;
        st.items.push_back(out);
        drop(st);
        self.shared.waker.wake();
    }

    pub fn push_all(&self, outs: impl IntoIterator<Item = Output>) {
        for o in outs {
            self.push(o);
        }
    }

    /// Writes `error` (if any) and the end line.
    pub fn end(&self, error: Option<ExecError>) {
        if let Some(e) = error {
            self.push(Output::Error(e));
        }
        self.push(Output::End);
    }

    pub fn is_ended(&self) -> bool {
        self.shared.lock().ended
    }

    /// The client went away.
    pub fn is_abandoned(&self) -> bool {
        self.shared.abandoned.is_cancelled()
    }

    /// Resolves when the client goes away.
    pub fn abandoned(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.shared.abandoned.cancelled()
    }
}

impl Drop for ExecSender {
    fn drop(&mut self) {
        if !self.is_ended() {
            self.end(Some(ExecError::unexpected_end()));
        }
    }
}

/// The consuming end (the HTTP response). A stream of outputs ending after `End`.
/// Dropping it marks the execution abandoned, which interrupts the kernel.
pub struct ExecStream {
    shared: Arc<Shared>,
}

impl ExecStream {
    /// The next output; `Ready(None)` after `End` was delivered.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Output>> {
        if let Some(o) = self.try_next() {
            return Poll::Ready(o);
        }
        self.shared.waker.register(cx.waker());
        match self.try_next() {
            Some(o) => Poll::Ready(o),
            None => Poll::Pending,
        }
    }

    /// `Some(Some(out))` when an output is queued, `Some(None)` after the end, `None`
    /// when nothing is available yet.
    fn try_next(&self) -> Option<Option<Output>> {
        let mut st = self.shared.lock();
        match st.items.pop_front() {
            Some(o) => {
                st.bytes = st.bytes.saturating_sub(o.weight());
                Some(Some(o))
            }
            None if st.ended => Some(None),
            None => None,
        }
    }

    /// Awaits the next output.
    pub async fn next(&self) -> Option<Output> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Marks the execution abandoned without dropping the stream.
    pub fn abandon(&self) {
        self.shared.abandoned.cancel();
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        self.shared.abandoned.cancel();
    }
}

impl futures_util::Stream for ExecStream {
    type Item = Output;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Output>> {
        ExecStream::poll_next(&self, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::wire::Header;
    use serde_json::json;

    fn msg(t: &str, parent: &str, content: Value) -> Message {
        let mut m = Message::new(t, "s", content);
        m.parent = Some(Header {
            msg_id: parent.into(),
            ..Header::default()
        });
        m
    }

    #[test]
    fn quote_stripping() {
        assert_eq!(strip_quotes("'bar'"), "bar");
        assert_eq!(strip_quotes("\"x\""), "x");
        assert_eq!(strip_quotes("'"), "");
        assert_eq!(strip_quotes("\""), "");
        assert_eq!(strip_quotes("''"), "");
        assert_eq!(strip_quotes("'a\""), "'a\"");
        assert_eq!(strip_quotes(""), "");
        assert_eq!(strip_quotes("2"), "2");
        assert_eq!(strip_quotes("'é'"), "é");
    }

    #[test]
    fn bundle_mapping() {
        let data = json!({
            "text/plain": "'hi'", "text/html": "<b>", "image/png": "iVBOR",
            "application/json": [1, 2], "e2b/data": {"a": [1]}, "e2b/chart": {},
            "text/latex": ["a", "b"], "application/vnd.custom": {"x": 1}
        });
        let Value::Object(m) = data else {
            unreachable!()
        };
        let r = ExecResult::from_bundle(m, true);
        assert_eq!(r.text.as_deref(), Some("hi"));
        assert_eq!(r.html.as_deref(), Some("<b>"));
        assert_eq!(r.png.as_deref(), Some("iVBOR"));
        assert_eq!(r.json, Some(json!([1, 2])));
        assert_eq!(r.data, Some(json!({"a": [1]})));
        assert_eq!(r.chart, Some(json!({})));
        assert_eq!(r.latex.as_deref(), Some("ab"));
        assert_eq!(
            r.extra.get("application/vnd.custom"),
            Some(&json!({"x": 1}))
        );
        assert!(r.is_main_result);
    }

    #[test]
    fn tracker_filters_and_completes_in_any_order() {
        let mut t = Tracker::new("m1");
        assert!(
            t.on_iopub(&mut msg(
                "stream",
                "other",
                json!({"name": "stdout", "text": "x"})
            ))
            .is_empty()
        );
        assert_eq!(
            t.on_iopub(&mut msg(
                "execute_input",
                "m1",
                json!({"execution_count": 3})
            )),
            vec![Output::ExecutionCount(3)]
        );
        let out = t.on_iopub(&mut msg(
            "stream",
            "m1",
            json!({"name": "stderr", "text": "e"}),
        ));
        assert!(
            matches!(&out[0], Output::Stderr { text, timestamp } if text == "e" && timestamp.ends_with("+00:00"))
        );
        let e1 = t.on_iopub(&mut msg(
            "error",
            "m1",
            json!({"ename": "NameError", "evalue": "x", "traceback": ["a\n", "b"]}),
        ));
        assert_eq!(
            e1,
            vec![Output::Error(ExecError {
                name: "NameError".into(),
                value: "x".into(),
                traceback: "a\nb".into()
            })]
        );
        assert!(
            t.on_iopub(&mut msg("error", "m1", json!({"ename": "Second"})))
                .is_empty()
        );
        t.on_iopub(&mut msg("status", "m1", json!({"execution_state": "idle"})));
        assert!(!t.is_complete());
        t.on_shell(&msg(
            "execute_reply",
            "m1",
            json!({"status": "error", "ename": "NameError", "execution_count": 3}),
        ));
        assert!(t.is_complete());
        assert!(
            t.finish().is_empty(),
            "error already written, count already written"
        );
    }

    #[test]
    fn tracker_reply_error_and_count_without_execute_input() {
        let mut t = Tracker::new("m");
        t.on_shell(&msg(
            "execute_reply",
            "m",
            json!({"status": "error", "ename": "E", "execution_count": 7}),
        ));
        assert!(!t.is_complete());
        t.on_iopub(&mut msg("status", "m", json!({"execution_state": "idle"})));
        assert!(t.is_complete());
        assert_eq!(
            t.finish(),
            vec![
                Output::ExecutionCount(7),
                Output::Error(ExecError {
                    name: "E".into(),
                    value: "".into(),
                    traceback: "".into()
                })
            ]
        );
    }

    #[test]
    fn tracker_aborted_completes_without_idle() {
        let mut t = Tracker::new("m");
        t.on_shell(&msg("execute_reply", "m", json!({"status": "aborted"})));
        assert!(t.is_complete());
        assert_eq!(t.finish(), vec![Output::Error(ExecError::aborted())]);
        let mut legacy = Tracker::new("n");
        legacy.on_shell(&msg("execute_reply", "n", json!({"status": "abort"})));
        assert!(legacy.is_complete());
    }

    #[test]
    fn queue_coalesces_streams_past_limit_but_keeps_results() {
        let (tx, rx) = output_channel_with_limit(200);
        let chunk = |t: &str| Output::Stdout {
            text: t.into(),
            timestamp: "t".into(),
        };
        for _ in 0..10 {
            tx.push(chunk("0123456789"));
        }
        tx.push(Output::Result(Box::default()));
        tx.push(chunk("x"));
        tx.end(None);
        let mut items = Vec::new();
        while let Some(Some(o)) = rx.try_next() {
            items.push(o);
        }
        let text: String = items
            .iter()
            .filter_map(|o| match o {
                Output::Stdout { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text.len(), 101, "no stdout byte lost");
        assert!(items.len() < 12, "chunks were merged: {}", items.len());
        assert!(items.iter().any(|o| matches!(o, Output::Result(_))));
        assert_eq!(items.last(), Some(&Output::End));
        assert_eq!(rx.try_next(), Some(None));
    }

    #[tokio::test]
    async fn dropped_sender_ends_with_unexpected_end_and_dropped_stream_abandons() {
        let (tx, rx) = output_channel();
        tx.push(Output::ExecutionCount(1));
        drop(tx);
        assert_eq!(rx.next().await, Some(Output::ExecutionCount(1)));
        assert_eq!(
            rx.next().await,
            Some(Output::Error(ExecError::unexpected_end()))
        );
        assert_eq!(rx.next().await, Some(Output::End));
        assert_eq!(rx.next().await, None);

        let (tx, rx) = output_channel();
        assert!(!tx.is_abandoned());
        drop(rx);
        tx.abandoned().await;
        assert!(tx.is_abandoned());
    }
}
