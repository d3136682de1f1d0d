//! The executor: sends plans over rtnetlink and reads the installed state back.
//!
//! rtnetlink has no HTB, no class add and no u32 handle control, so every tc message goes through
//! `Handle::request` with messages from [`super::codec`]; links (the IFB) use rtnetlink's
//! builders. Extended acks are on, so a refusal carries the kernel's own explanation
//! ("cls_u32: Handle specified hash table address mismatch"), not just an errno.
//!
//! The backend owns a single-threaded tokio runtime and is used synchronously. Its netlink
//! socket belongs to the network namespace of the thread that created it.
//!
//! Failures are [`NetlinkError`]s: the request, the device and the kernel's errno with its
//! extended-ack text, so callers can tell `ENODEV` from `EINVAL` without reading messages.

use std::fmt;

use futures::StreamExt;
use netlink_packet_core::{
    ErrorMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::tc::{TcHandle, TcMessage};
use netlink_sys::AsyncSocket;
use rtnetlink::{Handle, LinkIfb};
use rustc_hash::FxHashMap;

use super::codec;
use super::model::{DeviceTree, Family, Leaf, MAJOR};
use super::planner::Features;
use super::reconcile::{Op, Plan};
use super::{Installed, Redirect, ShapeError, Slot, TcBackend, ifb_name};

/// `NLMSGERR_ATTR_MSG`: the extended-ack text.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// What a failed request asked the kernel for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Connect,
    LookUpLink,
    AddLink,
    DeleteLink,
    AddQdisc,
    DeleteQdisc,
    AddClass,
    ChangeClass,
    DeleteClass,
    AddFilter,
    DeleteFilter,
    DumpQdiscs,
    DumpClasses,
    DumpFilters,
    /// A message shaper does not send (kept so that reading one needs no panic).
    Other,
}

impl Request {
    /// The request a tc message makes; `flags` tell a class change from an add.
    fn of(message: &RouteNetlinkMessage, flags: u16) -> Request {
        use RouteNetlinkMessage as R;
        match message {
            R::NewQueueDiscipline(_) => Request::AddQdisc,
            R::DelQueueDiscipline(_) => Request::DeleteQdisc,
            R::NewTrafficClass(_) if flags & NLM_F_REPLACE != 0 => Request::ChangeClass,
            R::NewTrafficClass(_) => Request::AddClass,
            R::DelTrafficClass(_) => Request::DeleteClass,
            R::NewTrafficFilter(_) => Request::AddFilter,
            R::DelTrafficFilter(_) => Request::DeleteFilter,
            R::GetQueueDiscipline(_) => Request::DumpQdiscs,
            R::GetTrafficClass(_) => Request::DumpClasses,
            R::GetTrafficFilter(_) => Request::DumpFilters,
            _ => Request::Other,
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Request::Connect => "opening the netlink socket",
            Request::LookUpLink => "looking up link",
            Request::AddLink => "creating link",
            Request::DeleteLink => "deleting link",
            Request::AddQdisc => "adding a qdisc",
            Request::DeleteQdisc => "deleting a qdisc",
            Request::AddClass => "adding a class",
            Request::ChangeClass => "changing a class",
            Request::DeleteClass => "deleting a class",
            Request::AddFilter => "adding a filter",
            Request::DeleteFilter => "deleting a filter",
            Request::DumpQdiscs => "reading the qdiscs",
            Request::DumpClasses => "reading the classes",
            Request::DumpFilters => "reading the filters",
            Request::Other => "a netlink request",
        })
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cause {
    /// The kernel refused: its errno, and the extended ack's explanation when it gave one
    /// ("cls_u32: Handle specified hash table address mismatch").
    #[error("{}", kernel_refusal(*.errno, .extack.as_deref()))]
    Kernel { errno: i32, extack: Option<String> },
    /// The socket failed, or an answer did not decode.
    #[error("{0}")]
    Socket(String),
}

fn kernel_refusal(errno: i32, extack: Option<&str>) -> String {
    let os = std::io::Error::from_raw_os_error(errno);
    match extack {
        Some(text) => format!("{text} ({os})"),
        None => os.to_string(),
    }
}

impl Cause {
    /// The kernel's errno as an I/O error, when it was the kernel that refused.
    pub fn os_error(&self) -> Option<std::io::Error> {
        match self {
            Cause::Kernel { errno, .. } => Some(std::io::Error::from_raw_os_error(*errno)),
            Cause::Socket(_) => None,
        }
    }

    fn from_ack(e: &ErrorMessage) -> Cause {
        Cause::Kernel {
            errno: e.code.map_or(0, |c| -c.get()),
            extack: extack_message(&e.header).filter(|text| !text.is_empty()),
        }
    }

    fn from_rtnetlink(e: rtnetlink::Error) -> Cause {
        match e {
            rtnetlink::Error::NetlinkError(e) => Cause::from_ack(&e),
            other => Cause::Socket(other.to_string()),
        }
    }
}

/// A netlink request that failed: what it asked, of which device, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{request}{}: {cause}", on_device(.device))]
pub struct NetlinkError {
    pub request: Request,
    pub device: Option<String>,
    pub cause: Cause,
}

fn on_device(device: &Option<String>) -> String {
    device
        .as_ref()
        .map(|d| format!(" on {d}"))
        .unwrap_or_default()
}

impl NetlinkError {
    fn new(request: Request, device: &str, cause: Cause) -> NetlinkError {
        NetlinkError {
            request,
            device: Some(device.into()),
            cause,
        }
    }

    fn connect(e: std::io::Error) -> NetlinkError {
        NetlinkError {
            request: Request::Connect,
            device: None,
            cause: Cause::Socket(e.to_string()),
        }
    }
}

pub struct NetlinkBackend {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
    features: Option<Features>,
    /// The socket's netlink port: the kernel's notifications of this backend's changes carry it.
    port: u32,
    /// The ifindex of each device the plan being applied has used: looked up once per plan,
    /// forgotten when the plan creates or deletes that link.
    devices: FxHashMap<String, u32>,
    /// Change requests sent so far (dumps not counted), for `status` and the benchmark.
    pub requests_sent: u64,
    /// Link lookups by name so far, for the tests of the per-plan device cache.
    pub link_lookups: u64,
}

/// The text of an extended ack: the attributes after the echoed request header (16 bytes with
/// `NETLINK_CAP_ACK`).
fn extack_message(header: &[u8]) -> Option<String> {
    let attrs = header.get(16..)?;
    netlink_packet_core::NlasIterator::new(attrs)
        .filter_map(Result::ok)
        .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
        .map(|nla| {
            String::from_utf8_lossy(nla.value())
                .trim_end_matches('\0')
                .to_string()
        })
}

impl NetlinkBackend {
    /// Connects in the calling thread's network namespace.
    pub fn new() -> Result<NetlinkBackend, ShapeError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetlinkError::connect)?;
        // The socket registers with the runtime's reactor, so it is created inside it.
        let _context = runtime.enter();
        let (mut connection, handle, _) =
            rtnetlink::new_connection().map_err(NetlinkError::connect)?;
        let socket = connection.socket_mut().socket_ref();
        socket
            .set_ext_ack(true)
            .and_then(|()| socket.set_cap_ack(true))
            .map_err(NetlinkError::connect)?;
        // Bound now (rather than on the first send) so the port is known from the start.
        let address = connection
            .socket_mut()
            .socket_mut()
            .bind_auto()
            .map_err(NetlinkError::connect)?;
        runtime.spawn(connection);
        Ok(NetlinkBackend {
            runtime,
            handle,
            features: None,
            port: address.port_number(),
            devices: FxHashMap::default(),
            requests_sent: 0,
            link_lookups: 0,
        })
    }

    /// Sends one request about `dev` and waits for its ack.
    fn request(
        &mut self,
        dev: &str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), NetlinkError> {
        self.requests_sent += 1;
        let what = Request::of(&message, flags);
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut handle = self.handle.clone();
        self.runtime
            .block_on(async move {
                let mut responses = handle.request(request).map_err(Cause::from_rtnetlink)?;
                while let Some(m) = responses.next().await {
                    if let NetlinkPayload::Error(e) = m.payload
                        && e.code.is_some()
                    {
                        return Err(Cause::from_ack(&e));
                    }
                }
                Ok(())
            })
            .map_err(|cause| NetlinkError::new(what, dev, cause))
    }

    /// Sends a dump request about `dev` and collects the answers.
    fn dump(
        &mut self,
        dev: &str,
        message: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let what = Request::of(&message, 0);
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut handle = self.handle.clone();
        self.runtime
            .block_on(async move {
                let mut responses = handle.request(request).map_err(Cause::from_rtnetlink)?;
                let mut out = Vec::new();
                while let Some(m) = responses.next().await {
                    match m.payload {
                        NetlinkPayload::InnerMessage(inner) => out.push(inner),
                        NetlinkPayload::Error(e) if e.code.is_some() => {
                            return Err(Cause::from_ack(&e));
                        }
                        _ => {}
                    }
                }
                Ok(out)
            })
            .map_err(|cause| NetlinkError::new(what, dev, cause))
    }

    /// A link by name, or `None` if it does not exist.
    fn link(&mut self, name: &str) -> Result<Option<LinkMessage>, ShapeError> {
        self.link_lookups += 1;
        let handle = self.handle.clone();
        let owned = name.to_string();
        let found = self.runtime.block_on(async move {
            let mut links = handle.link().get().match_name(owned).execute();
            links.next().await.transpose()
        });
        match found.map_err(Cause::from_rtnetlink) {
            Ok(link) => Ok(link),
            Err(Cause::Kernel {
                errno: libc::ENODEV,
                ..
            }) => Ok(None),
            Err(cause) => Err(NetlinkError::new(Request::LookUpLink, name, cause).into()),
        }
    }

    /// The ifindex of a link, or `None` if it does not exist.
    pub fn ifindex(&mut self, name: &str) -> Result<Option<u32>, ShapeError> {
        Ok(self.link(name)?.map(|link| link.header.index))
    }

    /// A link's index, byte counters and MTU, or `None` if it does not exist.
    pub fn link_state(&mut self, name: &str) -> Result<Option<super::LinkState>, ShapeError> {
        Ok(self.link(name)?.map(|link| {
            let [tx_bytes, rx_bytes, tx_packets, rx_packets] = link
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Stats64(s) => {
                        Some([s.tx_bytes, s.rx_bytes, s.tx_packets, s.rx_packets])
                    }
                    _ => None,
                })
                .unwrap_or_default();
            let mtu = link
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                })
                .unwrap_or(0);
            super::LinkState {
                index: link.header.index,
                tx_bytes,
                rx_bytes,
                tx_packets,
                rx_packets,
                header_len: header_len(link.header.link_layer_type),
                mtu,
            }
        }))
    }

    /// The ifindex of `name` for the plan being applied: looked up on first use, then
    /// remembered until the plan ends or creates or deletes that link.
    fn device(&mut self, name: &str) -> Result<u32, ShapeError> {
        if let Some(&index) = self.devices.get(name) {
            return Ok(index);
        }
        let index = self
            .ifindex(name)?
            .ok_or_else(|| ShapeError::NoSuchInterface(name.into()))?;
        self.devices.insert(name.into(), index);
        Ok(index)
    }

    fn qdiscs(&mut self, dev: &str, ifindex: u32) -> Result<Vec<TcMessage>, NetlinkError> {
        let mut msg = TcMessage::default();
        msg.header.index = ifindex as i32;
        Ok(self
            .dump(dev, RouteNetlinkMessage::GetQueueDiscipline(msg))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewQueueDiscipline(q) if q.header.index == ifindex as i32 => {
                    Some(q)
                }
                _ => None,
            })
            .collect())
    }

    fn filters(
        &mut self,
        dev: &str,
        ifindex: u32,
        parent: TcHandle,
    ) -> Result<Vec<TcMessage>, NetlinkError> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = parent;
        Ok(self
            .dump(dev, RouteNetlinkMessage::GetTrafficFilter(msg))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewTrafficFilter(f) => Some(f),
                _ => None,
            })
            .collect())
    }

    /// What is at the root of a device, and shaper's tree if it is shaper's.
    fn root(&mut self, dev: &str, ifindex: u32) -> Result<Slot<DeviceTree>, NetlinkError> {
        let qdiscs = self.qdiscs(dev, ifindex)?;
        let Some(root) = qdiscs.iter().find(|q| q.header.parent == TcHandle::ROOT) else {
            return Ok(Slot::Free);
        };
        let kind = codec::kind_of(root).unwrap_or("?").to_string();
        if root.header.handle.major == 0 {
            return Ok(Slot::Free); // the kernel's default qdisc
        }
        if kind != "htb" || root.header.handle.major != MAJOR {
            return Ok(Slot::Foreign(format!(
                "{kind} {:x}:",
                root.header.handle.major
            )));
        }
        let mut tree = DeviceTree {
            default_minor: codec::parse_htb_default(root).unwrap_or(0),
            ..DeviceTree::default()
        };
        for q in &qdiscs {
            if let Some((parent, leaf)) = codec::parse_leaf(q) {
                tree.leaves.insert(parent, leaf);
            }
        }
        let classes = self.dump(
            dev,
            RouteNetlinkMessage::GetTrafficClass(TcMessage::with_index(ifindex as i32)),
        )?;
        for c in classes {
            if let RouteNetlinkMessage::NewTrafficClass(c) = c
                && let Some((minor, class)) = codec::parse_htb_class(&c)
            {
                tree.classes.insert(minor, class);
            }
        }
        let mut tables = 0;
        for f in self.filters(dev, ifindex, codec::root_handle())? {
            let fh = u32::from(f.header.handle);
            if fh == Family::V4.htid() << 20 || fh == Family::V6.htid() << 20 {
                tables += 1;
            }
            if let Some((handle, filter)) = codec::parse_u32_filter(&f) {
                tree.filters.insert(handle, filter);
            }
        }
        if tables < 2 {
            // Damaged (a run stopped half way): a default of 0 never matches a plan, so the
            // tree is rebuilt.
            tree.default_minor = 0;
        }
        Ok(Slot::Ours(tree))
    }

    /// What is at the ingress of a device. shaper's redirect is recognised by its cookie, or
    /// (installed by a version without the cookie) by its target: the IFB, or no device while
    /// the IFB is missing.
    fn ingress(
        &mut self,
        dev: &str,
        ifindex: u32,
        ifb: Option<IfbLink>,
    ) -> Result<Slot<Redirect>, NetlinkError> {
        let qdiscs = self.qdiscs(dev, ifindex)?;
        let Some(q) = qdiscs.iter().find(|q| q.header.parent == TcHandle::INGRESS) else {
            return Ok(Slot::Free);
        };
        let kind = codec::kind_of(q).unwrap_or("?").to_string();
        if kind != "ingress" {
            return Ok(Slot::Foreign(kind));
        }
        let filters = self.filters(
            dev,
            ifindex,
            TcHandle {
                major: 0xffff,
                minor: 0,
            },
        )?;
        if filters.is_empty() {
            return Ok(Slot::Free); // an empty ingress qdisc: shaper adds its redirect to it
        }
        let redirects: Vec<codec::Redirect> =
            filters.iter().filter_map(codec::parse_redirect).collect();
        Ok(classify_ingress(&redirects, ifb))
    }

    /// Whether the kernel can create an fq_codel qdisc, tried on a scratch IFB.
    fn probe_fq_codel(&mut self) -> bool {
        let name = format!("shp-probe{}", std::process::id() % 100_000);
        let handle = self.handle.clone();
        let created = self.runtime.block_on({
            let name = name.clone();
            async move {
                handle
                    .link()
                    .add(LinkIfb::new(&name).build())
                    .execute()
                    .await
            }
        });
        if let Err(e) = created {
            tracing::debug!(
                "cannot create a scratch IFB to probe fq_codel ({e}); using pfifo leaves"
            );
            return false;
        }
        let supported = match self.ifindex(&name) {
            Ok(Some(index)) => {
                let mut m = TcMessage::with_index(index as i32);
                m.header.parent = TcHandle::ROOT;
                m.header.handle = TcHandle { major: 1, minor: 0 };
                m.attributes
                    .push(netlink_packet_route::tc::TcAttribute::Kind(
                        "fq_codel".into(),
                    ));
                let ok = self
                    .request(
                        &name,
                        RouteNetlinkMessage::NewQueueDiscipline(m),
                        NLM_F_CREATE | NLM_F_EXCL,
                    )
                    .is_ok();
                let handle = self.handle.clone();
                let _ = self
                    .runtime
                    .block_on(async move { handle.link().del(index).execute().await });
                ok
            }
            _ => false,
        };
        tracing::info!(
            "leaf queues: {}",
            if supported {
                "fq_codel"
            } else {
                "flow buckets with segmenting token-bucket leaves (this kernel has no fq_codel)"
            }
        );
        supported
    }

    fn apply_op(&mut self, op: &Op) -> Result<(), ShapeError> {
        use RouteNetlinkMessage as R;
        const ADD: u16 = NLM_F_CREATE | NLM_F_EXCL;
        match op {
            Op::AddIfb { name } => {
                self.devices.remove(name);
                let handle = self.handle.clone();
                let link = LinkIfb::new(name).up().build();
                self.runtime
                    .block_on(async move { handle.link().add(link).execute().await })
                    .map_err(|e| {
                        NetlinkError::new(Request::AddLink, name, Cause::from_rtnetlink(e))
                    })?;
                Ok(())
            }
            Op::DeleteIfb { name } => {
                let index = match self.devices.remove(name) {
                    Some(index) => index,
                    None => match self.ifindex(name)? {
                        Some(index) => index,
                        None => return Ok(()),
                    },
                };
                let handle = self.handle.clone();
                self.runtime
                    .block_on(async move { handle.link().del(index).execute().await })
                    .map_err(|e| {
                        NetlinkError::new(Request::DeleteLink, name, Cause::from_rtnetlink(e))
                    })?;
                Ok(())
            }
            Op::AddRoot {
                dev,
                direction,
                default_minor,
            } => {
                let i = self.device(dev)?;
                self.request(
                    dev,
                    R::NewQueueDiscipline(codec::htb_root(i, *default_minor)),
                    ADD,
                )?;
                for family in [Family::V4, Family::V6] {
                    self.request(dev, R::NewTrafficFilter(codec::u32_table(i, family)), ADD)?;
                    self.request(
                        dev,
                        R::NewTrafficFilter(codec::u32_link(i, family, *direction)),
                        ADD,
                    )?;
                }
                Ok(())
            }
            Op::DeleteRoot { dev } => {
                let i = self.device(dev)?;
                Ok(self.request(dev, R::DelQueueDiscipline(codec::root_delete(i)), 0)?)
            }
            Op::AddIngress { dev, ifb } => {
                let i = self.device(dev)?;
                let to = self.device(ifb)?;
                // An empty ingress qdisc may already be there: create it only if missing.
                self.request(dev, R::NewQueueDiscipline(codec::ingress(i)), NLM_F_CREATE)?;
                Ok(self.request(
                    dev,
                    R::NewTrafficFilter(codec::redirect_all(i, to)),
                    NLM_F_CREATE,
                )?)
            }
            Op::DeleteIngress { dev } => {
                let i = self.device(dev)?;
                Ok(self.request(dev, R::DelQueueDiscipline(codec::ingress_delete(i)), 0)?)
            }
            Op::AddClass { dev, minor, class } => {
                let i = self.device(dev)?;
                Ok(self.request(
                    dev,
                    R::NewTrafficClass(codec::htb_class(i, *minor, class)),
                    ADD,
                )?)
            }
            Op::ChangeClass { dev, minor, class } => {
                let i = self.device(dev)?;
                Ok(self.request(
                    dev,
                    R::NewTrafficClass(codec::htb_class(i, *minor, class)),
                    NLM_F_REPLACE,
                )?)
            }
            Op::DeleteClass { dev, minor } => {
                let i = self.device(dev)?;
                Ok(self.request(dev, R::DelTrafficClass(codec::class_delete(i, *minor)), 0)?)
            }
            Op::AddLeaf { dev, parent, leaf } => {
                let i = self.device(dev)?;
                let flags = NLM_F_CREATE | NLM_F_REPLACE;
                match self.request(
                    dev,
                    R::NewQueueDiscipline(codec::leaf_qdisc(i, *parent, *leaf)),
                    flags,
                ) {
                    Err(e) if *leaf == Leaf::FqCodel => {
                        // Detected wrongly (or the module vanished): fall back for good.
                        tracing::warn!("fq_codel failed on {dev} ({e}); using byte FIFO leaves");
                        self.features = Some(Features { fq_codel: false });
                        let fallback = Leaf::Bfifo { limit: 1 << 20 };
                        Ok(self.request(
                            dev,
                            R::NewQueueDiscipline(codec::leaf_qdisc(i, *parent, fallback)),
                            flags,
                        )?)
                    }
                    other => Ok(other?),
                }
            }
            Op::AddFilter {
                dev,
                handle,
                filter,
            } => {
                let i = self.device(dev)?;
                Ok(self.request(
                    dev,
                    R::NewTrafficFilter(codec::u32_filter(i, *handle, filter)),
                    ADD,
                )?)
            }
            Op::DeleteFilter {
                dev,
                handle,
                family,
            } => {
                let i = self.device(dev)?;
                Ok(self.request(
                    dev,
                    R::DelTrafficFilter(codec::u32_filter_delete(i, *handle, *family)),
                    0,
                )?)
            }
        }
    }
}

/// Whose the redirects on an ingress qdisc are, given the IFB's current index.
/// The IFB as found: its index, and whether it is up.
#[derive(Debug, Clone, Copy)]
struct IfbLink {
    index: u32,
    up: bool,
}

/// Whose the redirects on an ingress qdisc are, given the IFB. A redirect works only to an IFB
/// that exists and is up; to one that is down, or gone (the kernel then reports target 0), it
/// drops what it redirects. One at another pref than [`codec::REDIRECT_PREF`] (an older
/// version's) works but would sit where the first-packet classifier's cls_bpf filter goes: it
/// is reported as dangling too, so reconcile replaces it.
fn classify_ingress(redirects: &[codec::Redirect], ifb: Option<IfbLink>) -> Slot<Redirect> {
    let to_ifb = |r: &codec::Redirect| ifb.is_some_and(|l| r.to_ifindex == l.index);
    let ifb_up = ifb.is_some_and(|l| l.up);
    if ifb_up
        && redirects
            .iter()
            .any(|r| to_ifb(r) && r.pref == codec::REDIRECT_PREF)
    {
        Slot::Ours(Redirect::ToIfb)
    } else if redirects
        .iter()
        .any(|r| r.marked || to_ifb(r) || (ifb.is_none() && r.to_ifindex == 0))
    {
        Slot::Ours(Redirect::Dangling)
    } else {
        Slot::Foreign("ingress ffff: with other filters".into())
    }
}

/// The link-layer header a device of this type puts on each frame (`hard_header_len`, which
/// rtnetlink does not report): Ethernet's for Ethernet, Wi-Fi (shown as Ethernet) and loopback
/// devices; none for the raw-IP ones (tun, WireGuard, PPP, IP tunnels).
fn header_len(kind: LinkLayerType) -> u32 {
    match kind {
        LinkLayerType::Ether | LinkLayerType::Loopback => 14,
        _ => 0,
    }
}

impl TcBackend for NetlinkBackend {
    fn link(&mut self, interface: &str) -> Result<Option<super::LinkState>, ShapeError> {
        self.link_state(interface)
    }

    fn installed(&mut self, interface: &str) -> Result<Installed, ShapeError> {
        let index = self
            .ifindex(interface)?
            .ok_or_else(|| ShapeError::NoSuchInterface(interface.into()))?;
        let ifb_name = ifb_name(interface);
        let ifb = self.link(&ifb_name)?.map(|l| IfbLink {
            index: l.header.index,
            up: l.header.flags.contains(LinkFlags::Up),
        });
        let upload = self.root(interface, index)?;
        let ingress = self.ingress(interface, index, ifb)?;
        let download = match ifb {
            // Down, it is replaced by a new one (see `reconcile`).
            Some(IfbLink { up: false, .. }) => Some(Slot::Foreign(format!("{ifb_name} is down"))),
            Some(l) => Some(self.root(&ifb_name, l.index)?),
            None => None,
        };
        Ok(Installed {
            upload,
            ingress,
            download,
        })
    }

    fn apply(&mut self, plan: &Plan) -> Vec<(Op, ShapeError)> {
        self.devices.clear();
        let mut failures = Vec::new();
        for op in &plan.ops {
            if let Err(e) = self.apply_op(op) {
                tracing::debug!("failed: {op}: {e}");
                failures.push((op.clone(), e));
            }
        }
        // Links may change between plans: the next plan looks its devices up again.
        self.devices.clear();
        failures
    }

    fn notify_port(&self) -> Option<u32> {
        Some(self.port)
    }

    fn features(&mut self) -> Features {
        if let Some(f) = self.features {
            return f;
        }
        let f = Features {
            fq_codel: self.probe_fq_codel(),
        };
        self.features = Some(f);
        f
    }
}
