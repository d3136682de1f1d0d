//! The executor: sends plans over rtnetlink and reads the installed state back.
//!
//! rtnetlink has no HTB, no class add and no u32 handle control, so every tc message goes through
//! `Handle::request` with messages from [`super::codec`]; links (the IFB) use rtnetlink's
//! builders. Extended acks are on, so a refusal carries the kernel's own explanation
//! ("cls_u32: Handle specified hash table address mismatch"), not just an errno.
//!
//! The backend owns a single-threaded tokio runtime and is used synchronously. Its netlink
//! socket belongs to the network namespace of the thread that created it.

use futures::StreamExt;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::tc::{TcHandle, TcMessage};
use netlink_sys::AsyncSocket;
use rtnetlink::{Handle, LinkIfb};

use super::codec;
use super::model::{DeviceTree, Family, Leaf, MAJOR};
use super::planner::Features;
use super::reconcile::{Op, Plan};
use super::{Installed, ShapeError, Slot, TcBackend, ifb_name};

/// `NLMSGERR_ATTR_MSG`: the extended-ack text.
const NLMSGERR_ATTR_MSG: u16 = 1;

pub struct NetlinkBackend {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
    features: Option<Features>,
    /// Change requests sent so far (dumps not counted), for `status` and the benchmark.
    pub requests_sent: u64,
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

fn describe_error(e: &netlink_packet_core::ErrorMessage) -> String {
    let errno = e.code.map_or(0, |c| -c.get());
    let os = std::io::Error::from_raw_os_error(errno);
    match extack_message(&e.header) {
        Some(text) if !text.is_empty() => format!("{text} ({os})"),
        _ => os.to_string(),
    }
}

impl NetlinkBackend {
    /// Connects in the calling thread's network namespace.
    pub fn new() -> Result<NetlinkBackend, ShapeError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ShapeError::Netlink(format!("cannot start the netlink runtime: {e}")))?;
        // The socket registers with the runtime's reactor, so it is created inside it.
        let _context = runtime.enter();
        let (mut connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| ShapeError::Netlink(format!("cannot open a netlink socket: {e}")))?;
        let socket = connection.socket_mut().socket_ref();
        socket
            .set_ext_ack(true)
            .and_then(|()| socket.set_cap_ack(true))
            .map_err(|e| ShapeError::Netlink(format!("cannot enable extended acks: {e}")))?;
        runtime.spawn(connection);
        Ok(NetlinkBackend {
            runtime,
            handle,
            features: None,
            requests_sent: 0,
        })
    }

    /// Sends one request and waits for its ack.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<(), String> {
        self.requests_sent += 1;
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut handle = self.handle.clone();
        self.runtime.block_on(async move {
            let mut responses = handle.request(request).map_err(|e| e.to_string())?;
            while let Some(m) = responses.next().await {
                if let NetlinkPayload::Error(e) = m.payload
                    && e.code.is_some()
                {
                    return Err(describe_error(&e));
                }
            }
            Ok(())
        })
    }

    /// Sends a dump request and collects the answers.
    fn dump(&mut self, message: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, String> {
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut handle = self.handle.clone();
        self.runtime.block_on(async move {
            let mut responses = handle.request(request).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            while let Some(m) = responses.next().await {
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(describe_error(&e));
                    }
                    _ => {}
                }
            }
            Ok(out)
        })
    }

    /// The ifindex of a link, or `None` if it does not exist.
    pub fn ifindex(&mut self, name: &str) -> Result<Option<u32>, ShapeError> {
        let handle = self.handle.clone();
        let name = name.to_string();
        self.runtime.block_on(async move {
            let mut links = handle.link().get().match_name(name).execute();
            match links.next().await {
                Some(Ok(link)) => Ok(Some(link.header.index)),
                Some(Err(rtnetlink::Error::NetlinkError(e)))
                    if e.code.is_some_and(|c| c.get() == -libc::ENODEV) =>
                {
                    Ok(None)
                }
                Some(Err(e)) => Err(ShapeError::Netlink(e.to_string())),
                None => Ok(None),
            }
        })
    }

    /// A link's index and byte counters, or `None` if it does not exist.
    pub fn link_counters(&mut self, name: &str) -> Result<Option<(u32, u64, u64)>, ShapeError> {
        let handle = self.handle.clone();
        let name = name.to_string();
        self.runtime.block_on(async move {
            let mut links = handle.link().get().match_name(name).execute();
            match links.next().await {
                Some(Ok(link)) => {
                    let (tx, rx) = link
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            netlink_packet_route::link::LinkAttribute::Stats64(s) => {
                                Some((s.tx_bytes, s.rx_bytes))
                            }
                            _ => None,
                        })
                        .unwrap_or((0, 0));
                    Ok(Some((link.header.index, tx, rx)))
                }
                Some(Err(rtnetlink::Error::NetlinkError(e)))
                    if e.code.is_some_and(|c| c.get() == -libc::ENODEV) =>
                {
                    Ok(None)
                }
                Some(Err(e)) => Err(ShapeError::Netlink(e.to_string())),
                None => Ok(None),
            }
        })
    }

    fn require_ifindex(&mut self, name: &str) -> Result<u32, String> {
        match self.ifindex(name) {
            Ok(Some(i)) => Ok(i),
            Ok(None) => Err(ShapeError::NoSuchInterface(name.into()).to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn qdiscs(&mut self, ifindex: u32) -> Result<Vec<TcMessage>, String> {
        let mut msg = TcMessage::default();
        msg.header.index = ifindex as i32;
        Ok(self
            .dump(RouteNetlinkMessage::GetQueueDiscipline(msg))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewQueueDiscipline(q) if q.header.index == ifindex as i32 => {
                    Some(q)
                }
                _ => None,
            })
            .collect())
    }

    fn filters(&mut self, ifindex: u32, parent: TcHandle) -> Result<Vec<TcMessage>, String> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = parent;
        Ok(self
            .dump(RouteNetlinkMessage::GetTrafficFilter(msg))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewTrafficFilter(f) => Some(f),
                _ => None,
            })
            .collect())
    }

    /// What is at the root of a device, and shaper's tree if it is shaper's.
    fn root(&mut self, ifindex: u32) -> Result<Slot<DeviceTree>, String> {
        let qdiscs = self.qdiscs(ifindex)?;
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
        let classes = self.dump(RouteNetlinkMessage::GetTrafficClass(TcMessage::with_index(
            ifindex as i32,
        )))?;
        for c in classes {
            if let RouteNetlinkMessage::NewTrafficClass(c) = c
                && let Some((minor, class)) = codec::parse_htb_class(&c)
            {
                tree.classes.insert(minor, class);
            }
        }
        let mut tables = 0;
        for f in self.filters(ifindex, codec::root_handle())? {
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

    fn ingress(&mut self, ifindex: u32, ifb: Option<u32>) -> Result<Slot<()>, String> {
        let qdiscs = self.qdiscs(ifindex)?;
        let Some(q) = qdiscs.iter().find(|q| q.header.parent == TcHandle::INGRESS) else {
            return Ok(Slot::Free);
        };
        let kind = codec::kind_of(q).unwrap_or("?").to_string();
        if kind != "ingress" {
            return Ok(Slot::Foreign(kind));
        }
        let filters = self.filters(
            ifindex,
            TcHandle {
                major: 0xffff,
                minor: 0,
            },
        )?;
        if filters.is_empty() {
            return Ok(Slot::Free); // an empty ingress qdisc: shaper adds its redirect to it
        }
        let ours = ifb.is_some_and(|ifb| {
            filters
                .iter()
                .any(|f| codec::parse_redirect(f) == Some(ifb))
        });
        Ok(if ours {
            Slot::Ours(())
        } else {
            Slot::Foreign("ingress ffff: with other filters".into())
        })
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
                "pfifo (this kernel has no fq_codel)"
            }
        );
        supported
    }

    fn apply_op(&mut self, op: &Op) -> Result<(), String> {
        use RouteNetlinkMessage as R;
        const ADD: u16 = NLM_F_CREATE | NLM_F_EXCL;
        match op {
            Op::AddIfb { name } => {
                let handle = self.handle.clone();
                let link = LinkIfb::new(name).up().build();
                self.runtime
                    .block_on(async move { handle.link().add(link).execute().await })
                    .map_err(|e| e.to_string())
            }
            Op::DeleteIfb { name } => {
                let Some(index) = self.ifindex(name).map_err(|e| e.to_string())? else {
                    return Ok(());
                };
                let handle = self.handle.clone();
                self.runtime
                    .block_on(async move { handle.link().del(index).execute().await })
                    .map_err(|e| e.to_string())
            }
            Op::AddRoot {
                dev,
                direction,
                default_minor,
            } => {
                let i = self.require_ifindex(dev)?;
                self.request(
                    R::NewQueueDiscipline(codec::htb_root(i, *default_minor)),
                    ADD,
                )?;
                for family in [Family::V4, Family::V6] {
                    self.request(R::NewTrafficFilter(codec::u32_table(i, family)), ADD)?;
                    self.request(
                        R::NewTrafficFilter(codec::u32_link(i, family, *direction)),
                        ADD,
                    )?;
                }
                Ok(())
            }
            Op::DeleteRoot { dev } => {
                let i = self.require_ifindex(dev)?;
                self.request(R::DelQueueDiscipline(codec::root_delete(i)), 0)
            }
            Op::AddIngress { dev, ifb } => {
                let i = self.require_ifindex(dev)?;
                let to = self.require_ifindex(ifb)?;
                // An empty ingress qdisc may already be there: create it only if missing.
                self.request(R::NewQueueDiscipline(codec::ingress(i)), NLM_F_CREATE)?;
                self.request(
                    R::NewTrafficFilter(codec::redirect_all(i, to)),
                    NLM_F_CREATE,
                )
            }
            Op::DeleteIngress { dev } => {
                let i = self.require_ifindex(dev)?;
                self.request(R::DelQueueDiscipline(codec::ingress_delete(i)), 0)
            }
            Op::AddClass { dev, minor, class } => {
                let i = self.require_ifindex(dev)?;
                self.request(R::NewTrafficClass(codec::htb_class(i, *minor, class)), ADD)
            }
            Op::ChangeClass { dev, minor, class } => {
                let i = self.require_ifindex(dev)?;
                self.request(
                    R::NewTrafficClass(codec::htb_class(i, *minor, class)),
                    NLM_F_REPLACE,
                )
            }
            Op::DeleteClass { dev, minor } => {
                let i = self.require_ifindex(dev)?;
                self.request(R::DelTrafficClass(codec::class_delete(i, *minor)), 0)
            }
            Op::AddLeaf { dev, parent, leaf } => {
                let i = self.require_ifindex(dev)?;
                let flags = NLM_F_CREATE | NLM_F_REPLACE;
                match self.request(
                    R::NewQueueDiscipline(codec::leaf_qdisc(i, *parent, *leaf)),
                    flags,
                ) {
                    Err(e) if *leaf == Leaf::FqCodel => {
                        // Detected wrongly (or the module vanished): fall back for good.
                        tracing::warn!("fq_codel failed on {dev} ({e}); using pfifo leaves");
                        self.features = Some(Features { fq_codel: false });
                        let fallback = Leaf::Pfifo { limit: 100 };
                        self.request(
                            R::NewQueueDiscipline(codec::leaf_qdisc(i, *parent, fallback)),
                            flags,
                        )
                    }
                    other => other,
                }
            }
            Op::AddFilter {
                dev,
                handle,
                filter,
            } => {
                let i = self.require_ifindex(dev)?;
                self.request(
                    R::NewTrafficFilter(codec::u32_filter(i, *handle, filter)),
                    ADD,
                )
            }
            Op::DeleteFilter {
                dev,
                handle,
                family,
            } => {
                let i = self.require_ifindex(dev)?;
                self.request(
                    R::DelTrafficFilter(codec::u32_filter_delete(i, *handle, *family)),
                    0,
                )
            }
        }
    }
}

impl TcBackend for NetlinkBackend {
    fn link(&mut self, interface: &str) -> Result<Option<super::LinkState>, ShapeError> {
        let link = self.link_counters(interface)?;
        Ok(link.map(|(index, tx_bytes, rx_bytes)| super::LinkState {
            index,
            tx_bytes,
            rx_bytes,
        }))
    }

    fn installed(&mut self, interface: &str) -> Result<Installed, ShapeError> {
        let index = self
            .ifindex(interface)?
            .ok_or_else(|| ShapeError::NoSuchInterface(interface.into()))?;
        let ifb = self.ifindex(&ifb_name(interface))?;
        let upload = self.root(index).map_err(ShapeError::Netlink)?;
        let ingress = self.ingress(index, ifb).map_err(ShapeError::Netlink)?;
        let download = match ifb {
            Some(i) => Some(self.root(i).map_err(ShapeError::Netlink)?),
            None => None,
        };
        Ok(Installed {
            upload,
            ingress,
            download,
        })
    }

    fn apply(&mut self, plan: &Plan) -> Vec<(Op, String)> {
        let mut failures = Vec::new();
        for op in &plan.ops {
            if let Err(e) = self.apply_op(op) {
                tracing::debug!("failed: {op}: {e}");
                failures.push((op.clone(), e));
            }
        }
        failures
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
