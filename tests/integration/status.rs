//! What `shaper status` shows, against a daemon in a namespace: numbers in `--json`, tc handles
//! that name what `tc class show` lists.

use std::net::{TcpListener, TcpStream};

use crate::support::daemon::DaemonProcess;
use crate::support::netns::NetnsPair;

/// A TCP connection from `a` to `b`, kept open by the returned streams.
fn connection(pair: &NetnsPair) -> (TcpListener, TcpStream, TcpStream) {
    let listener = pair
        .b
        .run(|| TcpListener::bind((NetnsPair::B_V4, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let client = pair.a.run(|| TcpStream::connect(addr).unwrap());
    let (server, _) = listener.accept().unwrap();
    (listener, client, server)
}

#[test]
fn status_json_has_integers_and_handles_tc_lists() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let _conn = connection(&pair);
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--connection-rate", "1mbit:3mbit"]);
    daemon.wait_for(10, "shaping the connection", |s| {
        s["interfaces"][0]["state"] == "shaping" && s["link"].is_object()
    });
    let out = daemon.control(&["status", "--all", "--json"]);
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        s["connection_rate"],
        serde_json::json!({"up": 1_000_000, "down": 3_000_000})
    );
    assert!(s["rate"].is_null(), "unset is null: {s}");
    assert!(s["usage"]["month"]["up"].is_u64(), "{s}");
    let conn = s["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["connection"].as_str().unwrap().starts_with("tcp "))
        .unwrap_or_else(|| panic!("the connection: {s:#}"));
    assert_eq!(conn["ceil"]["up"], 1_000_000, "{conn}");
    assert!(conn["rate_down"].is_u64(), "{conn}");
    let handle = conn["handle"].as_str().expect("a leaf handle");
    let tc = crate::support::output(pair.a.command("tc").args(["class", "show", "dev", "veth0"]));
    let tc = String::from_utf8_lossy(&tc.stdout);
    let line = tc
        .lines()
        .find(|l| l.contains(&format!("class htb {handle} ")))
        .unwrap_or_else(|| panic!("{handle} in tc:\n{tc}"));
    assert!(line.contains("ceil 1Mbit"), "{line}");
    for c in s["classes"].as_array().unwrap() {
        let h = c["handle"].as_str().expect("a class handle");
        assert!(tc.contains(&format!("class htb {h} ")), "{h} in tc:\n{tc}");
    }
    let text = String::from_utf8_lossy(&daemon.control(&["status", "--all"]).stdout).into_owned();
    assert!(
        text.contains(handle) && text.contains("1mbit:3mbit"),
        "{text}"
    );
}
