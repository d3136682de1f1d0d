//! An in-memory [`TcBackend`], as netavark's no-op `fwnone` firewall driver stands in for nft:
//! it keeps a model of the links and of what is installed on them, applies operations to that
//! model the way the kernel would (refusing what the kernel refuses: a class under a missing
//! root, a device that does not exist), and records every call. The daemon's cycle runs on it
//! unprivileged in the tests, and `shaper plan` uses it where it cannot read the kernel.
//!
//! The handle is cheap to clone and shared: a test keeps one clone to change the "kernel"
//! (create or re-create a link, make an operation fail) and to read what the daemon did.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::model::DeviceTree;
use super::netlink::{Cause, NetlinkError, Request};
use super::planner::Features;
use super::reconcile::{Op, Plan};
use super::{Installed, LinkState, Redirect, ShapeError, Slot, TcBackend, ifb_name};

/// One device of the model.
#[derive(Debug, Clone)]
struct Device {
    link: LinkState,
    root: Slot<DeviceTree>,
    ingress: Slot<Redirect>,
}

/// Decides whether an operation fails, and with what message.
type FailRule = Box<dyn FnMut(&Op) -> Option<String> + Send>;

struct Model {
    devices: BTreeMap<String, Device>,
    next_index: u32,
    features: Features,
    applied: Vec<Op>,
    reads: usize,
    fail: Option<FailRule>,
}

/// The shared in-memory backend. See the module documentation.
#[derive(Clone)]
pub struct RecordingBackend {
    model: Arc<Mutex<Model>>,
}

impl Default for RecordingBackend {
    fn default() -> Self {
        RecordingBackend::new(Features { fq_codel: true })
    }
}

impl RecordingBackend {
    /// A machine with no links, offering `features`.
    pub fn new(features: Features) -> RecordingBackend {
        RecordingBackend {
            model: Arc::new(Mutex::new(Model {
                devices: BTreeMap::new(),
                next_index: 2,
                features,
                applied: Vec::new(),
                reads: 0,
                fail: None,
            })),
        }
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        // A test that panicked while holding the lock has failed already; its model is still
        // the best account of what happened.
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates `name` with nothing installed, or re-creates it (a new index, nothing installed,
    /// counters from zero) as `ip link del` + `add` would.
    pub fn add_link(&self, name: &str) -> &Self {
        let mut m = self.model();
        let index = m.next_index;
        m.next_index += 1;
        m.devices.insert(name.to_string(), Device::new(index));
        self
    }

    /// Puts `root` and `ingress` on `name`, as another program (or an earlier run) left them.
    pub fn place(&self, name: &str, root: Slot<DeviceTree>, ingress: Slot<Redirect>) {
        if let Some(d) = self.model().devices.get_mut(name) {
            d.root = root;
            d.ingress = ingress;
        }
    }

    /// Adds to `name`'s byte counters.
    pub fn count(&self, name: &str, tx: u64, rx: u64) {
        if let Some(d) = self.model().devices.get_mut(name) {
            d.link.tx_bytes += tx;
            d.link.rx_bytes += rx;
        }
    }

    /// Makes operations fail from now on: `rule` is asked for each one and returns the error
    /// message of those that fail. Replaces any earlier rule.
    pub fn fail_when(&self, rule: impl FnMut(&Op) -> Option<String> + Send + 'static) {
        self.model().fail = Some(Box::new(rule));
    }

    /// Every operation applied so far (failed ones included), and forgets them.
    pub fn take_applied(&self) -> Vec<Op> {
        std::mem::take(&mut self.model().applied)
    }

    /// How many times the installed state was read (the daemon reads it after a failure or a
    /// re-created interface, and otherwise trusts what it applied).
    pub fn reads(&self) -> usize {
        self.model().reads
    }

    /// What is installed for `interface` now.
    pub fn installed_now(&self, interface: &str) -> Option<Installed> {
        self.model().installed(interface)
    }
}

impl Device {
    fn new(index: u32) -> Device {
        Device {
            link: LinkState {
                index,
                tx_bytes: 0,
                rx_bytes: 0,
                tx_packets: 0,
                rx_packets: 0,
                header_len: 14,
                mtu: 1500,
            },
            root: Slot::Free,
            ingress: Slot::Free,
        }
    }
}

impl Model {
    fn installed(&self, interface: &str) -> Option<Installed> {
        let dev = self.devices.get(interface)?;
        Some(Installed {
            upload: dev.root.clone(),
            ingress: dev.ingress.clone(),
            download: self
                .devices
                .get(&ifb_name(interface))
                .map(|d| d.root.clone()),
        })
    }

    fn device(&mut self, name: &str) -> Result<&mut Device, String> {
        self.devices
            .get_mut(name)
            .ok_or_else(|| format!("Cannot find device \"{name}\""))
    }

    fn tree(&mut self, dev: &str) -> Result<&mut DeviceTree, String> {
        match &mut self.device(dev)?.root {
            Slot::Ours(tree) => Ok(tree),
            _ => Err(format!("{dev} has no shaper root qdisc")),
        }
    }

    /// Changes the model as the kernel would change itself for `op`.
    fn apply(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::AddIfb { name } => {
                if self.devices.contains_key(name) {
                    return Err(format!("{name} exists"));
                }
                let index = self.next_index;
                self.next_index += 1;
                self.devices.insert(name.clone(), Device::new(index));
            }
            Op::DeleteIfb { name } => {
                self.devices
                    .remove(name)
                    .ok_or_else(|| format!("Cannot find device \"{name}\""))?;
            }
            Op::AddRoot {
                dev, default_minor, ..
            } => {
                let device = self.device(dev)?;
                if !matches!(device.root, Slot::Free) {
                    return Err(format!("{dev} already has a root qdisc"));
                }
                device.root = Slot::Ours(DeviceTree {
                    default_minor: *default_minor,
                    ..DeviceTree::default()
                });
            }
            Op::DeleteRoot { dev } => self.device(dev)?.root = Slot::Free,
            Op::AddIngress { dev, .. } => self.device(dev)?.ingress = Slot::Ours(Redirect::ToIfb),
            Op::DeleteIngress { dev } => self.device(dev)?.ingress = Slot::Free,
            Op::AddClass { dev, minor, class } | Op::ChangeClass { dev, minor, class } => {
                let adding = matches!(op, Op::AddClass { .. });
                let tree = self.tree(dev)?;
                match (adding, tree.classes.contains_key(minor)) {
                    (true, true) => return Err(format!("class {minor:x} exists")),
                    (false, false) => return Err(format!("no class {minor:x} to change")),
                    _ => {}
                }
                tree.classes.insert(*minor, class.clone());
            }
            Op::DeleteClass { dev, minor } => {
                let tree = self.tree(dev)?;
                tree.classes
                    .remove(minor)
                    .ok_or_else(|| format!("no class {minor:x}"))?;
                tree.leaves.remove(minor);
            }
            Op::AddLeaf { dev, parent, leaf } => {
                self.tree(dev)?.leaves.insert(*parent, *leaf);
            }
            Op::AddFilter {
                dev,
                handle,
                filter,
            } => {
                self.tree(dev)?.filters.insert(*handle, filter.clone());
            }
            Op::DeleteFilter { dev, handle, .. } => {
                self.tree(dev)?
                    .filters
                    .remove(handle)
                    .ok_or_else(|| format!("no filter {handle:x}"))?;
            }
        }
        Ok(())
    }
}

/// An operation the model (or an injected rule) refused, as the kernel would refuse it.
fn refusal(message: String) -> ShapeError {
    ShapeError::Netlink(NetlinkError {
        request: Request::Other,
        device: None,
        cause: Cause::Kernel {
            errno: libc::EINVAL,
            extack: Some(message),
        },
    })
}

impl TcBackend for RecordingBackend {
    fn link(&mut self, interface: &str) -> Result<Option<LinkState>, ShapeError> {
        Ok(self.model().devices.get(interface).map(|d| d.link))
    }

    fn installed(&mut self, interface: &str) -> Result<Installed, ShapeError> {
        let mut m = self.model();
        m.reads += 1;
        m.installed(interface)
            .ok_or_else(|| ShapeError::NoSuchInterface(interface.into()))
    }

    fn apply(&mut self, plan: &Plan) -> Vec<(Op, ShapeError)> {
        let mut m = self.model();
        let mut failures = Vec::new();
        for op in &plan.ops {
            m.applied.push(op.clone());
            let injected = m.fail.as_mut().and_then(|rule| rule(op));
            if let Some(e) = injected.map_or_else(|| m.apply(op).err(), Some) {
                failures.push((op.clone(), refusal(e)));
            }
        }
        failures
    }

    fn features(&mut self) -> Features {
        self.model().features
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::{Direction, teardown};

    #[test]
    fn the_model_follows_operations_like_the_kernel() {
        let mut b = RecordingBackend::default();
        b.add_link("eth0");
        let ops = vec![
            Op::AddRoot {
                dev: "eth0".into(),
                direction: Direction::Upload,
                default_minor: 1,
            },
            Op::AddIfb {
                name: ifb_name("eth0"),
            },
            Op::AddIngress {
                dev: "eth0".into(),
                ifb: ifb_name("eth0"),
            },
            Op::DeleteClass {
                dev: "eth0".into(),
                minor: 7,
            },
        ];
        let failures = b.apply(&Plan { ops });
        assert_eq!(failures.len(), 1, "a missing class cannot be deleted");
        let installed = b.installed("eth0").unwrap();
        assert!(matches!(installed.upload, Slot::Ours(_)));
        assert_eq!(installed.ingress, Slot::Ours(Redirect::ToIfb));
        assert_eq!(installed.download, Some(Slot::Free));
        assert!(b.apply(&teardown("eth0", &installed)).is_empty());
        assert_eq!(b.installed("eth0").unwrap(), Installed::nothing());
        assert!(b.installed("eth1").is_err());
    }
}
