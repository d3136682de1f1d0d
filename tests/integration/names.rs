//! Names for remote ends (issue 28): a real resolver (dnsmasq) in the peer namespace answers a
//! lookup made in the daemon's; the daemon learns the name from the answer on the wire, the
//! policy classifies by it, and `status` shows it.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Stdio};

use crate::support::cgroup::TestCgroup;
use crate::support::daemon::{DaemonProcess, wait_until};
use crate::support::netns::{Netns, NetnsPair};

/// Asks `argv[2]`:53 for the A record of `argv[1]` over UDP, connects to the answer's address
/// and to `argv[4]` (an address no lookup named), both at port `argv[3]`, and holds both
/// connections until its stdin closes.
const CLIENT: &str = r#"
import socket, struct, sys
name, resolver, port, unnamed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
query = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
query += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
query += struct.pack("!HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(query, (resolver, 53))
answer = u.recv(512)
address = socket.inet_ntoa(answer[-4:])
named = socket.create_connection((address, port))
other = socket.create_connection((unnamed, port))
sys.stdin.read()
"#;

const POLICY: &str = "classes = { named = {}, default = {} }\n\
    local shaper = require(\"shaper\")\n\
    function classify(conn)\n\
    \x20 if shaper.match_domain(conn.remote_host, \"*.example.test\") then return \"named\" end\n\
    \x20 return \"default\"\n\
    end\n";

/// dnsmasq in `ns`, answering for `video.example.test` with `address` (A only), TTL 30 s.
fn resolver(ns: &Netns, listen: &str, address: &str) -> KillOnDrop {
    let child = ns
        .command("dnsmasq")
        .args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            "--bind-interfaces",
            &format!("--listen-address={listen}"),
            &format!("--host-record=video.example.test,{address}"),
            "--local-ttl=30",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dnsmasq (apt-get install dnsmasq-base)");
    KillOnDrop(child)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connection<'a>(status: &'a serde_json::Value, remote: &str) -> Option<&'a serde_json::Value> {
    status["connections"]
        .as_array()?
        .iter()
        .find(|c| c["connection"].as_str().is_some_and(|t| t.contains(remote)))
}

/// A name learnt from a DNS answer reaches the policy (`conn.remote_host`, matched with
/// `shaper.match_domain`) and `status`, for the connection to the answer's address only; an
/// address no lookup named has none and goes to `default`, though an answer nobody asked for
/// (forged, from port 53) names it.
#[test]
fn a_name_from_a_dns_answer_classifies_the_connection() {
    let pair = NetnsPair::new();
    let cgroup = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let b4 = NetnsPair::B_V4.to_string();
    let _dns = resolver(&pair.b, &b4, &b4);
    let port = 5930;
    for addr in [
        SocketAddr::new(NetnsPair::b_addr(4), port),
        SocketAddr::new(NetnsPair::b_addr(6), port),
    ] {
        let listener = pair.b.run(|| TcpListener::bind(addr).unwrap());
        std::thread::spawn(move || {
            let held: Vec<_> = listener.incoming().collect();
            drop(held);
        });
    }
    let daemon = DaemonProcess::start_bpf_policy(
        &pair.a,
        dir.path(),
        &cgroup,
        POLICY,
        &["--interval", "1s"],
    );
    // The forged answer: `forged.example.test` is the IPv6 peer, from port 53, unasked.
    let forged = {
        let mut m = vec![0x77, 0x77, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        for label in ["forged", "example", "test"] {
            m.push(label.len() as u8);
            m.extend(label.as_bytes());
        }
        m.extend([0, 0, 28, 0, 1, 0xc0, 12, 0, 28, 0, 1, 0, 0, 1, 0, 0, 16]);
        m.extend(NetnsPair::B_V6.octets());
        m
    };
    pair.b.run(|| {
        let s = std::net::UdpSocket::bind((NetnsPair::B_V6, 53)).unwrap();
        s.send_to(&forged, (NetnsPair::A_V6, 40_000)).unwrap();
    });
    let script = dir.path().join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let mut cmd = pair.a.command("python3");
    cmd.arg(&script)
        .args([
            "video.example.test",
            &b4,
            &port.to_string(),
            &NetnsPair::B_V6.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let _procs = cgroup.enter(&mut cmd);
    let mut client = cmd.spawn().expect("python3");
    let named = format!("{b4}:{port}");
    let unnamed = format!("[{}]:{port}", NetnsPair::B_V6);
    daemon.wait_for_all(10, "the named connection classified by its name", |s| {
        connection(s, &named).is_some_and(|c| c["class"] == "named")
            && connection(s, &unnamed).is_some()
    });
    let status = daemon.status_all();
    let (n, u) = (
        connection(&status, &named).unwrap(),
        connection(&status, &unnamed).unwrap(),
    );
    assert_eq!(n["remote_host"], "video.example.test", "{n:#}");
    assert!(u.get("remote_host").is_none(), "{u:#}");
    assert_eq!(u["class"], "default", "{u:#}");
    let text = daemon.control(&["status", "--all"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains(&named) && l.contains("(video.example.test)")),
        "status shows the name with the connection:\n{text}"
    );
    client.stdin.take().unwrap().write_all(b"").unwrap();
    wait_until(10, "the client gone", || match client.try_wait() {
        Ok(Some(_)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
}
