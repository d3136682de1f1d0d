//! Stage 5, **shape**: reconcile the desired shaping with what is installed, and apply the
//! difference over rtnetlink.
//!
//! * [`planner`] turns decisions and classes into the trees that should exist (pure).
//! * [`reconcile`] turns installed + desired into ordered operations that print as `tc`
//!   commands (pure).
//! * [`codec`] owns the tc wire formats; [`netlink`] is the executor that sends them and reads
//!   the installed state back, behind the narrow [`TcBackend`] trait.
//!
//! Ownership: shaper's objects are the root qdisc with handle `5a:` on a shaped interface, the
//! IFB named by [`ifb_name`], and the ingress qdisc whose filter redirects to that IFB. A root or
//! ingress qdisc that is not shaper's is left alone unless the user asks for `--replace`; a tree
//! left by an earlier shaper run is adopted (read back and reconciled).

pub mod codec;
pub mod model;
pub mod netlink;
pub mod planner;
pub mod reconcile;
pub mod recording;
pub mod watch;

pub use model::{DeviceTree, Direction, Framing};
pub use planner::{
    Capacity, Desired, Exhausted, Features, Handles, PlanInput, Target, Targets, plan,
};
pub use reconcile::{Op, Plan, reconcile_device};

/// The IFB shaper creates for an interface's download traffic: `shp-` and up to 11 characters
/// of the interface name (Linux names have at most 15).
pub fn ifb_name(interface: &str) -> String {
    let mut name = String::from("shp-");
    name.extend(interface.chars().take(11));
    name
}

/// What is at a device's root (or ingress) qdisc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot<T> {
    /// Nothing, or the kernel's default qdisc: free to use.
    Free,
    /// shaper's, with what it holds.
    Ours(T),
    /// Someone else's, described for the refusal message (`htb 1:`, `clsact`).
    Foreign(String),
}

/// shaper's ingress redirect, as found in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// It carries download traffic to the interface's IFB.
    ToIfb,
    /// Its target is gone (the IFB was deleted) or is not the IFB: it drops every inbound
    /// packet, so it is removed before anything else is done.
    Dangling,
}

/// What is installed for one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub upload: Slot<DeviceTree>,
    pub ingress: Slot<Redirect>,
    /// The IFB's root, or `None` when the IFB does not exist.
    pub download: Option<Slot<DeviceTree>>,
}

impl Installed {
    /// Nothing installed (an interface shaper has not touched).
    pub fn nothing() -> Installed {
        Installed {
            upload: Slot::Free,
            ingress: Slot::Free,
            download: None,
        }
    }
}

/// Why shaping could not be planned or applied. Messages name the interface and the way out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error(
        "{dev} already has a{which} qdisc that shaper did not install ({what}); shaper will not \
         replace it. Remove it (`tc qdisc del dev {dev} {place}`) or start shaper with --replace"
    )]
    Foreign {
        dev: String,
        which: &'static str,
        place: &'static str,
        what: String,
    },
    #[error("interface {0} does not exist (see `ip link`)")]
    NoSuchInterface(String),
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
}

/// The operations that turn `installed` into `desired` for `interface`. Refuses foreign qdiscs
/// unless `replace`. Order: upload tree, then the IFB and its tree, then the ingress redirect,
/// so download traffic is redirected only once the IFB can shape it.
pub fn reconcile(
    interface: &str,
    desired: &Desired,
    installed: &Installed,
    replace: bool,
) -> Result<Plan, ShapeError> {
    let mut ops = Vec::new();
    let ifb = ifb_name(interface);
    let upload = match &installed.upload {
        Slot::Ours(tree) => Some(tree),
        Slot::Free => None,
        Slot::Foreign(what) if replace => {
            tracing::warn!("replacing {what} on {interface} (--replace)");
            ops.push(Op::DeleteRoot {
                dev: interface.into(),
            });
            None
        }
        Slot::Foreign(what) => {
            return Err(ShapeError::Foreign {
                dev: interface.into(),
                which: " root",
                place: "root",
                what: what.clone(),
            });
        }
    };
    if let Slot::Foreign(what) = &installed.ingress
        && !replace
    {
        return Err(ShapeError::Foreign {
            dev: interface.into(),
            which: "n ingress",
            place: "ingress",
            what: what.clone(),
        });
    }
    ops.extend(reconcile_device(
        interface,
        Direction::Upload,
        &desired.upload,
        upload,
    ));
    let mut ingress = installed.ingress.clone();
    let download = match &installed.download {
        None => {
            ops.push(Op::AddIfb { name: ifb.clone() });
            None
        }
        Some(Slot::Ours(tree)) => Some(tree),
        Some(Slot::Free) => None,
        // The IFB is shaper's by name: when someone else's qdisc is on it, or it is down, a
        // new one replaces it, and the redirect to the old one has to go with it.
        Some(Slot::Foreign(_)) => {
            ops.push(Op::DeleteIfb { name: ifb.clone() });
            ops.push(Op::AddIfb { name: ifb.clone() });
            if ingress == Slot::Ours(Redirect::ToIfb) {
                ingress = Slot::Ours(Redirect::Dangling);
            }
            None
        }
    };
    ops.extend(reconcile_device(
        &ifb,
        Direction::Download,
        &desired.download,
        download,
    ));
    match &ingress {
        Slot::Ours(Redirect::ToIfb) => {}
        Slot::Ours(Redirect::Dangling) => {
            // First of all: until it goes, no inbound packet arrives.
            ops.insert(
                0,
                Op::DeleteIngress {
                    dev: interface.into(),
                },
            );
            ops.push(Op::AddIngress {
                dev: interface.into(),
                ifb,
            });
        }
        Slot::Free => ops.push(Op::AddIngress {
            dev: interface.into(),
            ifb,
        }),
        Slot::Foreign(what) => {
            tracing::warn!("replacing {what} on {interface} ingress (--replace)");
            ops.push(Op::DeleteIngress {
                dev: interface.into(),
            });
            ops.push(Op::AddIngress {
                dev: interface.into(),
                ifb,
            });
        }
    }
    Ok(Plan { ops })
}

/// The operations removing everything shaper installed for `interface`: the redirect first
/// (so no packet is sent to a vanishing IFB), then the IFB, then the upload tree.
pub fn teardown(interface: &str, installed: &Installed) -> Plan {
    let mut ops = Vec::new();
    if matches!(installed.ingress, Slot::Ours(_)) {
        ops.push(Op::DeleteIngress {
            dev: interface.into(),
        });
    }
    if installed.download.is_some() {
        ops.push(Op::DeleteIfb {
            name: ifb_name(interface),
        });
    }
    if matches!(installed.upload, Slot::Ours(_)) {
        ops.push(Op::DeleteRoot {
            dev: interface.into(),
        });
    }
    Plan { ops }
}

/// A link as the kernel reports it: its index (a new one means the interface was re-created),
/// its counters (what accounting counts for `link`, see [`LinkState::ip_bytes`]) and its MTU
/// (what the leaf queues are sized and GSO packets segmented by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// The link-layer header each of its frames carries (14 on Ethernet and Wi-Fi, 0 on tun,
    /// WireGuard and PPP devices), which its byte counters include.
    pub header_len: u32,
    pub mtu: u32,
}

impl LinkState {
    /// Bytes sent and received at the IP layer: the counters less each frame's link-layer
    /// header. The unit every process, class and user is charged in, so that the link less
    /// their sum is what no one owns; with the frames' headers in it, `unattributed` was 14
    /// bytes a frame of everything (a fifth of the ACK direction of a download).
    pub fn ip_bytes(&self) -> (u64, u64) {
        let header = u64::from(self.header_len);
        (
            self.tx_bytes
                .saturating_sub(header.saturating_mul(self.tx_packets)),
            self.rx_bytes
                .saturating_sub(header.saturating_mul(self.rx_packets)),
        )
    }
}

/// The kernel edge of this stage: everything the daemon asks the kernel about links and tc.
/// [`netlink::NetlinkBackend`] talks to the kernel; [`recording::RecordingBackend`] keeps an
/// in-memory model, so the cycle can be tested without privileges.
pub trait TcBackend: Send {
    /// `interface`'s index and counters, or `None` when it does not exist (yet, or any more).
    fn link(&mut self, interface: &str) -> Result<Option<LinkState>, ShapeError>;
    /// What is installed for `interface` (and its IFB).
    fn installed(&mut self, interface: &str) -> Result<Installed, ShapeError>;
    /// Applies `plan` in order, going on past failures; returns every failure with the
    /// operation it belongs to.
    fn apply(&mut self, plan: &Plan) -> Vec<(Op, ShapeError)>;
    /// The optional kernel features available.
    fn features(&mut self) -> Features;
    /// The netlink port the kernel's notifications of this backend's own changes carry, so
    /// [`watch`] can tell them from other programs' (`None`: not the kernel, nothing to watch).
    fn notify_port(&self) -> Option<u32> {
        None
    }
}

#[cfg(test)]
mod tests;

/// The MTU of the interface `name`, as `backend` reads it (rtnetlink, so in the daemon's own
/// network namespace: sysfs shows the namespace it was mounted in); [`planner::UNKNOWN_MTU`]
/// when it cannot be read (then no leaf drops a packet for its size, and none is segmented).
pub fn device_mtu(backend: &mut dyn TcBackend, name: &str) -> u32 {
    match backend.link(name) {
        Ok(Some(link)) if link.mtu > 0 => link.mtu,
        _ => planner::UNKNOWN_MTU,
    }
}
