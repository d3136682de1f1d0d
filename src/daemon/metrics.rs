//! Prometheus metrics: the daemon's figures in the OpenMetrics text format, printed by
//! `shaper metrics` and served on `metrics_listen` (`GET /metrics`).
//!
//! Built with `prometheus-client` (the Prometheus project's Rust client) from a fresh registry
//! per scrape: the daemon's own figures are the truth, so nothing is kept twice. Counters count
//! since the daemon started (a restart is a counter reset, which `rate()` handles). Labels
//! name processes, users and classes, never pids or connections, and accounting keeps at most
//! [`crate::account::TOTAL_NAMES`] names per kind (later ones count under `(other)`), so the
//! series stay bounded.
//!
//! The HTTP side is a small HTTP/1.0 responder on the daemon's tokio runtime: one route, one
//! answer per connection, a timeout and a size limit on the request. A server crate (hyper,
//! axum) would bring far more code than this needs.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Daemon;
use crate::account::UsageKey;

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge<f64, AtomicU64>>;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn counters(registry: &mut Registry, name: &str, help: &str) -> Counters {
    let family = Counters::default();
    registry.register(name, help, family.clone());
    family
}

fn gauges(registry: &mut Registry, name: &str, help: &str) -> Gauges {
    let family = Gauges::default();
    registry.register(name, help, family.clone());
    family
}

/// `[("direction", "up"), …extra]` and the same with `"down"`.
fn both(extra: &[(&'static str, &str)]) -> [Labels; 2] {
    ["up", "down"].map(|d| {
        let mut labels = vec![("direction", d.to_string())];
        labels.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        labels
    })
}

/// The daemon's metrics now, in the OpenMetrics text format.
pub fn render(daemon: &Daemon) -> String {
    let mut registry = Registry::with_prefix("shaper");
    let link = counters(
        &mut registry,
        "link_bytes",
        "Bytes through the shaped interfaces at the IP layer (their own counters less each frame's link-layer header) since the daemon started",
    );
    let unattributed = counters(
        &mut registry,
        "unattributed_bytes",
        "Bytes through the shaped interfaces that no process was charged for since the daemon started (ICMP, ARP, retransmitted payload, sockets no owner was found for)",
    );
    let class_bytes = counters(
        &mut registry,
        "bytes",
        "Bytes per class since the daemon started: TCP, and UDP with the BPF classifier (sock_diag counts no UDP bytes)",
    );
    let user_bytes = counters(
        &mut registry,
        "user_bytes",
        "Bytes per user since the daemon started: TCP, and UDP with the BPF classifier (sock_diag counts no UDP bytes)",
    );
    let process_bytes = counters(
        &mut registry,
        "process_bytes",
        "Bytes per process name since the daemon started: TCP, and UDP with the BPF classifier (sock_diag counts no UDP bytes)",
    );
    for (key, u) in daemon.accounting.totals().usage() {
        let (family, extra) = match key {
            UsageKey::Link => (&link, vec![]),
            UsageKey::Unattributed => (&unattributed, vec![]),
            UsageKey::Class(n) => (&class_bytes, vec![("class", n.as_str())]),
            UsageKey::User(n) => (&user_bytes, vec![("user", n.as_str())]),
            UsageKey::Process(n) => (&process_bytes, vec![("process", n.as_str())]),
        };
        let [up, down] = both(&extra);
        family.get_or_create(&up).inc_by(u.up.bytes());
        family.get_or_create(&down).inc_by(u.down.bytes());
    }

    let class_rate = gauges(
        &mut registry,
        "class_rate_bits_per_second",
        "Recent rate per class (2 s average)",
    );
    let class_connections = gauges(&mut registry, "class_connections", "Connections per class");
    let class_ceil = gauges(
        &mut registry,
        "class_ceil_bits_per_second",
        "A class's ceiling, for classes with one (each = the class, process or connection)",
    );
    let figures = daemon.accounting.classes();
    if let Some(outcome) = &daemon.last {
        for c in outcome.classes.classes.values() {
            let f = figures.get(&*c.name).copied().unwrap_or_default();
            let [up, down] = both(&[("class", &*c.name)]);
            class_rate.get_or_create(&up).set(f.rate_up);
            class_rate.get_or_create(&down).set(f.rate_down);
            class_connections
                .get_or_create(&vec![("class", c.name.to_string())])
                .set(f.connections as f64);
            let [up, down] = both(&[("class", &*c.name), ("each", c.each.as_str())]);
            for (labels, ceil) in [(up, c.ceil.up), (down, c.ceil.down)] {
                if let Some(ceil) = ceil {
                    class_ceil
                        .get_or_create(&labels)
                        .set(ceil.bits_per_sec() as f64);
                }
            }
        }
    }

    let process_rate = gauges(
        &mut registry,
        "process_rate_bits_per_second",
        "Recent rate per process name (2 s average)",
    );
    let mut by_name: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for flow in daemon.cycle.flows().iter() {
        if let Some(p) = flow.process {
            let r = by_name.entry(p.name.to_string()).or_default();
            r.0 += flow.stats.rate_up;
            r.1 += flow.stats.rate_down;
        }
    }
    for (name, (rate_up, rate_down)) in by_name {
        let [up, down] = both(&[("process", &name)]);
        process_rate.get_or_create(&up).set(rate_up);
        process_rate.get_or_create(&down).set(rate_down);
    }

    let capacity = gauges(
        &mut registry,
        "link_limit_bits_per_second",
        "The link's capacity in force (uplink/downlink narrowed by --rate), when set",
    );
    let cap = daemon.cycle.capacity();
    let [up, down] = both(&[]);
    for (labels, rate) in [(up, cap.up), (down, cap.down)] {
        if let Some(rate) = rate {
            capacity
                .get_or_create(&labels)
                .set(rate.bits_per_sec() as f64);
        }
    }

    let stages = gauges(
        &mut registry,
        "cycle_stage_seconds",
        "How long each stage of the last cycle took",
    );
    for (stage, d) in daemon.timings.stages() {
        stages
            .get_or_create(&vec![("stage", stage.to_string())])
            .set(d.as_secs_f64());
    }
    let cycles = Counter::<u64>::default();
    registry.register(
        "cycles",
        "Cycles run since the daemon started",
        cycles.clone(),
    );
    cycles.inc_by(daemon.cycles);
    let errors = Counter::<u64>::default();
    registry.register(
        "policy_errors",
        "Policy errors since the policy was last loaded (a reload resets it)",
        errors.clone(),
    );
    errors.inc_by(
        daemon
            .engine()
            .errors()
            .entries()
            .iter()
            .map(|e| e.count)
            .sum(),
    );
    if let Some(reports) = daemon.report_stats() {
        let fast = counters(
            &mut registry,
            "fast_path_reports",
            "New-socket reports the kernel could not make at once since the classifier was \
             attached (a flood of new sockets): deferred (classified by their process's class) \
             or lost (the queue was full; made again on a later packet); close_lost: close \
             reports lost so (their sockets' last bytes are unattributed)",
        );
        fast.get_or_create(&vec![("outcome", "deferred".to_string())])
            .inc_by(reports.deferred);
        fast.get_or_create(&vec![("outcome", "lost".to_string())])
            .inc_by(reports.lost + reports.exec_lost);
        fast.get_or_create(&vec![("outcome", "close_lost".to_string())])
            .inc_by(reports.close_lost);
    }
    let events = counters(
        &mut registry,
        "events",
        "Policy events (shaper.notify) passed since the daemon started, per name",
    );
    for (name, count) in daemon.events.counts() {
        events
            .get_or_create(&vec![("name", name.clone())])
            .inc_by(*count);
    }
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// The longest request head the metrics responder reads.
const MAX_HEAD: usize = 8 * 1024;
/// How long a metrics client may take to send its whole request head: a scraper sends it at
/// once, so a client still sending after this is slow or hostile and loses its slot.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a metrics client may take to take the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Metrics clients served at once. Their slots are their own: however many connect, the
/// control socket's clients (root's `status`, `reload`, `stop`) are not kept waiting.
pub const MAX_CLIENTS: usize = 32;

/// Whether `head` holds a whole request head: an empty line, after CRLF or bare-LF lines
/// (RFC 9112 §2.2 lets a server take a bare LF as a line end, and some clients send them).
fn head_complete(head: &[u8]) -> bool {
    head.windows(2).any(|w| w == b"\n\n") || head.windows(3).any(|w| w == b"\n\r\n")
}

/// One HTTP/1.0 answer with `Connection: close`; `extra` is more header lines, each ending in
/// CRLF.
fn answer(status: &str, content_type: &str, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Turns away a client beyond [`MAX_CLIENTS`] with a `503` at once, without a task of its own
/// (so a flood of clients costs no memory): what it sent already is read and dropped (closing
/// with unread data would reset the connection and lose the answer), then the answer is
/// written without waiting (a new socket's send buffer has room) and the connection closed.
pub fn refuse_busy(stream: tokio::net::TcpStream) {
    use std::io::{Read, Write};
    let Ok(mut stream) = stream.into_std() else {
        return;
    };
    let mut sink = [0u8; 2048];
    for _ in 0..4 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let text = answer(
        "503 Service Unavailable",
        "text/plain",
        "Retry-After: 1\r\n",
        &format!("shaper is serving {MAX_CLIENTS} metrics clients already; try again\n"),
    );
    let _ = stream.write(text.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Answers one HTTP connection: `GET /metrics` gets `metrics().await` (or 503 when it is
/// `None`: the daemon is stopping); anything else 404 or 405; a head not sent within
/// [`HEAD_TIMEOUT`] a 408.
pub async fn serve_http<F>(mut stream: tokio::net::TcpStream, metrics: F)
where
    F: std::future::Future<Output = Option<String>>,
{
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(HEAD_TIMEOUT, async {
        while !head_complete(&head) && head.len() < MAX_HEAD {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        let text = answer(
            "408 Request Timeout",
            "text/plain",
            "",
            &format!("no request within {HEAD_TIMEOUT:?}\n"),
        );
        let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(text.as_bytes())).await;
        let _ = stream.shutdown().await;
        return;
    }
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(b"");
    let mut words = line.split(|&b| b == b' ');
    let (method, target) = (words.next(), words.next());
    let (status, content_type, body) = match (method, target) {
        (Some(b"GET"), Some(b"/metrics")) => match metrics.await {
            Some(text) => ("200 OK", CONTENT_TYPE, text),
            None => (
                "503 Service Unavailable",
                "text/plain",
                "shaper is stopping\n".to_string(),
            ),
        },
        (Some(b"GET"), _) => (
            "404 Not Found",
            "text/plain",
            "shaper serves GET /metrics only\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "shaper serves GET /metrics only\n".to_string(),
        ),
    };
    let text = answer(status, content_type, "", &body);
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(text.as_bytes())).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod http_tests {
    use super::head_complete;

    #[test]
    fn a_head_ends_at_an_empty_line_after_crlf_or_bare_lf() {
        assert!(head_complete(b"GET /metrics HTTP/1.0\r\n\r\n"));
        assert!(head_complete(b"GET /metrics HTTP/1.0\n\n"));
        assert!(head_complete(b"GET /metrics HTTP/1.1\nHost: x\r\n\r\n"));
        assert!(head_complete(b"GET /metrics HTTP/1.1\r\nHost: x\n\n"));
        assert!(!head_complete(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"));
        assert!(!head_complete(b"GET /metrics HTTP/1.1\n"));
    }
}
