//! Learning names from the DNS answers this machine receives: a packet socket on every
//! interface of the daemon's network namespace, with a classic BPF filter that lets through
//! only UDP datagrams from port 53, read by a thread into the shared [`NameCache`].
//!
//! Every interface, loopback included: where systemd-resolved or another local stub answers the
//! applications, its answers on `lo` carry the names even when it asks upstream over TLS. TCP
//! answers (large ones, zone transfers) are not read.
//!
//! The answers are parsed here, not by a DNS crate: only the question's name and the A/AAAA
//! records of an answer are needed, and no DNS crate is among the dependencies the build may
//! fetch (the registry mirror here offers none).

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::{MAX_NAMES, NameCache, NameSource, SharedCache};

/// The largest DNS message over UDP with EDNS is 4096 bytes here; a longer one is cut and its
/// records past the cut are skipped.
const MAX_DATAGRAM: usize = 4096 + 60 + 8;

/// What [`DnsSniffer::start`] could not do.
#[derive(Debug, thiserror::Error)]
pub enum SniffError {
    #[error(
        "cannot open a packet socket to read DNS answers ({0}); names of remote ends need \
         CAP_NET_RAW"
    )]
    Socket(std::io::Error),
    #[error("cannot attach the DNS filter to the packet socket ({0})")]
    Filter(std::io::Error),
    #[error("cannot start the DNS reader thread ({0})")]
    Thread(std::io::Error),
}

/// Names learnt from the wire.
pub struct DnsSniffer {
    cache: SharedCache,
}

impl DnsSniffer {
    /// Opens the packet socket in the calling thread's network namespace and starts the thread
    /// that reads it.
    pub fn start() -> Result<DnsSniffer, SniffError> {
        let socket = open()?;
        let cache: SharedCache = Arc::new(Mutex::new(NameCache::new(MAX_NAMES)));
        let learnt = cache.clone();
        std::thread::Builder::new()
            .name("shaper-dns".into())
            .spawn(move || read(socket, learnt))
            .map_err(SniffError::Thread)?;
        Ok(DnsSniffer { cache })
    }
}

impl NameSource for DnsSniffer {
    fn name_of(&mut self, ip: IpAddr, now: Instant) -> Option<Arc<str>> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .name_of(ip, now)
    }
}

fn open() -> Result<Socket, SniffError> {
    let all = Protocol::from(i32::from((libc::ETH_P_ALL as u16).to_be()));
    let socket = Socket::new(Domain::PACKET, Type::DGRAM, Some(all)).map_err(SniffError::Socket)?;
    let program = filter();
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `program`, alive for the call; the kernel copies the program.
    // No kept crate wraps SO_ATTACH_FILTER (socket2 0.6 has no `attach_filter`, nix none).
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(SniffError::Filter(std::io::Error::last_os_error()));
    }
    Ok(socket)
}

/// The classic BPF filter: IPv4 (not a later fragment) or IPv6 (UDP as the first header) UDP
/// to or from port 53: queries, so answers can be matched to them, and answers. A datagram
/// packet socket's filter sees the packet from its network header; the protocol comes from the
/// ancillary field, since there is no link header to read.
fn filter() -> Vec<libc::sock_filter> {
    const SKF_AD_PROTOCOL: u32 = 0;
    const SKF_AD_OFF: u32 = (-0x1000_i32) as u32;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX,
        BPF_MSH, BPF_RET,
    };
    // Jumps count the instructions skipped: 18 accepts, 19 drops.
    vec![
        /* 0 */ op(BPF_LD | BPF_H | BPF_ABS, 0, 0, SKF_AD_OFF + SKF_AD_PROTOCOL),
        /* 1 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, 9, 0x0800),
        /* 2 */ op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 9),
        /* 3 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, 15, 17),
        /* 4 */ op(BPF_LD | BPF_H | BPF_ABS, 0, 0, 6),
        /* 5 */ op(BPF_JMP | BPF_JSET | BPF_K, 13, 0, 0x1fff),
        /* 6 */ op(BPF_LDX | BPF_B | BPF_MSH, 0, 0, 0),
        /* 7 */ op(BPF_LD | BPF_H | BPF_IND, 0, 0, 0),
        /* 8 */ op(BPF_JMP | BPF_JEQ | BPF_K, 9, 0, 53),
        /* 9 */ op(BPF_LD | BPF_H | BPF_IND, 0, 0, 2),
        /* 10 */ op(BPF_JMP | BPF_JEQ | BPF_K, 7, 8, 53),
        /* 11 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, 7, 0x86dd),
        /* 12 */ op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 6),
        /* 13 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, 5, 17),
        /* 14 */ op(BPF_LD | BPF_H | BPF_ABS, 0, 0, 40),
        /* 15 */ op(BPF_JMP | BPF_JEQ | BPF_K, 2, 0, 53),
        /* 16 */ op(BPF_LD | BPF_H | BPF_ABS, 0, 0, 42),
        /* 17 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 53),
        /* 18 */ op(BPF_RET | BPF_K, 0, 0, MAX_DATAGRAM as u32),
        /* 19 */ op(BPF_RET | BPF_K, 0, 0, 0),
    ]
}

fn read(socket: Socket, cache: SharedCache) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut asked = Queries::default();
    loop {
        let n = match (&socket).read(&mut buf) {
            Ok(n) => n.min(buf.len()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(
                    "DNS answers: reading the packet socket failed ({e}); names of remote \
                     ends are no longer learnt"
                );
                return;
            }
        };
        let Some(datagram) = Datagram::parse(&buf[..n]) else {
            continue;
        };
        let now = Instant::now();
        let answers = asked.answers(&datagram, now);
        if answers.is_empty() {
            continue;
        }
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        for a in answers {
            cache.learn(a.ip, &a.name, a.ttl, now);
        }
    }
}

/// A UDP datagram as the packet socket gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub payload: &'a [u8],
}

impl<'a> Datagram<'a> {
    /// Parses an IPv4 or IPv6 packet (network header first) carrying UDP.
    pub fn parse(packet: &'a [u8]) -> Option<Datagram<'a>> {
        let (from, to, start): (IpAddr, IpAddr, usize) = match packet.first()? >> 4 {
            4 => {
                let h = packet.get(..20)?;
                let src = <[u8; 4]>::try_from(&h[12..16]).ok()?;
                let dst = <[u8; 4]>::try_from(&h[16..20]).ok()?;
                (src.into(), dst.into(), usize::from(h[0] & 0x0f) * 4)
            }
            6 => {
                let h = packet.get(..40)?;
                let src = <[u8; 16]>::try_from(&h[8..24]).ok()?;
                let dst = <[u8; 16]>::try_from(&h[24..40]).ok()?;
                (src.into(), dst.into(), 40)
            }
            _ => return None,
        };
        let udp = packet.get(start..start + 8)?;
        let port = |at: usize| u16::from_be_bytes([udp[at], udp[at + 1]]);
        Some(Datagram {
            from: SocketAddr::new(from, port(0)),
            to: SocketAddr::new(to, port(2)),
            payload: packet.get(start + 8..)?,
        })
    }
}

/// How long an answer may take.
pub const QUERY_WAIT: Duration = Duration::from_secs(10);
/// Queries awaiting an answer, at most.
pub const MAX_QUERIES: usize = 4096;

/// Queries seen and not yet answered, kept [`QUERY_WAIT`] and at most [`MAX_QUERIES`]: an
/// answer counts only if it comes from the server asked, to the port that asked, with the
/// query's id. A datagram from port 53 that nobody asked for (forged from the local network,
/// or sent to a port with no socket) teaches nothing.
#[derive(Debug, Default)]
pub struct Queries {
    pending: HashMap<(SocketAddr, SocketAddr, u16), Instant>,
}

impl Queries {
    /// Takes one datagram: a query is remembered; an answer to a remembered query gives its
    /// addresses.
    pub fn answers(&mut self, d: &Datagram, now: Instant) -> Vec<Answer> {
        let Some(id) = d.payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return Vec::new();
        };
        let is_response = d.payload.get(2).is_some_and(|f| f & 0x80 != 0);
        if !is_response && d.to.port() == 53 {
            if self.pending.len() >= MAX_QUERIES {
                self.pending
                    .retain(|_, at| now.duration_since(*at) < QUERY_WAIT);
            }
            if self.pending.len() < MAX_QUERIES {
                self.pending.insert((d.from, d.to, id), now);
            }
            return Vec::new();
        }
        if !is_response || d.from.port() != 53 {
            return Vec::new();
        }
        match self.pending.remove(&(d.to, d.from, id)) {
            Some(at) if now.duration_since(at) < QUERY_WAIT => parse_answers(d.payload),
            _ => Vec::new(),
        }
    }
}

/// One address an answer gave, with the question's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub name: String,
    pub ip: IpAddr,
    pub ttl: Duration,
}

/// The A and AAAA records of a DNS response, each under the name that was asked for (not the
/// CNAME chain's last name: `www.example.com`, not `edge-7.cdn.example.net`). Anything that is
/// not a successful response with one question gives nothing.
pub fn parse_answers(msg: &[u8]) -> Vec<Answer> {
    let mut out = Vec::new();
    let word =
        |at: usize| -> Option<u16> { Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?])) };
    let (Some(flags), Some(questions), Some(answers)) = (word(2), word(4), word(6)) else {
        return out;
    };
    // A response (QR), RCODE 0, one question.
    if flags & 0x8000 == 0 || flags & 0x000f != 0 || questions != 1 {
        return out;
    }
    let Some((question, mut at)) = read_name(msg, 12) else {
        return out;
    };
    at += 4; // QTYPE, QCLASS
    for _ in 0..answers {
        let Some((_, after)) = read_name(msg, at) else {
            break;
        };
        let (Some(kind), Some(class)) = (word(after), word(after + 2)) else {
            break;
        };
        let Some(ttl) = msg
            .get(after + 4..after + 8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            break;
        };
        let Some(len) = word(after + 8).map(usize::from) else {
            break;
        };
        let data = after + 10;
        let Some(rdata) = msg.get(data..data + len) else {
            break;
        };
        let ip = match (kind, class, len) {
            (1, 1, 4) => Some(IpAddr::V4(Ipv4Addr::new(
                rdata[0], rdata[1], rdata[2], rdata[3],
            ))),
            (28, 1, 16) => <[u8; 16]>::try_from(rdata)
                .ok()
                .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
            _ => None,
        };
        if let Some(ip) = ip {
            out.push(Answer {
                name: question.clone(),
                ip,
                ttl: Duration::from_secs(u64::from(ttl)),
            });
        }
        at = data + len;
    }
    out
}

/// A name at `at` (labels, perhaps ending in a compression pointer), lower-cased with dots, and
/// where the record goes on after it. Pointers must point backwards, so a loop cannot.
fn read_name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut end = None;
    let mut limit = at;
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => {
                return Some((name, end.unwrap_or(at + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let target = usize::from(u16::from_be_bytes([l & 0x3f, *msg.get(at + 1)?]));
                if target >= limit {
                    return None;
                }
                end.get_or_insert(at + 2);
                limit = target;
                at = target;
            }
            l if l & 0xc0 == 0 => {
                let label = msg.get(at + 1..at + 1 + usize::from(l))?;
                if !name.is_empty() {
                    name.push('.');
                }
                for &b in label {
                    // Names are matched as text: bytes outside printable ASCII are escaped.
                    if b.is_ascii_graphic() && b != b'.' {
                        name.push(b.to_ascii_lowercase() as char);
                    } else {
                        name.push_str(&format!("\\{b:03}"));
                    }
                }
                if name.len() > 255 {
                    return None;
                }
                at += 1 + usize::from(l);
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response to `name` with these records (type, rdata), each with TTL 300, the first
    /// record's owner a pointer to the question and the rest a CNAME-style owner spelled out.
    fn response(name: &str, records: &[(u16, Vec<u8>)], rcode: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34];
        m.extend((0x8180u16 | rcode).to_be_bytes());
        m.extend(1u16.to_be_bytes());
        m.extend((records.len() as u16).to_be_bytes());
        m.extend([0, 0, 0, 0]);
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend(label.as_bytes());
        }
        m.push(0);
        m.extend([0, 1, 0, 1]);
        for (i, (kind, data)) in records.iter().enumerate() {
            if i == 0 {
                m.extend([0xc0, 12]);
            } else {
                m.extend([4, b'e', b'd', b'g', b'e', 0xc0, 12]);
            }
            m.extend(kind.to_be_bytes());
            m.extend([0, 1]);
            m.extend(300u32.to_be_bytes());
            m.extend((data.len() as u16).to_be_bytes());
            m.extend(data);
        }
        m
    }

    #[test]
    fn a_and_aaaa_records_are_named_by_the_question() {
        let cname = vec![4, b'e', b'd', b'g', b'e', 0xc0, 12];
        let msg = response(
            "WWW.Example.com",
            &[
                (5, cname),
                (1, vec![192, 0, 2, 7]),
                (28, Ipv6Addr::LOCALHOST.octets().to_vec()),
            ],
            0,
        );
        let answers = parse_answers(&msg);
        assert_eq!(
            answers,
            vec![
                Answer {
                    name: "www.example.com".into(),
                    ip: "192.0.2.7".parse().unwrap(),
                    ttl: Duration::from_secs(300)
                },
                Answer {
                    name: "www.example.com".into(),
                    ip: "::1".parse().unwrap(),
                    ttl: Duration::from_secs(300)
                },
            ]
        );
    }

    #[test]
    fn failures_queries_and_broken_messages_give_nothing() {
        let ok = response("example.com", &[(1, vec![192, 0, 2, 7])], 0);
        assert_eq!(parse_answers(&ok).len(), 1);
        // NXDOMAIN.
        assert!(parse_answers(&response("example.com", &[(1, vec![192, 0, 2, 7])], 3)).is_empty());
        // A query (QR clear).
        let mut query = ok.clone();
        query[2] &= 0x7f;
        assert!(parse_answers(&query).is_empty());
        // Cut anywhere: no panic, nothing past the cut.
        for n in 0..ok.len() {
            assert!(parse_answers(&ok[..n]).is_empty(), "cut at {n}");
        }
        // A pointer to itself.
        let mut looped = ok.clone();
        looped[12] = 0xc0;
        looped[13] = 12;
        assert!(parse_answers(&looped).is_empty());
    }

    #[test]
    fn datagrams_parse_from_either_network_header() {
        let mut v4 = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        v4.extend([0, 53, 0x90, 0x01, 0, 12, 0, 0, b'd', b'n', b's', b'!']);
        let d = Datagram::parse(&v4).unwrap();
        assert_eq!(d.from, "10.0.0.1:53".parse().unwrap());
        assert_eq!(d.to, "10.0.0.2:36865".parse().unwrap());
        assert_eq!(d.payload, b"dns!");
        let mut v6 = vec![0x60];
        v6.resize(40, 0);
        v6[23] = 1;
        v6[39] = 2;
        v6.extend([0, 53, 0x90, 0x01, 0, 12, 0, 0, b'd', b'n', b's', b'!']);
        let d = Datagram::parse(&v6).unwrap();
        assert_eq!(d.from, "[::1]:53".parse().unwrap());
        assert_eq!(d.to, "[::2]:36865".parse().unwrap());
        assert_eq!(Datagram::parse(&[0x20, 1, 2]), None);
        assert_eq!(Datagram::parse(&v4[..25]), None);
    }

    #[test]
    fn only_an_answer_to_a_query_seen_counts() {
        let t0 = Instant::now();
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let server: SocketAddr = "10.0.0.53:53".parse().unwrap();
        let answer = response("example.com", &[(1, vec![192, 0, 2, 7])], 0);
        let mut query = answer[..12].to_vec();
        query[2] = 0x01;
        let mut q = Queries::default();
        let from_server = Datagram {
            from: server,
            to: client,
            payload: &answer,
        };
        // Unasked: nothing.
        assert!(q.answers(&from_server, t0).is_empty());
        let asked = Datagram {
            from: client,
            to: server,
            payload: &query,
        };
        assert!(q.answers(&asked, t0).is_empty());
        // From another server: nothing.
        let elsewhere = Datagram {
            from: "10.0.0.66:53".parse().unwrap(),
            ..from_server
        };
        assert!(q.answers(&elsewhere, t0).is_empty());
        assert_eq!(q.answers(&from_server, t0).len(), 1);
        // Once only.
        assert!(q.answers(&from_server, t0).is_empty());
        // Too late.
        q.answers(&asked, t0);
        assert!(q.answers(&from_server, t0 + QUERY_WAIT).is_empty());
    }
}
