//! Shaping a namespace pair with shaper's own planner and netlink backend, as the daemon does:
//! shared by the backend tests and the rate tests.

use std::net::SocketAddr;
use std::sync::Arc;

use shaper::policy::{ClassDef, ClassSet, Decision, Each};
use shaper::process::Connection;
use shaper::scan::{Proto, Socket, State};
use shaper::shape::netlink::NetlinkBackend;
use shaper::shape::{Capacity, Handles, PlanInput, TcBackend, plan, reconcile, teardown};
use shaper::units::RatePair;

use super::netns::{Netns, NetnsPair};

/// A flow between the pair: `a` (local) to `b` (remote).
pub fn flow(proto: Proto, family: u8, local_port: u16, remote_port: u16, cookie: u64) -> Socket {
    Socket {
        proto,
        local: SocketAddr::new(NetnsPair::a_addr(family), local_port),
        remote: SocketAddr::new(NetnsPair::b_addr(family), remote_port),
        state: State::Established,
        uid: 0,
        inode: cookie,
        cookie,
        bytes_up: None,
        bytes_down: None,
    }
}

pub fn class(name: &str, ceil: &str, each: Each) -> ClassDef {
    ClassDef {
        name: name.into(),
        prio: 4,
        rate: RatePair::default(),
        ceil: if ceil.is_empty() {
            RatePair::default()
        } else {
            ceil.parse().unwrap()
        },
        each,
        description: None,
        block: false,
    }
}

pub fn class_set(defs: Vec<ClassDef>) -> ClassSet {
    let mut set = ClassSet::default();
    for d in defs {
        set.classes.insert(d.name.clone(), d);
    }
    set
}

pub fn decision(class: &str, limit: &str) -> Decision {
    Decision {
        class: Arc::from(class),
        limit: if limit.is_empty() {
            RatePair::default()
        } else {
            limit.parse().unwrap()
        },
    }
}

/// shaper's backend for namespace `a` and its handle allocation, as the daemon holds them.
pub struct Shaper {
    pub backend: NetlinkBackend,
    pub handles: Handles,
    /// The link's capacity (default: none configured).
    pub capacity: Capacity,
}

impl Shaper {
    pub fn new(ns: &Netns) -> Shaper {
        Shaper {
            backend: ns.run(|| NetlinkBackend::new().expect("netlink in the namespace")),
            handles: Handles::default(),
            capacity: Capacity::default(),
        }
    }

    pub fn desired(
        &mut self,
        classes: &ClassSet,
        flows: &[(Socket, Decision)],
    ) -> shaper::shape::Desired {
        let connections: Vec<Connection> = flows
            .iter()
            .map(|(s, _)| Connection {
                socket: s.clone(),
                owner: None,
                remote_host: None,
            })
            .collect();
        let decisions: Vec<Decision> = flows.iter().map(|(_, d)| d.clone()).collect();
        let features = self.backend.features();
        plan(
            &PlanInput {
                classes,
                connections: &connections,
                decisions: &decisions,
                capacity: self.capacity,
                features,
                mtu: 1500,
                by_priority: false,
            },
            &mut self.handles,
        )
    }

    /// Plans, reconciles against what the kernel has, applies; returns what was applied.
    pub fn apply(
        &mut self,
        classes: &ClassSet,
        flows: &[(Socket, Decision)],
    ) -> shaper::shape::Plan {
        let desired = self.desired(classes, flows);
        let installed = self.backend.installed(NetnsPair::IFNAME).unwrap();
        let plan = reconcile(NetnsPair::IFNAME, &desired, &installed, false).unwrap();
        let failures = self.backend.apply(&plan);
        assert!(failures.is_empty(), "failed: {failures:?}\nplan:\n{plan}");
        plan
    }

    /// As [`Shaper::apply`], returning the number of operations.
    pub fn shape(&mut self, classes: &ClassSet, flows: &[(Socket, Decision)]) -> usize {
        self.apply(classes, flows).ops.len()
    }

    pub fn clear(&mut self) {
        let installed = self.backend.installed(NetnsPair::IFNAME).unwrap();
        let failures = self.backend.apply(&teardown(NetnsPair::IFNAME, &installed));
        assert!(failures.is_empty(), "{failures:?}");
    }
}
