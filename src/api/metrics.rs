//! `GET /metrics` (contract §5.2): the latest sample of the 5-second sampler, as the
//! contract's JSON, or as Prometheus text when asked for (`?format=prometheus`, or an
//! `Accept` header preferring `text/plain` / OpenMetrics, as scrapers send).

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::{Agent, json_response};
use crate::metrics::prometheus::{self, AgentGauges};
use crate::transport::{Body, empty_body, full_body};

pub fn metrics(agent: &Agent, req: &Request<Incoming>) -> Response<Body> {
    let Some(sample) = agent.metrics.latest() else {
        let mut resp = Response::new(empty_body());
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return resp;
    };
    let mut resp = if wants_prometheus(req) {
        let gauges = AgentGauges {
            rss_bytes: AgentGauges::own_rss_bytes(),
            processes: agent.processes.live_count(),
            watchers: agent.watcher_count(),
            connections: agent.connections.get(),
            reaped_orphans: crate::sys::reaper::global().reaped_orphans(),
        };
        let mut r = Response::new(full_body(prometheus::render(&sample, &gauges)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(prometheus::CONTENT_TYPE),
        );
        r
    } else {
        json_response(StatusCode::OK, &sample)
    };
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn wants_prometheus(req: &Request<Incoming>) -> bool {
    if super::query_pairs(req.uri())
        .any(|(k, v)| k == "format" && (v == "prometheus" || v == "text"))
    {
        return true;
    }
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    // JSON stays the default for `*/*` and `application/json`.
    let first = accept.split(',').next().unwrap_or("").trim();
    first.starts_with("text/plain") || first.starts_with("application/openmetrics-text")
}
