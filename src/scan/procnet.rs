//! `/proc/net/{tcp,tcp6,udp,udp6}` scanner: the fallback when sock_diag is unavailable.
//!
//! Slower than sock_diag (the kernel formats text, procfs parses it) and without byte counters or
//! socket cookies. Reads through `/proc/<pid>/task/<tid>/net`, because `/proc/net` shows the
//! namespace of the main thread, not of the thread that is asking.

use procfs::process::Process;

use super::{Proto, ScanError, Socket, SocketSource, State, normalize_addr};

/// Stateless: every scan reads the four files afresh.
#[derive(Debug, Default)]
pub struct ProcNetScanner;

impl ProcNetScanner {
    pub fn new() -> Self {
        ProcNetScanner
    }
}

impl SocketSource for ProcNetScanner {
    fn scan(&mut self) -> Result<Vec<Socket>, ScanError> {
        let task = format!(
            "/proc/{}/task/{}",
            std::process::id(),
            rustix::thread::gettid().as_raw_nonzero()
        );
        let error = |file: &str, e: procfs::ProcError| ScanError::ProcNet {
            path: format!("{task}/net/{file}"),
            message: e.to_string(),
        };
        let me = Process::new_with_root(task.clone().into()).map_err(|e| error("", e))?;
        let mut out = Vec::new();
        for (file, entries) in [("tcp", me.tcp()), ("tcp6", me.tcp6())] {
            for e in entries.map_err(|e| error(file, e))? {
                let state = State::from_kernel(e.state as u8).unwrap_or(State::Close);
                if matches!(state, State::Listen | State::TimeWait) {
                    continue;
                }
                out.push(row(
                    Proto::Tcp,
                    e.local_address,
                    e.remote_address,
                    state,
                    e.uid,
                    e.inode,
                ));
            }
        }
        for (file, entries) in [("udp", me.udp()), ("udp6", me.udp6())] {
            for e in entries.map_err(|e| error(file, e))? {
                let state = match e.state {
                    procfs::net::UdpState::Established => State::Established,
                    _ => State::Close,
                };
                out.push(row(
                    Proto::Udp,
                    e.local_address,
                    e.remote_address,
                    state,
                    e.uid,
                    e.inode,
                ));
            }
        }
        Ok(out)
    }

    fn name(&self) -> &'static str {
        "/proc/net"
    }
}

fn row(
    proto: Proto,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    state: State,
    uid: u32,
    inode: u64,
) -> Socket {
    Socket {
        proto,
        local: normalize_addr(local),
        remote: normalize_addr(remote),
        state,
        uid,
        inode,
        cookie: 0,
        bytes_up: None,
        bytes_down: None,
    }
}
