//! Many real connections between a namespace pair, for benchmarks: this process holds the
//! client ends in `a`; a peer process in `b` (this same binary, re-executed with `--serve`)
//! accepts and holds the server ends, since one process may not have enough descriptors for
//! both.

use std::io::BufRead;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Stdio};
use std::time::Instant;

use super::netns::NetnsPair;

/// Raises the soft open-file limit to the hard one; returns it.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

/// If this process was started as the peer (`--serve V4 V6`), serves and returns `true`: the
/// caller's `main` must then return.
pub fn serve_if_requested() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let Some(at) = args.iter().position(|a| a == "--serve") else {
        return false;
    };
    let (v4, v6): (usize, usize) = (args[at + 1].parse().unwrap(), args[at + 2].parse().unwrap());
    raise_fd_limit();
    let listeners: Vec<TcpListener> = [NetnsPair::b_addr(4), NetnsPair::b_addr(6)]
        .into_iter()
        .map(|ip| TcpListener::bind((ip, 0)).unwrap())
        .collect();
    println!(
        "PORTS {} {}",
        listeners[0].local_addr().unwrap().port(),
        listeners[1].local_addr().unwrap().port()
    );
    let held: Vec<TcpStream> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .zip([v4, v6])
            .map(|(l, n)| {
                s.spawn(move || (0..n).map(|_| l.accept().unwrap().0).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    println!("ACCEPTED {}", held.len());
    let _ = std::io::stdin().read_line(&mut String::new());
    true
}

/// The first number among the arguments before `--serve`, or `default`.
pub fn count_argument(default: usize) -> usize {
    std::env::args()
        .skip(1)
        .take_while(|a| a != "--serve")
        .find_map(|a| a.parse().ok())
        .unwrap_or(default)
}

/// `n` TCP connections from `a` to `b` (a fifth over IPv6) and 50 unconnected UDP sockets.
pub struct Crowd {
    pub clients: Vec<TcpStream>,
    pub udp: Vec<UdpSocket>,
    pub v6: usize,
    peer: Child,
}

impl Crowd {
    pub fn open(pair: &NetnsPair, n: usize) -> Crowd {
        let limit = raise_fd_limit();
        assert!(
            limit as usize > n + 1000,
            "the open-file limit ({limit}) is too low for {n} connections"
        );
        let v6 = n / 5;
        let mut peer = pair
            .b
            .command(std::env::current_exe().unwrap())
            .args(["--serve", &(n - v6).to_string(), &v6.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start peer");
        let mut out = std::io::BufReader::new(peer.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let ports: Vec<u16> = line
            .strip_prefix("PORTS ")
            .expect("peer announces its ports")
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        let addrs = [
            SocketAddr::new(NetnsPair::b_addr(4), ports[0]),
            SocketAddr::new(NetnsPair::b_addr(6), ports[1]),
        ];
        let setup = Instant::now();
        let (clients, udp) = pair.a.run(|| {
            let clients: Vec<TcpStream> = (0..n)
                .map(|i| TcpStream::connect(addrs[usize::from(i >= n - v6)]).expect("connect"))
                .collect();
            let udp = (0..50)
                .map(|_| UdpSocket::bind((NetnsPair::A_V4, 0)).unwrap())
                .collect();
            (clients, udp)
        });
        line.clear();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("ACCEPTED"), "peer: {line}");
        eprintln!(
            "opened {n} connections ({v6} IPv6) and 50 UDP sockets in {:.1} s",
            setup.elapsed().as_secs_f64()
        );
        Crowd {
            clients,
            udp,
            v6,
            peer,
        }
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        drop(self.peer.stdin.take());
        let _ = self.peer.wait();
    }
}
