//! sock_diag (`NETLINK_SOCK_DIAG`, inet_diag) scanner.
//!
//! Requests are built with netlink-packet-sock-diag. Responses are read in place: the crate's
//! `InetResponseHeader::parse` for the fixed part and netlink-packet-core's NLA iterator for
//! attributes, picking the two byte counters out of `tcp_info` by offset. Decoding every attribute
//! into the crate's owned `Nla` values would allocate a copy of each 280-byte `tcp_info`, which is
//! most of a 10,000-socket scan's user-space cost.

use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NlasIterator, Parseable,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_packet_sock_diag::{SOCK_DIAG_BY_FAMILY, SockDiagMessage};
use netlink_sys::{Socket as NlSocket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

use super::{Proto, ScanError, Socket, SocketSource, State, normalize_addr};

/// Size of `struct inet_diag_msg`, after which the attributes start.
const INET_DIAG_MSG_LEN: usize = 72;
/// `INET_DIAG_INFO`: the attribute carrying `struct tcp_info`.
const INET_DIAG_INFO: u16 = 2;
/// Offsets of `tcpi_bytes_acked` and `tcpi_bytes_received` in `struct tcp_info` (Linux ≥ 4.1/4.2).
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;
/// Offsets of `tcpi_segs_out` and `tcpi_segs_in` (Linux ≥ 4.2), right after them.
const TCPI_SEGS_OUT: usize = 136;
const TCPI_SEGS_IN: usize = 140;
/// IP and TCP headers (with timestamps) of one segment, IPv4 and IPv6: `tcp_info` counts
/// payload only, and the BPF classifier's counters (which these stand in for) count every
/// segment with its headers.
const SEGMENT_HEADERS: [u64; 2] = [52, 72];
/// The kernel fills at most ~32 KiB per dump read; a larger buffer only wastes memory.
const RECV_BUF: usize = 64 * 1024;

/// `TCPDIAG_GETSOCK`: the original inet_diag request type. The kernel serves it with the family
/// set to `AF_UNSPEC`, so one walk of the TCP hash table returns IPv4 and IPv6 sockets together;
/// `SOCK_DIAG_BY_FAMILY` needs one walk per family, and each walk visits every bucket of the
/// established table (262,144 here) and every socket of every namespace.
const TCPDIAG_GETSOCK: u16 = 18;
/// `sizeof(struct inet_diag_req)`: family, src_len, dst_len, ext, `inet_diag_sockid` (48 bytes),
/// states, dbs.
const INET_DIAG_REQ_LEN: usize = 60;

/// The dumps of a scan when TCP has to be asked per family.
const DUMPS: [(u8, Proto, &str); 4] = [
    (AF_INET, Proto::Tcp, "tcp/ipv4"),
    (AF_INET6, Proto::Tcp, "tcp/ipv6"),
    (AF_INET, Proto::Udp, "udp/ipv4"),
    (AF_INET6, Proto::Udp, "udp/ipv6"),
];

/// A sock_diag socket kept open across cycles, with its receive buffer.
pub struct DiagScanner {
    socket: NlSocket,
    buf: Vec<u8>,
    request: Vec<u8>,
    sequence: u32,
    /// Whether the kernel answers `TCPDIAG_GETSOCK` (checked on first use).
    tcp_single_walk: bool,
    /// Rows in the last scan: the next one is allocated at about that size at once.
    last_len: usize,
}

impl DiagScanner {
    /// Opens the netlink socket in the calling thread's network namespace.
    pub fn new() -> Result<DiagScanner, ScanError> {
        let mut socket = NlSocket::new(NETLINK_SOCK_DIAG).map_err(ScanError::DiagUnavailable)?;
        socket.bind_auto().map_err(ScanError::DiagUnavailable)?;
        socket
            .connect(&NlAddr::new(0, 0))
            .map_err(ScanError::DiagUnavailable)?;
        Ok(DiagScanner {
            socket,
            buf: vec![0; RECV_BUF],
            request: Vec::with_capacity(128),
            sequence: 0,
            tcp_single_walk: true,
            last_len: 0,
        })
    }

    /// One TCP dump, to find out whether the kernel answers at all (inet_diag may be missing).
    pub fn probe(&mut self) -> Result<(), ScanError> {
        let mut sink = Vec::new();
        self.dump(AF_INET, Proto::Tcp, "tcp/ipv4", &mut sink)
            .map_err(|e| match e {
                ScanError::Diag { error, .. } => ScanError::DiagUnavailable(error),
                other => other,
            })
    }

    fn send_request(&mut self, family: u8, proto: Proto) -> io::Result<()> {
        let (states, extensions) = request_filter(proto);
        let socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.sequence;
        let mut message = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: proto.number(),
                extensions,
                states,
                socket_id,
            })
            .into(),
        );
        message.finalize();
        self.request.resize(message.buffer_len(), 0);
        message.serialize(&mut self.request);
        self.socket.send(&self.request, 0)?;
        Ok(())
    }

    /// Sends the legacy `TCPDIAG_GETSOCK` dump request (`struct inet_diag_req`), which the
    /// netlink-packet-sock-diag crate does not model.
    fn send_tcp_compat_request(&mut self) -> io::Result<()> {
        let (states, extensions) = request_filter(Proto::Tcp);
        self.sequence = self.sequence.wrapping_add(1);
        let len = 16 + INET_DIAG_REQ_LEN;
        self.request.clear();
        self.request.resize(len, 0);
        let mut header = NetlinkBuffer::new(&mut self.request[..]);
        header.set_length(len as u32);
        header.set_message_type(TCPDIAG_GETSOCK);
        header.set_flags(NLM_F_REQUEST | NLM_F_DUMP);
        header.set_sequence_number(self.sequence);
        let req = &mut self.request[16..];
        req[0] = AF_INET; // ignored for dumps: the kernel walks both families
        req[3] = extensions.bits();
        req[4 + 40..4 + 48].fill(0xff); // INET_DIAG_NOCOOKIE
        req[52..56].copy_from_slice(&states.bits().to_ne_bytes());
        self.socket.send(&self.request, 0)?;
        Ok(())
    }

    /// TCP over both families: one legacy dump where the kernel allows it, else one per family.
    fn dump_tcp(&mut self, out: &mut Vec<Socket>) -> Result<(), ScanError> {
        if self.tcp_single_walk {
            let mark = out.len();
            let sent = self.send_tcp_compat_request();
            match sent
                .map_err(|error| ScanError::Diag { what: "tcp", error })
                .and_then(|()| self.read_dump(Proto::Tcp, "tcp", out))
            {
                Ok(()) => return Ok(()),
                Err(ScanError::Diag { error, .. })
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EINVAL | libc::ENOENT | libc::EOPNOTSUPP)
                    ) =>
                {
                    tracing::debug!("TCPDIAG_GETSOCK refused ({error}); dumping TCP per family");
                    out.truncate(mark);
                    self.tcp_single_walk = false;
                }
                Err(e) => return Err(e),
            }
        }
        for (family, proto, what) in &DUMPS[..2] {
            self.dump(*family, *proto, what, out)?;
        }
        Ok(())
    }

    fn dump(
        &mut self,
        family: u8,
        proto: Proto,
        what: &'static str,
        out: &mut Vec<Socket>,
    ) -> Result<(), ScanError> {
        self.send_request(family, proto)
            .map_err(|error| ScanError::Diag { what, error })?;
        self.read_dump(proto, what, out)
    }

    /// Reads the answer to the last request until `NLMSG_DONE`.
    fn read_dump(
        &mut self,
        proto: Proto,
        what: &'static str,
        out: &mut Vec<Socket>,
    ) -> Result<(), ScanError> {
        let io_err = |error| ScanError::Diag { what, error };
        let malformed = |message: String| ScanError::Malformed { what, message };
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(io_err)?;
            if n == 0 {
                return Err(malformed("empty read before the end of the dump".into()));
            }
            let mut offset = 0;
            while offset < n {
                let msg = NetlinkBuffer::new_checked(&self.buf[offset..n])
                    .map_err(|e| malformed(e.to_string()))?;
                let len = msg.length() as usize;
                match msg.message_type() {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let payload = msg.payload();
                        let code = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .unwrap_or(0);
                        if code != 0 {
                            return Err(io_err(io::Error::from_raw_os_error(-code)));
                        }
                    }
                    SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK
                        if msg.sequence_number() == self.sequence =>
                    {
                        out.push(parse_socket(proto, msg.payload()).map_err(malformed)?);
                    }
                    _ => {}
                }
                offset += (len + 3) & !3;
                if len == 0 {
                    return Err(malformed("zero-length message".into()));
                }
            }
        }
    }
}

/// The states and extensions asked for: TCP in every state but LISTEN and TIME_WAIT, with
/// `tcp_info`; UDP in every state (TCP_CLOSE = unconnected, TCP_ESTABLISHED = connected).
fn request_filter(proto: Proto) -> (StateFlags, ExtensionFlags) {
    match proto {
        Proto::Tcp => (
            StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT,
            ExtensionFlags::INFO,
        ),
        Proto::Udp => (StateFlags::all(), ExtensionFlags::empty()),
    }
}

/// One `inet_diag_msg` and its attributes.
pub(super) fn parse_socket(proto: Proto, payload: &[u8]) -> Result<Socket, String> {
    let header = InetResponseHeader::parse(payload).map_err(|e| e.to_string())?;
    let id = &header.socket_id;
    let mut socket = Socket {
        proto,
        local: normalize_addr((id.source_address, id.source_port).into()),
        remote: normalize_addr((id.destination_address, id.destination_port).into()),
        state: State::from_kernel(header.state)
            .ok_or_else(|| format!("unknown socket state {}", header.state))?,
        uid: header.uid,
        inode: u64::from(header.inode),
        cookie: u64::from_ne_bytes(id.cookie),
        bytes_up: None,
        bytes_down: None,
    };
    if let Some(attrs) = payload.get(INET_DIAG_MSG_LEN..) {
        for nla in NlasIterator::new(attrs) {
            let nla = nla.map_err(|e| e.to_string())?;
            if nla.kind() == INET_DIAG_INFO {
                let info = nla.value();
                let headers = SEGMENT_HEADERS[usize::from(socket.local.is_ipv6())];
                let with_headers = |bytes: usize, segs: usize| {
                    let segs = read_u32(info, segs).map_or(0, u64::from);
                    read_u64(info, bytes).map(|b| b + segs * headers)
                };
                socket.bytes_up = with_headers(TCPI_BYTES_ACKED, TCPI_SEGS_OUT);
                socket.bytes_down = with_headers(TCPI_BYTES_RECEIVED, TCPI_SEGS_IN);
            }
        }
    }
    Ok(socket)
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    bytes
        .get(offset..offset + 4)
        .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
}

fn read_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    bytes
        .get(offset..offset + 8)
        .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
}

impl DiagScanner {
    /// One exact lookup (no `NLM_F_DUMP`): the kernel finds the socket by its tuple in its hash
    /// tables and checks the cookie, so the answer is this socket or none, whatever else is
    /// open. `src`/`dst` are as the request carries them (see [`SocketSource::find`]).
    fn find_exact(
        &mut self,
        family: u8,
        proto: Proto,
        src: SocketAddr,
        dst: SocketAddr,
        cookie: u64,
    ) -> Result<Option<Socket>, ScanError> {
        const WHAT: &str = "exact lookup";
        let io_err = |error| ScanError::Diag { what: WHAT, error };
        let malformed = |message: String| ScanError::Malformed {
            what: WHAT,
            message,
        };
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.sequence;
        let mut message = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: proto.number(),
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id: SocketId {
                    source_port: src.port(),
                    destination_port: dst.port(),
                    source_address: src.ip(),
                    destination_address: dst.ip(),
                    interface_id: 0,
                    cookie: cookie.to_ne_bytes(),
                },
            })
            .into(),
        );
        message.finalize();
        self.request.resize(message.buffer_len(), 0);
        message.serialize(&mut self.request);
        self.socket.send(&self.request, 0).map_err(io_err)?;
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(io_err)?;
            let mut offset = 0;
            while offset < n {
                let msg = NetlinkBuffer::new_checked(&self.buf[offset..n])
                    .map_err(|e| malformed(e.to_string()))?;
                let len = msg.length() as usize;
                if len == 0 {
                    return Err(malformed("zero-length message".into()));
                }
                if msg.sequence_number() == self.sequence {
                    match msg.message_type() {
                        NLMSG_ERROR => {
                            let code = msg
                                .payload()
                                .get(..4)
                                .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                                .unwrap_or(0);
                            // ENOENT: no socket with that tuple; ESTALE: one with another
                            // cookie (the tuple was reused).
                            return match -code {
                                0 | libc::ENOENT | libc::ESTALE => Ok(None),
                                e => Err(io_err(io::Error::from_raw_os_error(e))),
                            };
                        }
                        SOCK_DIAG_BY_FAMILY => {
                            return parse_socket(proto, msg.payload())
                                .map(Some)
                                .map_err(malformed);
                        }
                        _ => {}
                    }
                }
                offset += (len + 3) & !3;
            }
        }
    }
}

/// The address as a socket of `family` holds it: an IPv4 address in an IPv6 socket is mapped.
fn in_family(addr: SocketAddr, family: u8) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) if family == AF_INET6 => {
            SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port())
        }
        _ => addr,
    }
}

impl SocketSource for DiagScanner {
    fn find(
        &mut self,
        proto: Proto,
        local: SocketAddr,
        remote: SocketAddr,
        cookie: u64,
    ) -> Result<Option<Socket>, ScanError> {
        // An IPv4 connection may be an IPv6 socket's (mapped addresses, reported as IPv4).
        let families: &[u8] = if local.is_ipv4() {
            &[AF_INET, AF_INET6]
        } else {
            &[AF_INET6]
        };
        for &family in families {
            let (local, remote) = (in_family(local, family), in_family(remote, family));
            // TCP takes the socket's own view (source = local); UDP's lookup has source and
            // destination swapped (net/ipv4/udp_diag.c, "for historical reasons"). Both are
            // tried: the cookie makes a wrong match impossible.
            let orders = match proto {
                Proto::Tcp => [(local, remote), (remote, local)],
                Proto::Udp => [(remote, local), (local, remote)],
            };
            for (src, dst) in orders {
                if let Some(s) = self.find_exact(family, proto, src, dst, cookie)? {
                    return Ok(Some(s));
                }
            }
        }
        Ok(None)
    }

    fn scan(&mut self) -> Result<Vec<Socket>, ScanError> {
        let mut out = Vec::with_capacity(self.last_len + self.last_len / 8);
        self.dump_tcp(&mut out)?;
        for (family, proto, what) in &DUMPS[2..] {
            self.dump(*family, *proto, what, &mut out)?;
        }
        self.last_len = out.len();
        Ok(out)
    }

    fn name(&self) -> &'static str {
        "sock_diag"
    }
}
