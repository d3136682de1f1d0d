//! Kernel notifications about shaper's devices: a change someone else makes underneath the
//! daemon is noticed within milliseconds instead of when a later operation fails.
//!
//! A thread listens on rtnetlink's link and tc multicast groups. Every notification names the
//! netlink port of the request that caused it, so the daemon's own changes (sent from the
//! backend's port) are told apart from another program's (`tc`, `ip`, a second shaper). Two
//! things follow from a foreign change:
//!
//! * the interface is marked changed, and the daemon's next cycle reads the kernel instead of
//!   trusting the tree it last applied, so the reconcile repairs (or reports) the difference;
//! * when an IFB of shaper's is deleted, the interface's ingress redirect now sends every inbound
//!   packet to no device. The watcher removes that redirect at once, from its own thread, so
//!   inbound traffic flows unshaped instead of being dropped until the next cycle rebuilds it.
//!
//! The kernel is not polled: a quiet interface costs no netlink message. (The thread wakes
//! every 200 ms only to see whether it should stop.)

use std::collections::BTreeSet;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcMessage, TcOption};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::netlink::NetlinkBackend;
use super::reconcile::{Op, Plan};
use super::{Redirect, Slot, TcBackend, ifb_name};

/// How often the listening thread looks at its stop flag while nothing arrives.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// What the listener shares with the daemon.
#[derive(Default)]
struct Shared {
    /// Shaped interfaces whose tc state (or IFB) another program changed since the last look.
    changed: Mutex<BTreeSet<String>>,
    /// The daemon's BPF programs: a cls_bpf filter running one of them is the daemon's own,
    /// though aya attaches it from a netlink socket of its own, not the backend's.
    own_programs: Mutex<Vec<u32>>,
    stop: AtomicBool,
}

/// The listening thread, stopped on drop.
pub struct Watch {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    /// Starts listening for changes to `interfaces` (and their IFBs) not made from netlink port
    /// `own_port` (the daemon's backend). The socket is opened in the calling thread's network
    /// namespace, which the listening thread also works in.
    pub fn start(interfaces: Vec<String>, own_port: u32) -> io::Result<Watch> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, 0))?;
        socket.add_membership(libc::RTNLGRP_LINK)?;
        socket.add_membership(libc::RTNLGRP_TC)?;
        let shared = Arc::new(Shared::default());
        let listener = Listener {
            socket,
            interfaces,
            own_port,
            shared: shared.clone(),
            repairer: None,
        };
        let thread = std::thread::Builder::new()
            .name("shaper-watch".into())
            .spawn(move || listener.run())?;
        Ok(Watch {
            shared,
            thread: Some(thread),
        })
    }

    /// The interfaces another program changed since the last call.
    pub fn take_changed(&self) -> BTreeSet<String> {
        std::mem::take(&mut *lock(&self.shared.changed))
    }

    /// Tells the listener the kernel ids of the daemon's BPF programs: a tc filter added with
    /// one of them (the download program's cls_bpf filter, where tcx is missing) is the
    /// daemon's own change, not another program's, whatever netlink port it came from.
    pub fn set_own_programs(&self, ids: Vec<u32>) {
        *lock(&self.shared.own_programs) = ids;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Listener {
    socket: Socket,
    interfaces: Vec<String>,
    own_port: u32,
    shared: Arc<Shared>,
    /// Opened the first time an IFB disappears: most daemons never need it.
    repairer: Option<NetlinkBackend>,
}

/// What one notification means for the daemon.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// tc state on this device changed; by adding a cls_bpf filter running `bpf_program`.
    Tc {
        ifindex: u32,
        bpf_program: Option<u32>,
    },
    /// A device was deleted, or set down (`down`): for an IFB, either leaves its redirect
    /// dropping every packet.
    LinkGone {
        name: String,
        down: bool,
    },
    Other,
}

impl Listener {
    fn run(mut self) {
        let mut buf = vec![0u8; 1 << 16];
        while !self.shared.stop.load(Ordering::Relaxed) {
            if !readable(&self.socket, STOP_CHECK) {
                continue;
            }
            buf.clear();
            match self.socket.recv(&mut buf, 0) {
                Ok(_) => {
                    for (port, event) in events(&buf) {
                        self.handle(port, event);
                    }
                }
                // The kernel dropped notifications (ENOBUFS): what was lost is unknown, so every
                // interface is re-read.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    let all = self.interfaces.iter().cloned();
                    lock(&self.shared.changed).extend(all);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(
                        "netlink notifications stopped ({e}); changes made by other programs \
                         are noticed only when an operation fails"
                    );
                    return;
                }
            }
        }
    }

    fn handle(&mut self, port: u32, event: Event) {
        match event {
            Event::Tc {
                bpf_program: Some(id),
                ..
            } if lock(&self.shared.own_programs).contains(&id) => {}
            Event::Tc { ifindex, .. } if port != self.own_port => {
                if let Some(iface) = name_of(ifindex).and_then(|n| self.shaped_by(&n)) {
                    tracing::info!("{iface}: tc state changed by another program; repairing");
                    lock(&self.shared.changed).insert(iface);
                }
            }
            // The backend's own links (an IFB it creates) may be announced before they are up.
            Event::LinkGone { down: true, .. } if port == self.own_port => {}
            Event::LinkGone { name, .. } => {
                let Some(iface) = self.shaped_by(&name) else {
                    return;
                };
                if name != iface {
                    // The IFB: its interface's redirect now drops what it redirects.
                    self.remove_dangling_redirect(&iface);
                }
                lock(&self.shared.changed).insert(iface);
            }
            _ => {}
        }
    }

    /// The shaped interface a device belongs to: itself, or the interface whose IFB it is.
    fn shaped_by(&self, device: &str) -> Option<String> {
        self.interfaces
            .iter()
            .find(|i| *i == device || ifb_name(i) == device)
            .cloned()
    }

    fn remove_dangling_redirect(&mut self, iface: &str) {
        if self.repairer.is_none() {
            match NetlinkBackend::new() {
                Ok(b) => self.repairer = Some(b),
                Err(e) => {
                    tracing::warn!("{iface}: cannot remove the dangling redirect: {e}");
                    return;
                }
            }
        }
        let backend = self.repairer.as_mut().expect("opened above");
        let Ok(installed) = backend.installed(iface) else {
            return; // the interface went too: nothing is redirected
        };
        if installed.ingress != Slot::Ours(Redirect::Dangling) {
            return;
        }
        let plan = Plan {
            ops: vec![Op::DeleteIngress { dev: iface.into() }],
        };
        match backend.apply(&plan).first() {
            None => tracing::warn!(
                "{iface}: its IFB {} was deleted or set down by another program; inbound \
                 traffic flows unshaped until it is rebuilt",
                ifb_name(iface)
            ),
            Some((_, e)) => tracing::error!(
                "{iface}: its IFB went and the redirect to it could not be removed ({e}); \
                 inbound traffic is dropped until `shaper clear -i {iface}`"
            ),
        }
    }
}

/// Waits up to `timeout` for the socket to have something to read.
fn readable(socket: &Socket, timeout: Duration) -> bool {
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    matches!(nix::poll::poll(&mut fds, timeout), Ok(n) if n > 0)
}

/// The notifications in one datagram, each with the netlink port of the request behind it.
fn events(mut buf: &[u8]) -> Vec<(u32, Event)> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        if let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
            let port = m.header.port_number;
            if let NetlinkPayload::InnerMessage(inner) = m.payload {
                out.push((port, event_of(inner)));
            }
        }
        // Messages are 4-byte aligned.
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

fn event_of(message: RouteNetlinkMessage) -> Event {
    use RouteNetlinkMessage as R;
    match message {
        R::NewTrafficFilter(m) => Event::Tc {
            ifindex: m.header.index as u32,
            bpf_program: bpf_program(&m),
        },
        R::NewQueueDiscipline(m)
        | R::DelQueueDiscipline(m)
        | R::NewTrafficClass(m)
        | R::DelTrafficClass(m)
        | R::DelTrafficFilter(m) => Event::Tc {
            ifindex: m.header.index as u32,
            bpf_program: None,
        },
        R::DelLink(l) => link_gone(l, false),
        R::NewLink(l) if !l.header.flags.contains(LinkFlags::Up) => link_gone(l, true),
        _ => Event::Other,
    }
}

/// The program a cls_bpf filter runs (`TCA_BPF_ID`), if the message is about one.
fn bpf_program(filter: &TcMessage) -> Option<u32> {
    filter.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(options) => options.iter().find_map(|o| match o {
            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => Some(*id),
            _ => None,
        }),
        _ => None,
    })
}

fn link_gone(link: LinkMessage, down: bool) -> Event {
    link.attributes
        .into_iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(Event::LinkGone { name, down }),
            _ => None,
        })
        .unwrap_or(Event::Other)
}

/// A device's name from its index, in the calling thread's network namespace.
fn name_of(ifindex: u32) -> Option<String> {
    let name = nix::net::if_::if_indextoname(ifindex).ok()?;
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_route::link::LinkMessage;
    use netlink_packet_route::tc::TcMessage;

    fn datagram(messages: Vec<(u32, RouteNetlinkMessage)>) -> Vec<u8> {
        let mut out = Vec::new();
        for (port, inner) in messages {
            let mut header = NetlinkHeader::default();
            header.port_number = port;
            let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
            m.finalize();
            let mut bytes = vec![0u8; m.buffer_len()];
            m.serialize(&mut bytes);
            out.extend_from_slice(&bytes);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        }
        out
    }

    #[test]
    fn notifications_carry_the_port_and_the_device() {
        let mut gone = LinkMessage::default();
        gone.attributes
            .push(LinkAttribute::IfName("shp-eth0".into()));
        let bytes = datagram(vec![
            (
                4242,
                RouteNetlinkMessage::DelQueueDiscipline(TcMessage::with_index(7)),
            ),
            (0, RouteNetlinkMessage::DelLink(gone)),
        ]);
        assert_eq!(
            events(&bytes),
            vec![
                (
                    4242,
                    Event::Tc {
                        ifindex: 7,
                        bpf_program: None
                    }
                ),
                (
                    0,
                    Event::LinkGone {
                        name: "shp-eth0".into(),
                        down: false
                    }
                ),
            ]
        );
        // A truncated datagram yields what is whole and stops.
        assert_eq!(events(&bytes[..bytes.len() - 3]).len(), 1);
    }

    /// The filter aya adds for the daemon (from a port of its own) names the program it runs.
    #[test]
    fn a_cls_bpf_filter_names_its_program() {
        use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
        let mut filter = TcMessage::with_index(3);
        filter.attributes.push(TcAttribute::Kind("bpf".into()));
        filter
            .attributes
            .push(TcAttribute::Options(vec![TcOption::Bpf(
                TcFilterBpfOption::ProgId(99),
            )]));
        let bytes = datagram(vec![
            (77, RouteNetlinkMessage::NewTrafficFilter(filter)),
            (
                77,
                RouteNetlinkMessage::NewTrafficFilter(TcMessage::with_index(3)),
            ),
        ]);
        let got = events(&bytes);
        assert_eq!(
            got,
            vec![
                (
                    77,
                    Event::Tc {
                        ifindex: 3,
                        bpf_program: Some(99)
                    }
                ),
                (
                    77,
                    Event::Tc {
                        ifindex: 3,
                        bpf_program: None
                    }
                ),
            ]
        );
    }

    #[test]
    fn ifbs_belong_to_their_interface() {
        let listener = Listener {
            socket: Socket::new(NETLINK_ROUTE).unwrap(),
            interfaces: vec!["eth0".into(), "wlan0".into()],
            own_port: 1,
            shared: Arc::default(),
            repairer: None,
        };
        assert_eq!(listener.shaped_by("shp-eth0").as_deref(), Some("eth0"));
        assert_eq!(listener.shaped_by("wlan0").as_deref(), Some("wlan0"));
        assert_eq!(listener.shaped_by("shp-eth1"), None);
    }
}
