//! Scan and process lookup against a real kernel: a probe process in a namespace opens TCP and
//! UDP sockets over IPv4 and IPv6, and the scanner must find each with its owner.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shaper::process::{ProcessTable, Snapshot};
use shaper::scan::{self, Backend, Proto, Socket, State};

use crate::support::netns::NetnsPair;
use crate::support::probe::{PROBE_NAME, PROBE_UID, Probe, start_sinks};

fn snapshot_in(pair: &NetnsPair, backend: Backend, table: &mut ProcessTable) -> Snapshot {
    pair.a.run(|| {
        let mut source = scan::open(backend).expect("open scanner");
        let sockets = source.scan().expect("scan");
        table.update(&sockets);
        table.snapshot(sockets)
    })
}

fn find(snap: &Snapshot, proto: Proto, local: SocketAddr) -> &shaper::process::Connection {
    snap.connections
        .iter()
        .find(|c| c.socket.proto == proto && c.socket.local == local)
        .unwrap_or_else(|| {
            panic!(
                "no {proto} socket at {local}; scan found:\n{}",
                snap.connections
                    .iter()
                    .map(|c| c.socket.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
}

fn sockets_and_owners_are_found(backend: Backend) {
    let pair = NetnsPair::new();
    let targets = start_sinks(&pair);
    let probe = Probe::start(&pair.a, targets);
    let mut table = ProcessTable::new();
    let snap = snapshot_in(&pair, backend, &mut table);

    let unspecified_v6: SocketAddr = "[::]:0".parse().unwrap();
    let expected = [
        ("tcp4", Proto::Tcp, targets.tcp4, State::Established),
        ("tcp6", Proto::Tcp, targets.tcp6, State::Established),
        ("udp4", Proto::Udp, targets.udp4, State::Established),
        ("udp6", Proto::Udp, unspecified_v6, State::Close),
    ];
    for (kind, proto, remote, state) in expected {
        let local = probe.local(kind);
        let conn = find(&snap, proto, local);
        let s: &Socket = &conn.socket;
        assert_eq!(s.remote, remote, "{kind} remote");
        assert_eq!(s.state, state, "{kind} state");
        assert_eq!(s.uid, PROBE_UID, "{kind} socket uid");
        assert_eq!(s.family(), if kind.ends_with('4') { 4 } else { 6 });
        let owner = conn
            .owner
            .as_ref()
            .unwrap_or_else(|| panic!("{kind} has no owner"));
        assert_eq!(owner.pid, probe.pid(), "{kind} owner");
        let p = snap.owner_process(conn).expect("owner process recorded");
        assert_eq!(p.name, PROBE_NAME);
        assert_eq!(p.uid, PROBE_UID);
        assert_eq!(p.user.as_deref(), Some("nobody"));
        assert!(
            p.cmdline.iter().any(|a| a == "probe::probe_main"),
            "cmdline {:?}",
            p.cmdline
        );
        assert_eq!(
            p.cgroup.as_deref(),
            Some(probe.cgroup.as_ref().unwrap().path.as_str())
        );
        assert_eq!(
            p.ppid,
            std::process::id(),
            "the probe's parent is this test"
        );
        assert_eq!(p.ancestors.first(), Some(&std::process::id()));
        assert!(
            snap.processes.contains_key(&std::process::id()),
            "ancestors are recorded too"
        );
        match backend {
            Backend::Proc => assert_eq!(s.bytes_up, None),
            _ if proto == Proto::Tcp => assert!(s.bytes_up.is_some() && s.bytes_down.is_some()),
            _ => assert_eq!(s.bytes_up, None, "UDP has no per-socket counters"),
        }
    }
    drop(probe);
}

#[test]
fn sock_diag_finds_tcp_and_udp_sockets_with_owners() {
    sockets_and_owners_are_found(Backend::Diag);
}

#[test]
fn proc_net_fallback_finds_the_same_sockets() {
    sockets_and_owners_are_found(Backend::Proc);
}

#[test]
fn upload_counter_grows_by_the_bytes_sent() {
    let pair = NetnsPair::new();
    let mut probe = Probe::start(&pair.a, start_sinks(&pair));
    let local = probe.local("tcp4");
    let mut table = ProcessTable::new();
    let before = find(
        &snapshot_in(&pair, Backend::Diag, &mut table),
        Proto::Tcp,
        local,
    )
    .socket
    .bytes_up
    .unwrap();
    const N: u64 = 300_000;
    probe.send(N as usize);
    let deadline = Instant::now() + crate::support::daemon::allowance(10);
    loop {
        let snap = snapshot_in(&pair, Backend::Diag, &mut table);
        let after = find(&snap, Proto::Tcp, local).socket.bytes_up.unwrap();
        if after >= before + N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "upload counter went from {before} to {after}, expected at least +{N}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn shared_socket_has_a_deterministic_owner_and_lists_the_others() {
    let pair = NetnsPair::new();
    let mut probe = Probe::start(&pair.a, start_sinks(&pair));
    let grandchild = probe.fork();
    let local = probe.local("tcp4");
    let mut table = ProcessTable::new();
    let snap = snapshot_in(&pair, Backend::Diag, &mut table);
    let owner = find(&snap, Proto::Tcp, local).owner.clone().unwrap();
    assert_eq!(
        owner.pid,
        probe.pid(),
        "the process that started first owns it"
    );
    assert_eq!(owner.others, vec![grandchild]);
    let child = &snap.processes[&grandchild];
    assert_eq!(child.name, "sleep");
    assert_eq!(child.ancestors.first(), Some(&probe.pid()));
    // The other sockets were not inherited (close-on-exec).
    assert!(
        find(&snap, Proto::Tcp, probe.local("tcp6"))
            .owner
            .as_ref()
            .unwrap()
            .others
            .is_empty()
    );
}

#[test]
fn owner_exiting_between_scan_and_lookup_is_skipped() {
    let pair = NetnsPair::new();
    let mut probe = Probe::start(&pair.a, start_sinks(&pair));
    let local = probe.local("tcp4");
    let sockets = pair
        .a
        .run(|| scan::open(Backend::Diag).unwrap().scan().unwrap());
    let inode = sockets
        .iter()
        .find(|s| s.local == local)
        .expect("probe socket scanned")
        .inode;
    probe.stop();
    let mut table = ProcessTable::new();
    let stats = table.update(&sockets);
    assert!(stats.walked);
    assert_eq!(
        table.owner(inode),
        None,
        "no owner for a socket of an exited process"
    );
    assert_eq!(table.process(probe.pid()).map(|p| p.pid), None);
    // The next cycle is normal.
    let snap = snapshot_in(&pair, Backend::Diag, &mut table);
    assert!(
        snap.connections
            .iter()
            .all(|c| c.socket.inode != inode || c.owner.is_none())
    );
}

#[test]
fn steady_cycle_does_not_walk_proc_again() {
    let pair = NetnsPair::new();
    let probe = Probe::start(&pair.a, start_sinks(&pair));
    let mut table = ProcessTable::new();
    let scan_once = |table: &mut ProcessTable| {
        pair.a.run(|| {
            let sockets = scan::open(Backend::Diag).unwrap().scan().unwrap();
            table.update(&sockets)
        })
    };
    let cold = scan_once(&mut table);
    assert!(cold.walked && cold.processes_read >= 1, "{cold:?}");
    let steady = scan_once(&mut table);
    assert!(!steady.walked, "nothing new, so no /proc walk: {steady:?}");
    assert_eq!(steady.processes_read, 0);
    let snap = snapshot_in(&pair, Backend::Diag, &mut table);
    let conn = find(&snap, Proto::Tcp, probe.local("tcp6"));
    assert_eq!(
        table.owner_process(conn.socket.inode).map(|p| p.pid),
        Some(probe.pid())
    );
}

/// The fast path's lookup of one reported socket (the daemon in a PID namespace of its own): by
/// tuple and cookie, each kind of socket the classifier reports is found with its inode (the
/// one its descriptor has), an IPv6 socket talking IPv4 included; a cookie of another socket
/// finds nothing. On sock_diag an exact request, on /proc/net the default (scan, match).
#[test]
fn one_socket_is_found_by_its_tuple_and_cookie() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    use socket2::{Domain, SockAddr, Socket as Raw, Type};

    let pair = NetnsPair::new();
    let tcp4 = pair
        .b
        .run(|| std::net::TcpListener::bind((NetnsPair::B_V4, 0)).unwrap());
    let tcp6 = pair
        .b
        .run(|| std::net::TcpListener::bind((NetnsPair::B_V6, 0)).unwrap());
    let udp_peer: SocketAddr = (NetnsPair::B_V4, 5999).into();
    let mapped: SocketAddr = format!(
        "[::ffff:{}]:{}",
        NetnsPair::B_V4,
        tcp4.local_addr().unwrap().port()
    )
    .parse()
    .unwrap();
    pair.a.run(|| {
        let connect = |domain, ty, to: SocketAddr| {
            let s = Raw::new(domain, ty, None).unwrap();
            if to.port() != 0 {
                s.connect(&SockAddr::from(to)).unwrap();
            } else {
                s.bind(&SockAddr::from(to)).unwrap();
            }
            s
        };
        let sockets = [
            (
                Proto::Tcp,
                connect(Domain::IPV4, Type::STREAM, tcp4.local_addr().unwrap()),
            ),
            (
                Proto::Tcp,
                connect(Domain::IPV6, Type::STREAM, tcp6.local_addr().unwrap()),
            ),
            (Proto::Tcp, connect(Domain::IPV6, Type::STREAM, mapped)),
            (Proto::Udp, connect(Domain::IPV4, Type::DGRAM, udp_peer)),
            (
                Proto::Udp,
                connect(Domain::IPV6, Type::DGRAM, "[::]:0".parse().unwrap()),
            ),
        ];
        for backend in [Backend::Diag, Backend::Proc] {
            let mut source = scan::open(backend).unwrap();
            for (proto, s) in &sockets {
                let normal = |a: Option<SocketAddr>| {
                    scan::normalize_addr(a.unwrap_or_else(|| "[::]:0".parse().unwrap()))
                };
                let local = normal(s.local_addr().unwrap().as_socket());
                let remote = normal(s.peer_addr().ok().and_then(|a| a.as_socket()));
                let cookie = crate::bpf::cookie(s);
                let inode = std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
                    .unwrap()
                    .ino();
                let found = source.find(*proto, local, remote, cookie).unwrap();
                assert_eq!(
                    found.map(|f| (f.inode, f.local, f.remote)),
                    Some((inode, local, remote)),
                    "{backend:?} {proto} {local} -> {remote}"
                );
                if backend == Backend::Diag {
                    let other = source.find(*proto, local, remote, cookie + 1).unwrap();
                    assert_eq!(other, None, "{proto} {local} -> {remote}, another cookie");
                }
            }
        }
    });
}
