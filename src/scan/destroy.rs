//! sock_diag's destroy notifications: the kernel broadcasts one `inet_diag_msg` per TCP socket as
//! it frees it (`sock_diag_broadcast_destroy`, Linux ≥ 4.9), with `tcp_info` in an
//! `INET_DIAG_INFO` attribute (net/ipv4/inet_diag.c, `inet_diag_handler_get_info`: TCP's
//! handler has an info size, so the attribute is always reserved and filled). These are the
//! u32 path's close reports: a connection's final counters, in the scan's own formula
//! (`tcp_info` payload plus headers per segment), so what no scan saw of a known connection —
//! its tail — is still charged.
//!
//! The messages carry the tuple and cookie but no uid or inode (the socket has left its file
//! by then), so a report is of use only for a socket a scan already tied to its owner. UDP's
//! groups are not joined: UDP's handler has no info, so its messages have no byte counts.

use std::io;

use netlink_packet_core::{NLMSG_ERROR, NetlinkBuffer};
use netlink_packet_sock_diag::SOCK_DIAG_BY_FAMILY;
use netlink_sys::{Socket as NlSocket, protocols::NETLINK_SOCK_DIAG};

use super::diag::parse_socket;
use super::{Proto, ScanError};
use crate::classify::{ByteCounters, ClosedSocket};

/// `enum sknetlink_groups` (linux/sock_diag.h): NONE, INET_TCP_DESTROY, INET_UDP_DESTROY,
/// INET6_TCP_DESTROY, INET6_UDP_DESTROY.
const SKNLGRP_INET_TCP_DESTROY: u32 = 1;
const SKNLGRP_INET6_TCP_DESTROY: u32 = 3;
/// One report is ~400 bytes of message in an skb of about twice that; a 2 s cycle at 2,000
/// closes/s fills ~3 MB. The kernel drops what does not fit (`ENOBUFS` on the next read), so the
/// buffer is sized for bursts, not for the average.
const RCV_BUF: usize = 8 * 1024 * 1024;
const READ_BUF: usize = 64 * 1024;

/// A non-blocking subscription to TCP destroy notifications, drained once per cycle.
pub struct DestroyListener {
    socket: NlSocket,
    buf: Vec<u8>,
    /// Reports the kernel dropped (its buffer was full) since the last warning.
    lost_warned: bool,
}

impl DestroyListener {
    /// Joins the IPv4 and IPv6 TCP destroy groups in the calling thread's network namespace
    /// (the kernel broadcasts each socket's report in its own namespace only).
    pub fn new() -> Result<DestroyListener, ScanError> {
        let err = ScanError::DestroyUnavailable;
        let mut socket = NlSocket::new(NETLINK_SOCK_DIAG).map_err(err)?;
        socket.bind_auto().map_err(err)?;
        for group in [SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY] {
            socket.add_membership(group).map_err(err)?;
        }
        socket.set_non_blocking(true).map_err(err)?;
        // Above net.core.rmem_max with CAP_NET_ADMIN; else as large as rmem_max allows.
        if rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, RCV_BUF).is_err() {
            let _ = socket.set_rx_buf_sz(RCV_BUF);
        }
        Ok(DestroyListener {
            socket,
            buf: vec![0; READ_BUF],
            lost_warned: false,
        })
    }

    /// Every report queued since the last call: each TCP socket's cookie and final counters
    /// (no owner: the messages have none). Never blocks. A socket whose report has no
    /// `tcp_info` is left out.
    pub fn drain(&mut self) -> Vec<ClosedSocket> {
        let mut out = Vec::new();
        loop {
            let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    if !std::mem::replace(&mut self.lost_warned, true) {
                        tracing::warn!(
                            "the kernel dropped TCP close reports (more sockets closed between \
                             two cycles than its buffer holds): those connections' last bytes \
                             are counted as unattributed"
                        );
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("reading TCP close reports failed: {e}");
                    break;
                }
            };
            parse_reports(&self.buf[..n], &mut out);
        }
        out
    }
}

impl std::os::fd::AsFd for DestroyListener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// The reports in one datagram.
fn parse_reports(mut data: &[u8], out: &mut Vec<ClosedSocket>) {
    while let Ok(msg) = NetlinkBuffer::new_checked(data) {
        let len = msg.length() as usize;
        match msg.message_type() {
            SOCK_DIAG_BY_FAMILY => match parse_socket(Proto::Tcp, msg.payload()) {
                Ok(s) => {
                    if let (Some(up), Some(down)) = (s.bytes_up, s.bytes_down) {
                        out.push(ClosedSocket {
                            cookie: s.cookie,
                            proto: Proto::Tcp,
                            owner: None,
                            bytes: ByteCounters { up, down },
                            classes: (None, None),
                        });
                    }
                }
                Err(e) => tracing::debug!("malformed TCP close report: {e}"),
            },
            NLMSG_ERROR => {}
            _ => {}
        }
        let step = (len + 3) & !3;
        if len == 0 || step >= data.len() {
            break;
        }
        data = &data[step..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real report: a TCP connection over loopback in a network namespace of the test's own
    /// would need root; this one uses the calling namespace and skips without the capability.
    #[test]
    fn a_closed_tcp_connection_is_reported_with_its_counters() {
        let Ok(mut listener) = DestroyListener::new() else {
            eprintln!("skipped: cannot join the TCP destroy groups (not root?)");
            return;
        };
        use std::io::{Read, Write};
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(&vec![7u8; 100_000]).unwrap();
        });
        let (mut peer, _) = server.accept().unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        sender.join().unwrap();
        drop(peer);
        assert_eq!(got.len(), 100_000);
        // The kernel broadcasts from a work queue: wait for the two reports (both ends), up to
        // 30 s, a bound no loaded machine reaches (the wait ends at the report, here within ms).
        let mut reports = Vec::new();
        for _ in 0..1500 {
            reports.extend(listener.drain());
            if reports.iter().any(|r| r.bytes.up >= 100_000) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let client = reports
            .iter()
            .find(|r| r.bytes.up >= 100_000)
            .expect("the client's close report");
        assert!(client.cookie != 0);
        assert!(client.owner.is_none());
        // Payload plus 52 bytes of headers per segment: more than the payload, less than 2x.
        assert!(client.bytes.up < 200_000, "{client:?}");
    }
}
