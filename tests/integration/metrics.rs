//! `shaper metrics` and `metrics_listen` against a daemon in a namespace moving traffic: the
//! output parses with the Prometheus project's own OpenMetrics parser (Python's
//! `prometheus_client`), and its byte counters agree with the daemon's status.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;

use serde_json::Value;

use crate::support::daemon::DaemonProcess;
use crate::support::netns::NetnsPair;

/// Parses `cli_text` and what `http://127.0.0.1:9639/metrics` (in the namespace) serves with
/// `prometheus_client`'s OpenMetrics parser: `{"cli": {sample: [[labels, value]…]}, "http": …,
/// "content_type": …}`.
const PARSE: &str = r#"
import json, sys, urllib.error, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
def parse(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append([s.labels, s.value])
    return out
cli = sys.stdin.read()
with urllib.request.urlopen("http://127.0.0.1:9639/metrics", timeout=60) as r:
    ctype, http = r.headers["Content-Type"], r.read().decode()
try:
    urllib.request.urlopen("http://127.0.0.1:9639/", timeout=60)
    sys.exit("/ should be 404")
except urllib.error.HTTPError as e:
    assert e.code == 404, e.code
"#;

const PARSE_END: &str = r#"
print(json.dumps({"cli": parse(cli), "http": parse(http), "content_type": ctype}))
"#;

/// The value of sample `name` whose labels include `labels`.
fn sample(parsed: &Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parsed[name].as_array()?.iter().find_map(|s| {
        labels
            .iter()
            .all(|(k, v)| s[0][k] == *v)
            .then(|| s[1].as_f64().unwrap())
    })
}

/// A status usage figure (integer bytes in `status --json`).
fn bytes(v: &Value) -> f64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("a usage figure in bytes: {v}")) as f64
}

#[test]
fn metrics_parse_and_their_byte_counters_match_the_status() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--metrics-listen", "127.0.0.1:9639"]);
    daemon.wait_for(10, "shaping", |s| s["interfaces"][0]["state"] == "shaping");
    // 2 MB up from a (this test process) to b, on a connection the daemon sees.
    let listener = pair
        .b
        .run(|| TcpListener::bind((NetnsPair::B_V4, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let mut client = pair.a.run(|| TcpStream::connect(addr).unwrap());
    let (mut server, _) = listener.accept().unwrap();
    daemon.wait_for(10, "the connection is seen", |s| {
        s["classes"][0]["connections"].as_u64() >= Some(1)
    });
    // Both ends stay open: a closed connection's last bytes are not seen (only the link's).
    let reader = std::thread::spawn(move || {
        let mut sink = vec![0u8; 2_000_000];
        server.read_exact(&mut sink).unwrap();
        server
    });
    client.write_all(&vec![7u8; 2_000_000]).unwrap();
    let server = reader.join().unwrap();
    daemon.wait_for(10, "the bytes are counted", |s| {
        bytes(&s["usage"]["day"]["up"]) >= 2_000_000.0
            && bytes(&s["classes"][0]["today"]["up"]) >= 2_000_000.0
    });

    // Status, metrics, status: the counters lie between the two (within one cycle).
    let before = daemon.status();
    let out = daemon.control(&["metrics"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = daemon.status();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    // UDP is counted too (with the BPF classifier): the help says so, not "TCP bytes".
    assert!(
        text.contains("# HELP shaper_bytes Bytes per class since the daemon started: TCP, and UDP")
            && !text.contains("TCP bytes"),
        "{text}"
    );

    let mut python = pair
        .a
        .command("/usr/bin/python3")
        .args(["-c", &format!("{PARSE}{PARSE_END}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (apt-get install python3-prometheus-client)");
    python
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let parsed = python.wait_with_output().unwrap();
    assert!(
        parsed.status.success(),
        "the parser refused it: {}\n{text}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let parsed: Value = serde_json::from_slice(&parsed.stdout).unwrap();
    assert_eq!(
        parsed["content_type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let cli = &parsed["cli"];
    let up = [("direction", "up")];
    let link = sample(cli, "shaper_link_bytes_total", &up).unwrap();
    let (low, high) = (
        bytes(&before["usage"]["day"]["up"]),
        bytes(&after["usage"]["day"]["up"]),
    );
    assert!(low <= link && link <= high, "{low} <= {link} <= {high}");
    let class = before["classes"][0]["name"].as_str().unwrap();
    let class_up = [("direction", "up"), ("class", class)];
    let counted = sample(cli, "shaper_bytes_total", &class_up).unwrap();
    let (low, high) = (
        bytes(&before["classes"][0]["today"]["up"]),
        bytes(&after["classes"][0]["today"]["up"]),
    );
    assert!(
        low <= counted && counted <= high && counted >= 2e6,
        "{low} <= {counted} <= {high}"
    );
    // This process's name, not its pid, labels its bytes.
    let me = std::fs::read_to_string("/proc/self/comm").unwrap();
    let mine = sample(
        cli,
        "shaper_process_bytes_total",
        &[("direction", "up"), ("process", me.trim())],
    );
    assert!(mine >= Some(2e6), "{mine:?}: {text}");
    assert!(sample(cli, "shaper_cycles_total", &[]).unwrap() >= 1.0);
    assert!(sample(cli, "shaper_cycle_stage_seconds", &[("stage", "total")]).is_some());
    assert_eq!(sample(cli, "shaper_policy_errors_total", &[]), Some(0.0));
    // The same families over HTTP, a little later.
    let http = &parsed["http"];
    let served = sample(http, "shaper_link_bytes_total", &up).unwrap();
    assert!(served >= link, "{served} >= {link}");
    drop((client, server));
}
