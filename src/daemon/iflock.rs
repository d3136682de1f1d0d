//! One daemon per interface, whatever the runtime dirs: the pid-file lock only stops two
//! daemons that share a runtime dir, and a second one with another `--runtime-dir` used to
//! rewrite the first one's tree silently.
//!
//! Each shaped interface is claimed by binding the abstract unix socket `shaper-if/IFNAME`.
//! Abstract names live in the network namespace, which is exactly the scope of interface names,
//! and vanish with the process that bound them, so a daemon killed with SIGKILL leaves no stale
//! lock behind. A daemon that finds the name taken connects to it to learn the holder's pid
//! (`SO_PEERCRED` reports the process that called `listen`), names it, and refuses to start.

use std::os::fd::OwnedFd;

use rustix::net::{
    AddressFamily, SocketAddrUnix, SocketFlags, SocketType, bind, connect, listen, socket_with,
    sockopt::socket_peercred,
};

/// Why an interface could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{interface} is already shaped by another shaper{holder} in this network namespace; stop \
         it first (`shaper stop --runtime-dir DIR` with its runtime dir) or shape another interface"
    )]
    Held { interface: String, holder: String },
    #[error("cannot claim {interface} for this daemon (abstract socket {name:?}): {error}")]
    Io {
        interface: String,
        name: String,
        error: std::io::Error,
    },
}

/// The claims on the shaped interfaces, held for the daemon's lifetime (released on drop or exit).
#[derive(Debug)]
pub struct InterfaceLock {
    _sockets: Vec<OwnedFd>,
}

/// The abstract socket name that claims `interface`.
pub fn lock_name(interface: &str) -> String {
    format!("shaper-if/{interface}")
}

impl InterfaceLock {
    /// Claims every interface in `interfaces`, or none: on failure the claims already made are
    /// released with the partial lock.
    pub fn acquire(interfaces: &[String]) -> Result<InterfaceLock, LockError> {
        let sockets = interfaces
            .iter()
            .map(|i| claim(i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(InterfaceLock { _sockets: sockets })
    }
}

fn claim(interface: &str) -> Result<OwnedFd, LockError> {
    let name = lock_name(interface);
    let io = |error: std::io::Error| LockError::Io {
        interface: interface.to_string(),
        name: name.clone(),
        error,
    };
    let addr = SocketAddrUnix::new_abstract_name(name.as_bytes()).map_err(|e| io(e.into()))?;
    let socket = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| io(e.into()))?;
    match bind(&socket, &addr) {
        Ok(()) => {}
        Err(rustix::io::Errno::ADDRINUSE) => {
            let holder = holder(&addr);
            match holder {
                // Abstract names have no permissions: any local user can bind this one. A holder
                // of another user is no shaper that could shape this interface (that takes
                // CAP_NET_ADMIN, as this daemon's user has), so it must not stop this one.
                Some((pid, uid)) if uid != rustix::process::geteuid().as_raw() => {
                    tracing::warn!(
                        "{interface}: the claim {name:?} is held by pid {pid} of uid {uid}, not a \
                         shaper of this user; going on without the one-daemon-per-interface guard"
                    );
                    return Ok(socket);
                }
                _ => {
                    return Err(LockError::Held {
                        interface: interface.to_string(),
                        holder: holder.map_or_else(String::new, |(pid, _)| format!(" (pid {pid})")),
                    });
                }
            }
        }
        Err(e) => return Err(io(e.into())),
    }
    // Listening makes the holder's pid available to a refused daemon; nothing is ever accepted.
    listen(&socket, 1).map_err(|e| io(e.into()))?;
    Ok(socket)
}

/// The pid and uid of the process holding `addr`, if they can be learnt. The connection is
/// non-blocking: the holder never accepts, so once its backlog is full a blocking connect would
/// wait forever.
fn holder(addr: &SocketAddrUnix) -> Option<(i32, u32)> {
    let socket = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .ok()?;
    connect(&socket, addr).ok()?;
    let cred = socket_peercred(&socket).ok()?;
    Some((cred.pid.as_raw_nonzero().get(), cred.uid.as_raw()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In this test process's namespace, with names no daemon uses.
    #[test]
    fn a_claimed_interface_is_refused_naming_the_holder_and_freed_on_drop() {
        let name = format!("test{}", std::process::id() % 100_000);
        let first = InterfaceLock::acquire(std::slice::from_ref(&name)).unwrap();
        let err = InterfaceLock::acquire(&[format!("{name}b"), name.clone()]).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, LockError::Held { interface, .. } if *interface == name),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("(pid {})", std::process::id())),
            "{msg}"
        );
        // The partial claim on `{name}b` was released with the failed attempt.
        drop(InterfaceLock::acquire(&[format!("{name}b")]).unwrap());
        drop(first);
        drop(InterfaceLock::acquire(&[name]).unwrap());
    }

    #[test]
    fn a_claim_squatted_by_another_user_does_not_stop_the_daemon() {
        use std::os::unix::process::CommandExt;
        if !rustix::process::geteuid().is_root() {
            return; // the squatter must be another user than the daemon's
        }
        let name = format!("squat{}", std::process::id() % 100_000);
        let script = format!(
            "import socket, sys, time\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.bind('\\0{}')\n\
             s.listen(1)\n\
             print('bound', flush=True)\n\
             time.sleep(30)\n",
            lock_name(&name)
        );
        let mut squatter = std::process::Command::new("python3")
            .args(["-c", &script])
            .uid(65534)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(squatter.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "bound");
        let claimed = InterfaceLock::acquire(std::slice::from_ref(&name));
        let _ = squatter.kill();
        let _ = squatter.wait();
        assert!(claimed.is_ok(), "{:?}", claimed.err());
    }
}
