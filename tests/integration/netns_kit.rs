//! The namespace kit itself: real TCP and UDP bytes cross the veth, and nothing is left behind,
//! whether a test ends normally, panics, or was killed before it could clean up.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Mutex;

use crate::support::netns::{self, NetnsPair, PREFIX};

fn exchange_tcp(pair: &NetnsPair, family: u8) {
    let listen: SocketAddr = (NetnsPair::b_addr(family), 0).into();
    let listener = pair.b.run(|| TcpListener::bind(listen).expect("bind in b"));
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"world").unwrap();
        (buf, peer)
    });
    let mut client = pair
        .a
        .run(|| TcpStream::connect(addr).expect("connect from a"));
    client.write_all(b"hello").unwrap();
    let mut reply = [0u8; 5];
    client.read_exact(&mut reply).unwrap();
    let (got, peer) = server.join().unwrap();
    assert_eq!(&got, b"hello");
    assert_eq!(&reply, b"world");
    assert_eq!(
        peer.ip(),
        NetnsPair::a_addr(family),
        "traffic came over the veth"
    );
}

#[test]
fn tcp_bytes_cross_the_veth_over_ipv4_and_ipv6() {
    let pair = NetnsPair::new();
    exchange_tcp(&pair, 4);
    exchange_tcp(&pair, 6);
}

#[test]
fn udp_datagrams_cross_the_veth() {
    let pair = NetnsPair::new();
    let server = pair
        .b
        .run(|| UdpSocket::bind((NetnsPair::B_V4, 0)).unwrap());
    let client = pair
        .a
        .run(|| UdpSocket::bind((NetnsPair::A_V4, 0)).unwrap());
    client
        .send_to(b"ping", server.local_addr().unwrap())
        .unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping");
    assert_eq!(from, client.local_addr().unwrap());
}

#[test]
fn namespaces_are_isolated_from_the_host() {
    let pair = NetnsPair::new();
    let links = pair.a.ip(&["-o", "link", "show"]);
    assert!(links.contains("veth0") && links.contains("lo"), "{links}");
    assert_eq!(links.lines().count(), 2, "only lo and the veth: {links}");
    let host = netns::run_ip(&["-o", "addr", "show"]);
    assert!(
        !host.contains("10.77.0.1"),
        "test addresses must not appear on the host"
    );
}

#[test]
fn child_processes_run_inside_the_namespace() {
    let pair = NetnsPair::new();
    let out = pair
        .a
        .command("ip")
        .args(["-o", "-4", "addr", "show", "dev", "veth0"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.77.0.1/24"));
}

#[test]
fn namespaces_are_removed_on_drop() {
    let names = {
        let pair = NetnsPair::new();
        let names = [pair.a.name().to_string(), pair.b.name().to_string()];
        let listed = netns::list_netns();
        assert!(names.iter().all(|n| listed.contains(n)), "{listed:?}");
        names
    };
    let listed = netns::list_netns();
    assert!(
        names.iter().all(|n| !listed.contains(n)),
        "left behind: {listed:?}"
    );
}

#[test]
fn namespaces_are_removed_when_a_test_panics() {
    let names = Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let pair = NetnsPair::new();
        names
            .lock()
            .unwrap()
            .extend([pair.a.name().to_string(), pair.b.name().to_string()]);
        panic!("deliberate failure inside a network test");
    });
    assert!(result.is_err(), "the closure panicked");
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    let listed = netns::list_netns();
    assert!(
        names.iter().all(|n| !listed.contains(n)),
        "left behind: {listed:?}"
    );
}

#[test]
fn namespaces_of_killed_test_runs_are_swept() {
    // A pid above pid_max never belongs to a live process, like the pid of a killed test run.
    let stale = format!("{PREFIX}4194999-0-a");
    netns::run_ip(&["netns", "add", &stale]);
    netns::sweep_stale();
    let listed = netns::list_netns();
    if listed.contains(&stale) {
        let _ = netns::run_ip(&["netns", "del", &stale]);
        panic!("stale namespace {stale} was not swept: {listed:?}");
    }
}
