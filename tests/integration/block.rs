//! Blocking (`block = true` on a class): the planner sends the class's connections to a leaf
//! that drops every packet, and in the kernel a blocked connection's bytes do not arrive either
//! way while another connection of the same process is untouched.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use shaper::policy::{ClassDef, Decision};
use shaper::process::Connection;
use shaper::scan::Proto;
use shaper::shape::model::Leaf;
use shaper::shape::{Capacity, Features, Handles, PlanInput, plan};

use crate::support::daemon::{DaemonProcess, allowance};
use crate::support::netns::NetnsPair;
use crate::support::shaping::{class_set, decision, flow};

#[test]
fn a_blocked_class_sends_its_connections_to_a_dropping_leaf() {
    let blocked = ClassDef {
        name: "blocked".into(),
        block: true,
        ..ClassDef::default_class()
    };
    let classes = class_set(vec![blocked]);
    let flows = [
        // A limit from classify does not give a blocked connection a leaf of its own.
        (
            flow(Proto::Tcp, 4, 40001, 443, 1),
            decision("blocked", "1mbit"),
        ),
        (flow(Proto::Tcp, 4, 40002, 443, 2), decision("default", "")),
    ];
    let connections: Vec<Connection> = flows
        .iter()
        .map(|(s, _)| Connection {
            socket: s.clone(),
            owner: None,
            remote_host: None,
        })
        .collect();
    let decisions: Vec<Decision> = flows.iter().map(|(_, d)| d.clone()).collect();
    let desired = plan(
        &PlanInput {
            classes: &classes,
            connections: &connections,
            decisions: &decisions,
            capacity: Capacity::default(),
            features: Features { fq_codel: true },
            mtu: 1500,
            by_priority: false,
        },
        &mut Handles::default(),
    );
    let target = |cookie: u64| desired.targets[&flows[cookie as usize - 1].0.key()];
    for (tree, side) in [
        (&desired.upload, target(1).up.unwrap()),
        (&desired.download, target(1).down.unwrap()),
    ] {
        assert!(side.blocked);
        assert_eq!(tree.leaves[&side.leaf], Leaf::Pfifo { limit: 0 });
        assert_eq!(
            side.process, tree.default_minor,
            "the process's next connections start in default, not blocked"
        );
        assert_eq!(
            tree.leaves
                .values()
                .filter(|l| **l == Leaf::Pfifo { limit: 0 })
                .count(),
            1,
            "one dropping leaf, the class's: {tree:?}"
        );
        assert!(
            tree.filters.values().any(|f| f.class == side.leaf),
            "the connection's filter points at it"
        );
    }
    let open = target(2).up.unwrap();
    assert!(!open.blocked);
    assert_ne!(desired.upload.leaves[&open.leaf], Leaf::Pfifo { limit: 0 });
}

/// Reads from `stream` until `want` bytes have arrived, it closes, or `wait` has passed; how
/// many arrived. Waiting for what must arrive allows a loaded machine the whole
/// [`allowance`]; a wait for what must *not* arrive can be short, since a slow machine only
/// makes it less likely to arrive (and what the kernel holds is checked besides).
fn received(stream: &mut TcpStream, want: usize, wait: Duration) -> usize {
    let deadline = std::time::Instant::now() + wait;
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < want {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    total
}

#[test]
fn a_blocked_connection_gets_nothing_through_and_its_neighbour_still_works() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let listen = || {
        pair.b
            .run(|| TcpListener::bind((NetnsPair::B_V4, 0)).unwrap())
    };
    let (blocked_listener, open_listener) = (listen(), listen());
    let blocked_port = blocked_listener.local_addr().unwrap().port();
    let script = dir.path().join("policy.lua");
    std::fs::write(
        &script,
        format!(
            "classes = {{ blocked = {{ block = true }} }}\n\
             function classify(conn)\n\
             \x20 if conn.remote_port == {blocked_port} then return \"blocked\" end\n\
             end\n"
        ),
    )
    .unwrap();
    // Both connections belong to this (test) process.
    let connect = |l: &TcpListener| {
        let addr = l.local_addr().unwrap();
        let client = pair.a.run(|| TcpStream::connect(addr).unwrap());
        let (server, _) = l.accept().unwrap();
        (client, server)
    };
    let (mut blocked_client, mut blocked_server) = connect(&blocked_listener);
    let (mut open_client, mut open_server) = connect(&open_listener);
    let daemon = DaemonProcess::start(&pair.a, dir.path(), &["--script", script.to_str().unwrap()]);
    daemon.wait_for(10, "the blocked connection classified", |s| {
        s["interfaces"][0]["state"] == "shaping"
            && s["classes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "blocked" && c["connections"] == 1)
    });
    let payload = [7u8; 1000];
    // Upload (the interface's egress) and download (the IFB's), each way.
    blocked_client.write_all(&payload).unwrap();
    blocked_server.write_all(&payload).unwrap();
    open_client.write_all(&payload).unwrap();
    open_server.write_all(&payload).unwrap();
    assert_eq!(received(&mut open_server, 1000, allowance(3)), 1000);
    assert_eq!(received(&mut open_client, 1000, allowance(3)), 1000);
    assert_eq!(
        received(&mut blocked_server, 1000, Duration::from_millis(1500)),
        0,
        "upload of the blocked connection arrived"
    );
    assert_eq!(
        received(&mut blocked_client, 1000, Duration::from_millis(500)),
        0,
        "download of the blocked connection arrived"
    );
    let qdiscs = pair
        .a
        .command("tc")
        .args(["-s", "qdisc", "show", "dev", "veth0"])
        .output()
        .unwrap();
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    assert!(
        qdiscs.contains("pfifo") && qdiscs.contains("limit 0p"),
        "{qdiscs}"
    );
    let text = String::from_utf8_lossy(&daemon.control(&["status"]).stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("blocked ") && l.contains(" blocked ")),
        "status shows the class as blocked: {text}"
    );
    // Stopped, shaper's leaf goes and the blocked connection flows again (at TCP's next
    // retransmission, whose backoff grows with the time the test took).
    drop(daemon);
    assert_eq!(
        received(&mut blocked_server, 1000, allowance(5)),
        1000,
        "retransmitted once unblocked"
    );
}

/// What arrives on the next connection to `listener` within `wait`, up to `want` bytes (0 if
/// none is accepted).
fn first_connection_bytes(listener: &TcpListener, want: usize, wait: Duration) -> usize {
    listener.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        if let Ok((mut stream, _)) = listener.accept() {
            stream.set_nonblocking(false).unwrap();
            return received(
                &mut stream,
                want,
                deadline.saturating_duration_since(std::time::Instant::now()),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    0
}

#[test]
fn with_bpf_a_blocked_connection_gets_nothing_through_and_its_neighbour_still_works() {
    let pair = NetnsPair::new();
    let cgroup = crate::support::cgroup::TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let listen = || {
        pair.b
            .run(|| TcpListener::bind((NetnsPair::B_V4, 0)).unwrap())
    };
    let (blocked, open) = (listen(), listen());
    let port = |l: &TcpListener| l.local_addr().unwrap().port();
    let policy = format!(
        "classes = {{ blocked = {{ block = true }} }}\n\
         function classify(conn)\n\
         \x20 if conn.remote_port == {} then return \"blocked\" end\n\
         end\n",
        port(&blocked)
    );
    let daemon = DaemonProcess::start_bpf_policy(&pair.a, dir.path(), &cgroup, &policy, &[]);
    // One process, two connections, each written to once the daemon has decided it (a
    // connection's first packets go to default until then): told by status, not by a sleep.
    let b = NetnsPair::B_V4;
    let mut cmd = pair.a.command("bash");
    cmd.arg("-c")
        .arg(format!(
            "exec 3<>/dev/tcp/{b}/{}; exec 4<>/dev/tcp/{b}/{}; read go; \
             printf blocked >&3; printf open >&4; read done",
            port(&blocked),
            port(&open)
        ))
        .stdin(std::process::Stdio::piped());
    let procs = cgroup.enter(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    drop(procs);
    daemon.wait_for(5, "the blocked connection classified", |s| {
        s["classes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "blocked" && c["connections"] == 1)
    });
    let mut go = child.stdin.take().unwrap();
    go.write_all(b"go\n").unwrap();
    let open_bytes = first_connection_bytes(&open, 4, allowance(3));
    let blocked_bytes = first_connection_bytes(&blocked, 7, Duration::from_millis(1500));
    drop(go);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        open_bytes,
        4,
        "the other connection works: {}",
        daemon.log_text()
    );
    assert_eq!(blocked_bytes, 0, "the blocked one gets nothing through");
}
