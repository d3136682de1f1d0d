//! Plans as text: the planner and reconcile are pure, so their output is pinned here as the `tc`
//! commands a reader would type.

use std::sync::Arc;

use super::model::{Direction, Family, Key};
use super::planner::{Capacity, Exhausted, Features, Handles, PlanInput, filter_keys, plan};
use super::{Installed, Redirect, ShapeError, Slot, reconcile, teardown};
use crate::policy::{ClassDef, ClassSet, Decision, Each};
use crate::process::{Connection, Owner};
use crate::scan::{Proto, Socket, State};
use crate::units::RatePair;

fn socket(proto: Proto, local: &str, remote: &str, cookie: u64) -> Socket {
    Socket {
        proto,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        state: State::Established,
        uid: 1000,
        inode: cookie + 1000,
        cookie,
        bytes_up: None,
        bytes_down: None,
    }
}

fn conn(local: &str, remote: &str, cookie: u64, pid: u32) -> Connection {
    Connection {
        socket: socket(Proto::Tcp, local, remote, cookie),
        owner: Some(Owner {
            pid,
            others: vec![],
        }),
        remote_host: None,
    }
}

fn classes(bulk_ceil: &str, each: Each) -> ClassSet {
    let mut set = ClassSet::default();
    let bulk = ClassDef {
        name: "bulk".into(),
        prio: 7,
        rate: RatePair::default(),
        ceil: bulk_ceil.parse().unwrap(),
        each,
        description: None,
        block: false,
    };
    set.classes.insert(bulk.name.clone(), bulk);
    set
}

fn decision(class: &str, limit: &str) -> Decision {
    Decision {
        class: Arc::from(class),
        limit: if limit.is_empty() {
            RatePair::default()
        } else {
            limit.parse().unwrap()
        },
    }
}

struct Case {
    classes: ClassSet,
    connections: Vec<Connection>,
    decisions: Vec<Decision>,
    /// The kernel has fq_codel: one leaf per class (without it, flow buckets).
    fq_codel: bool,
    framing: super::Framing,
}

impl Case {
    fn basic() -> Case {
        Case {
            classes: classes("2mbit:8mbit", Each::Class),
            connections: vec![
                conn("10.0.0.1:40001", "10.0.0.2:443", 1, 100),
                conn("10.0.0.1:40002", "10.0.0.2:22", 2, 101),
                conn("10.0.0.1:40003", "10.0.0.2:80", 3, 101),
            ],
            decisions: vec![
                decision("bulk", ""),
                decision("default", "1mbit"),
                decision("default", ""),
            ],
            fq_codel: true,
            framing: super::Framing::default(),
        }
    }

    fn desired(&self, handles: &mut Handles) -> super::Desired {
        self.desired_with(handles, false)
    }

    fn desired_with(&self, handles: &mut Handles, by_priority: bool) -> super::Desired {
        plan(
            &PlanInput {
                classes: &self.classes,
                connections: &self.connections,
                decisions: &self.decisions,
                capacity: Capacity {
                    up: Some("20mbit".parse().unwrap()),
                    down: None,
                    framing: self.framing,
                },
                features: Features {
                    fq_codel: self.fq_codel,
                },
                mtu: 1500,
                by_priority,
            },
            handles,
        )
    }
}

fn installed_from(desired: &super::Desired) -> Installed {
    Installed {
        upload: Slot::Ours(desired.upload.clone()),
        ingress: Slot::Ours(Redirect::ToIfb),
        download: Some(Slot::Ours(desired.download.clone())),
    }
}

#[test]
fn fresh_install_plan() {
    let mut handles = Handles::default();
    let desired = Case::basic().desired(&mut handles);
    let text = reconcile("eth0", &desired, &Installed::nothing(), false)
        .unwrap()
        .to_string();
    let upload: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("ip link"))
        .collect();
    assert_eq!(
        upload.join("\n"),
        "\
tc qdisc add dev eth0 root handle 5a: htb default 13
tc filter add dev eth0 parent 5a: prio 10 protocol ip handle 10: u32 divisor 256
tc filter add dev eth0 parent 5a: prio 10 protocol ip u32 link 10: hashkey mask 0x00ff0000 at 20 match u32 0 0  # bucket = low byte of sport
tc filter add dev eth0 parent 5a: prio 11 protocol ipv6 handle 11: u32 divisor 256
tc filter add dev eth0 parent 5a: prio 11 protocol ipv6 u32 link 11: hashkey mask 0x00ff0000 at 40 match u32 0 0  # bucket = low byte of sport
tc class add dev eth0 parent 5a: classid 5a:1 htb rate 20mbit ceil 20mbit burst 65536b cburst 65536b quantum 200000 prio 0  # link
tc class add dev eth0 parent 5a:1 classid 5a:10 htb rate 200kbit ceil 2mbit burst 65536b cburst 65536b quantum 2500 prio 7  # bulk
tc class add dev eth0 parent 5a:1 classid 5a:12 htb rate 200kbit ceil 20mbit burst 65536b cburst 65536b quantum 2500 prio 4  # default
tc class add dev eth0 parent 5a:10 classid 5a:11 htb rate 200kbit ceil 2mbit burst 65536b cburst 65536b quantum 2500 prio 7  # bulk/shared
tc class add dev eth0 parent 5a:12 classid 5a:13 htb rate 200kbit ceil 20mbit burst 65536b cburst 65536b quantum 2500 prio 4  # default/shared
tc class add dev eth0 parent 5a:12 classid 5a:14 htb rate 200kbit ceil 1mbit burst 65536b cburst 65536b quantum 2500 prio 4  # tcp 10.0.0.1:40002 -> 10.0.0.2:22 established
tc qdisc replace dev eth0 parent 5a:11 fq_codel
tc qdisc replace dev eth0 parent 5a:13 fq_codel
tc qdisc replace dev eth0 parent 5a:14 fq_codel
tc filter add dev eth0 parent 5a: prio 10 protocol ip handle 10:41:1 u32 ht 10:41: match u32 0x00060000 0x00ff0000 at 8 match u32 0x0a000001 0xffffffff at 12 match u32 0x0a000002 0xffffffff at 16 match u32 0x9c4101bb 0xffffffff at 20 flowid 5a:11
tc filter add dev eth0 parent 5a: prio 10 protocol ip handle 10:42:1 u32 ht 10:42: match u32 0x00060000 0x00ff0000 at 8 match u32 0x0a000001 0xffffffff at 12 match u32 0x0a000002 0xffffffff at 16 match u32 0x9c420016 0xffffffff at 20 flowid 5a:14"
    );
    assert!(text.contains("ip link add shp-eth0 type ifb && ip link set shp-eth0 up"));
    assert!(text.contains("tc qdisc add dev shp-eth0 root handle 5a: htb default 13"));
    assert!(
        text.contains("hashkey mask 0x000000ff at 20 match u32 0 0  # bucket = low byte of dport")
    );
    // Download: the remote is the source; the connection to :80 is unlimited default (no filter).
    assert!(
        text.contains("match u32 0x01bb9c41 0xffffffff at 20 flowid 5a:11"),
        "{text}"
    );
    assert!(
        !text.contains("0x9c430050"),
        "default-class connections need no filter"
    );
    assert!(
        text.trim_end().ends_with(
            "tc qdisc add dev eth0 ingress\ntc filter add dev eth0 parent ffff: prio 2 protocol all u32 match u32 0 0 action mirred egress redirect dev shp-eth0 cookie 7368617065723a7265646972656374"
        ),
        "the redirect comes last"
    );
}

#[test]
fn nothing_changed_means_no_operations() {
    let mut handles = Handles::default();
    let case = Case::basic();
    let first = case.desired(&mut handles);
    let second = case.desired(&mut handles);
    assert_eq!(first, second, "handles are stable");
    let plan = reconcile("eth0", &second, &installed_from(&first), false).unwrap();
    assert!(plan.is_empty(), "{plan}");
}

#[test]
fn a_changed_limit_is_a_class_change_in_place() {
    let mut handles = Handles::default();
    let mut case = Case::basic();
    let before = case.desired(&mut handles);
    case.classes = classes("3mbit:8mbit", Each::Class);
    let after = case.desired(&mut handles);
    let plan = reconcile("eth0", &after, &installed_from(&before), false).unwrap();
    let text = plan.to_string();
    assert_eq!(plan.ops.len(), 2, "{text}");
    assert!(text.contains(
        "tc class change dev eth0 parent 5a:1 classid 5a:10 htb rate 200kbit ceil 3mbit"
    ));
    assert!(text.contains(
        "tc class change dev eth0 parent 5a:10 classid 5a:11 htb rate 200kbit ceil 3mbit"
    ));
    // Without fq_codel the byte queues follow the ceiling: 25 ms at 10 Mbit/s.
    case.fq_codel = false;
    let before = case.desired(&mut handles);
    case.classes = classes("10mbit:8mbit", Each::Class);
    let after = case.desired(&mut handles);
    let plan = reconcile("eth0", &after, &installed_from(&before), false).unwrap();
    assert!(
        plan.to_string().contains(
            "tc qdisc replace dev eth0 parent 5a:11 tbf rate 100gbit burst 1600 limit 31250"
        ),
        "{plan}"
    );
    assert!(
        !text.contains("shp-eth0"),
        "download ceiling unchanged: {text}"
    );
}

#[test]
fn a_closed_connection_loses_its_filter_before_its_class() {
    let mut handles = Handles::default();
    let mut case = Case::basic();
    let before = case.desired(&mut handles);
    case.connections.remove(1);
    case.decisions.remove(1);
    let after = case.desired(&mut handles);
    let plan = reconcile("eth0", &after, &installed_from(&before), false).unwrap();
    let text = plan.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "tc filter del dev eth0 parent 5a: prio 10 protocol ip handle 10:42:1 u32",
            "tc class del dev eth0 classid 5a:14",
            "tc filter del dev shp-eth0 parent 5a: prio 10 protocol ip handle 10:42:1 u32",
            "tc class del dev shp-eth0 classid 5a:14",
        ],
        "{text}"
    );
}

#[test]
fn classified_by_priority_the_plan_has_the_same_leaves_and_no_filters() {
    let case = Case::basic();
    let by_filter = case.desired(&mut Handles::default());
    let by_priority = case.desired_with(&mut Handles::default(), true);
    // The same leaves, and two more the classifier alone uses: the one made ahead for a
    // process's next connections (see below) and the holding leaf.
    let next = by_priority.targets[&2].up.unwrap().process;
    let hold = by_priority
        .hold
        .0
        .expect("a holding leaf: a connection has a limit");
    let without_next = |tree: &super::DeviceTree| {
        let (mut classes, mut leaves) = (tree.classes.clone(), tree.leaves.clone());
        for minor in [next, hold] {
            classes.remove(&minor);
            leaves.remove(&minor);
        }
        (classes, leaves)
    };
    assert_eq!(
        without_next(&by_priority.upload),
        (
            by_filter.upload.classes.clone(),
            by_filter.upload.leaves.clone()
        )
    );
    assert_eq!(
        without_next(&by_priority.download),
        (
            by_filter.download.classes.clone(),
            by_filter.download.leaves.clone()
        )
    );
    assert!(by_priority.upload.filters.is_empty() && by_priority.download.filters.is_empty());
    for (key, targets) in &by_filter.targets {
        let leaves = |t: &super::Targets| t.up.zip(t.down).map(|(u, d)| (u.leaf, d.leaf));
        assert_eq!(leaves(&by_priority.targets[key]), leaves(targets), "{key}");
    }

    // Each connection's leaf is the one its u32 filter names in the filter plan.
    for (tree, dir) in [
        (&by_filter.upload, Direction::Upload),
        (&by_filter.download, Direction::Download),
    ] {
        for c in &case.connections {
            let targets = by_priority.targets[&c.socket.key()];
            let target = match dir {
                Direction::Upload => targets.up,
                Direction::Download => targets.down,
            }
            .unwrap();
            let keys = filter_keys(&c.socket, dir).1;
            let filtered = tree
                .filters
                .values()
                .find(|f| f.keys == keys)
                .map_or(tree.default_minor, |f| f.class);
            assert_eq!(target.leaf, filtered, "{}", c.socket);
        }
    }
    // A connection with a leaf of its own (the 1mbit limit): its process's next connections
    // start in a leaf made ahead with that limit, not in the connection's own leaf nor
    // unlimited in the class's shared leaf, where they would run unlimited until decided.
    let limited = by_priority.targets[&2].up.unwrap();
    assert_ne!(limited.leaf, limited.process);
    assert_ne!(limited.process, by_priority.upload.default_minor);
    for tree in [&by_priority.upload, &by_priority.download] {
        let made = &tree.classes[&next];
        assert_eq!(
            (made.ceil, made.label.as_str()),
            (1_000_000, "default/pid 101 next")
        );
        assert_eq!(made.parent, tree.classes[&limited.leaf].parent);
        assert!(tree.leaves.contains_key(&next));
    }
    let down = by_priority.targets[&2].down.unwrap();
    assert_eq!(down.process, next, "one minor serves both directions");
    // Filters classify only what a scan has seen: the u32 path makes nothing ahead.
    let by_filter_limited = by_filter.targets[&2].up.unwrap();
    assert_eq!(by_filter_limited.process, by_filter.upload.default_minor);
    let bulk = by_priority.targets[&1].up.unwrap();
    assert_eq!(bulk.leaf, bulk.process);
}

/// A new connection of a process with a leaf made ahead takes that leaf for its own (its first
/// packets are in it), and the process gets another for the connections after it.
#[test]
fn a_new_connection_takes_the_leaf_made_ahead_for_it() {
    let mut handles = Handles::default();
    let mut case = Case {
        classes: classes("50mbit", Each::Class),
        connections: vec![conn("10.0.0.1:40001", "10.0.0.2:443", 1, 100)],
        decisions: vec![decision("bulk", "2mbit")],
        ..Case::basic()
    };
    let first = case.desired_with(&mut handles, true);
    let (own, next) = {
        let t = first.targets[&1].up.unwrap();
        (t.leaf, t.process)
    };
    case.connections
        .push(conn("10.0.0.1:40002", "10.0.0.2:443", 2, 100));
    case.decisions.push(decision("bulk", "2mbit"));
    let second = case.desired_with(&mut handles, true);
    let (old, new) = (
        second.targets[&1].up.unwrap(),
        second.targets[&2].up.unwrap(),
    );
    assert_eq!(old.leaf, own);
    assert_eq!(new.leaf, next, "the leaf its first packets went to");
    assert_eq!(second.targets[&2].down.unwrap().leaf, next);
    assert_eq!(second.upload.classes[&next].ceil, 2_000_000);
    assert!(![own, next].contains(&new.process), "another made ahead");
    assert_eq!(old.process, new.process);
    assert_eq!(second.upload.classes[&new.process].ceil, 2_000_000);
}

/// The leaf made ahead for a process's next connections is as limited as the most limited of
/// its connections in the class, and goes with the last of them.
#[test]
fn the_leaf_made_ahead_takes_the_least_limit_and_goes_with_its_connections() {
    let mut handles = Handles::default();
    let mut case = Case {
        classes: classes("50mbit", Each::Class),
        connections: vec![
            conn("10.0.0.1:40001", "10.0.0.2:443", 1, 100),
            conn("10.0.0.1:40002", "10.0.0.2:443", 2, 100),
            conn("10.0.0.1:40003", "10.0.0.2:443", 3, 200),
        ],
        decisions: vec![
            decision("bulk", "3mbit"),
            decision("bulk", "2mbit"),
            decision("bulk", ""),
        ],
        ..Case::basic()
    };
    let desired = case.desired_with(&mut handles, true);
    let next = desired.targets[&1].up.unwrap().process;
    assert_eq!(desired.targets[&2].up.unwrap().process, next);
    assert_eq!(desired.upload.classes[&next].ceil, 2_000_000);
    let unlimited = desired.targets[&3].up.unwrap();
    assert_eq!(
        unlimited.process, unlimited.leaf,
        "a process without a limit per connection starts in its class's leaves"
    );
    case.connections.truncate(1);
    case.decisions.truncate(1);
    let desired = case.desired_with(&mut handles, true);
    assert_eq!(desired.upload.classes[&next].ceil, 3_000_000);
    case.decisions = vec![decision("bulk", "")];
    let desired = case.desired_with(&mut handles, true);
    assert!(
        !desired.upload.classes.contains_key(&next),
        "gone with its last"
    );
}

/// On the BPF path the holding leaf, where the kernel keeps a new process's undecided sockets
/// for their first 100 ms, is made once a connection has a limit of its own, as limited as the
/// least of them per direction, under the link, with a burst of two packets (not a class's
/// 64 KiB, which a held flow would send at once); it stays at the least limit seen once they are
/// gone, for the next new process; a class with `each = "connection"` and a ceiling says its
/// limit before any connection; the u32 path has none; a limit the link already sets holds
/// nothing.
#[test]
fn the_holding_leaf_takes_the_least_limit_per_connection_seen_on_the_bpf_path_only() {
    let mut handles = Handles::default();
    let mut case = Case {
        classes: classes("50mbit", Each::Class),
        connections: vec![
            conn("10.0.0.1:40001", "10.0.0.2:443", 1, 100),
            conn("10.0.0.1:40002", "10.0.0.2:443", 2, 200),
        ],
        decisions: vec![decision("bulk", ""), decision("bulk", "")],
        ..Case::basic()
    };
    let desired = case.desired_with(&mut handles, true);
    assert_eq!(
        desired.hold,
        (None, None),
        "no limit per connection: no hold"
    );

    // Up: 3 and 30 Mbit/s, the link 20; down: 4 and 2, the link unlimited.
    case.decisions = vec![
        decision("bulk", "3mbit:4mbit"),
        decision("bulk", "30mbit:2mbit"),
    ];
    let desired = case.desired_with(&mut handles, true);
    let (Some(up), Some(down)) = desired.hold else {
        panic!("a hold each way: {:?}", desired.hold);
    };
    assert_eq!(up, down, "one minor, both ways");
    let held = |tree: &super::model::DeviceTree| tree.classes[&up].clone();
    assert_eq!(held(&desired.upload).ceil, 3_000_000);
    assert_eq!(held(&desired.download).ceil, 2_000_000);
    assert_eq!(held(&desired.upload).parent, super::model::LINK_MINOR);
    assert!(
        held(&desired.upload).cburst < 65_536 && held(&desired.download).burst < 65_536,
        "a burst of a few packets: {:?}",
        held(&desired.upload)
    );
    assert!(desired.upload.leaves.contains_key(&up));
    assert!(desired.download.leaves.contains_key(&up));
    assert!(
        desired.targets.values().all(|t| {
            t.up.is_some_and(|t| t.leaf != up) && t.down.is_some_and(|t| t.leaf != up)
        }),
        "no decided connection is put there"
    );

    case.decisions = vec![decision("bulk", ""), decision("bulk", "")];
    let desired = case.desired_with(&mut handles, true);
    assert_eq!(desired.hold, (Some(up), Some(up)), "kept for the next");
    assert_eq!(desired.download.classes[&up].ceil, 2_000_000);

    // A class whose connections each get a leaf of their own holds from the first plan.
    let mut fresh = Handles::default();
    case.classes = classes("1mbit", Each::Connection);
    case.connections.clear();
    case.decisions.clear();
    let desired = case.desired_with(&mut fresh, true);
    let hold = desired.hold.0.expect("a hold before any connection");
    assert_eq!(desired.upload.classes[&hold].ceil, 1_000_000);

    let mut u32_path = Handles::default();
    case.classes = classes("50mbit", Each::Class);
    case.connections = vec![conn("10.0.0.1:40001", "10.0.0.2:443", 1, 100)];
    case.decisions = vec![decision("bulk", "1mbit")];
    let desired = case.desired_with(&mut u32_path, false);
    assert_eq!(desired.hold, (None, None), "the u32 path holds nothing");
}

#[test]
fn each_process_gives_one_leaf_per_process() {
    let mut handles = Handles::default();
    let case = Case {
        classes: classes("1mbit", Each::Process),
        connections: vec![
            conn("10.0.0.1:40001", "10.0.0.2:443", 1, 100),
            conn("10.0.0.1:40002", "10.0.0.2:443", 2, 100),
            conn("10.0.0.1:40003", "10.0.0.2:443", 3, 200),
        ],
        decisions: vec![
            decision("bulk", ""),
            decision("bulk", ""),
            decision("bulk", ""),
        ],
        ..Case::basic()
    };
    let d = case.desired(&mut handles);
    let leaves: Vec<_> = d
        .upload
        .classes
        .values()
        .filter(|c| c.label.contains("/pid"))
        .collect();
    assert_eq!(leaves.len(), 2, "one per process");
    assert!(leaves.iter().all(|c| c.ceil == 1_000_000));
    let inner = d
        .upload
        .classes
        .values()
        .find(|c| c.label == "bulk")
        .unwrap();
    assert_eq!(
        inner.ceil, 20_000_000,
        "the ceiling applies per process, not to the class"
    );
    let targets: Vec<u16> = d.upload.filters.values().map(|f| f.class).collect();
    assert_eq!(targets[0], targets[1], "same process, same leaf");
    assert_ne!(targets[0], targets[2]);
}

#[test]
fn foreign_qdiscs_are_refused_unless_replace() {
    let desired = Case::basic().desired(&mut Handles::default());
    let installed = Installed {
        upload: Slot::Foreign("htb 1:".into()),
        ingress: Slot::Free,
        download: None,
    };
    let err = reconcile("eth0", &desired, &installed, false).unwrap_err();
    assert!(matches!(err, ShapeError::Foreign { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("eth0 already has a root qdisc") && msg.contains("htb 1:"),
        "{msg}"
    );
    assert!(
        msg.contains("tc qdisc del dev eth0 root") && msg.contains("--replace"),
        "{msg}"
    );
    let plan = reconcile("eth0", &desired, &installed, true).unwrap();
    assert_eq!(plan.ops[0].to_string(), "tc qdisc del dev eth0 root");
    let clsact = Installed {
        upload: Slot::Free,
        ingress: Slot::Foreign("clsact".into()),
        download: None,
    };
    let msg = reconcile("eth0", &desired, &clsact, false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("an ingress qdisc") && msg.contains("clsact"),
        "{msg}"
    );
}

#[test]
fn a_damaged_tree_is_rebuilt() {
    let mut handles = Handles::default();
    let desired = Case::basic().desired(&mut handles);
    let mut damaged = installed_from(&desired);
    if let Slot::Ours(tree) = &mut damaged.upload {
        tree.default_minor = 0;
    }
    let plan = reconcile("eth0", &desired, &damaged, false).unwrap();
    assert_eq!(plan.ops[0].to_string(), "tc qdisc del dev eth0 root");
    assert!(
        plan.ops[1]
            .to_string()
            .starts_with("tc qdisc add dev eth0 root handle 5a:")
    );
}

#[test]
fn teardown_removes_the_redirect_first() {
    let desired = Case::basic().desired(&mut Handles::default());
    let plan = teardown("eth0", &installed_from(&desired)).to_string();
    assert_eq!(
        plan,
        "tc qdisc del dev eth0 ingress\nip link del shp-eth0\ntc qdisc del dev eth0 root\n"
    );
    assert!(teardown("eth0", &Installed::nothing()).is_empty());
}

#[test]
fn keys_for_ipv6_and_unconnected_udp() {
    let v6 = socket(Proto::Udp, "[fd00::1]:5353", "[fd00::2]:443", 9);
    let (family, keys) = filter_keys(&v6, Direction::Upload);
    assert_eq!(family, Family::V6);
    assert_eq!(
        keys[0],
        Key {
            off: 4,
            val: 17 << 8,
            mask: 0xff00
        }
    );
    assert_eq!(
        keys[1],
        Key {
            off: 8,
            val: 0xfd00_0000,
            mask: !0
        }
    );
    assert_eq!(
        keys[4],
        Key {
            off: 20,
            val: 1,
            mask: !0
        }
    );
    assert_eq!(
        keys[8],
        Key {
            off: 36,
            val: 2,
            mask: !0
        }
    );
    assert_eq!(
        keys[9],
        Key {
            off: 40,
            val: (5353 << 16) | 443,
            mask: !0
        }
    );
    let unconnected = socket(Proto::Udp, "0.0.0.0:51413", "0.0.0.0:0", 10);
    let (_, up) = filter_keys(&unconnected, Direction::Upload);
    assert_eq!(
        up,
        [
            Key {
                off: 8,
                val: 17 << 16,
                mask: 0x00ff_0000
            },
            Key {
                off: 20,
                val: 51413 << 16,
                mask: 0xffff_0000
            }
        ]
    );
    let (_, down) = filter_keys(&unconnected, Direction::Download);
    assert_eq!(
        down[1],
        Key {
            off: 20,
            val: 51413,
            mask: 0xffff
        }
    );
}

#[test]
fn a_dangling_redirect_goes_first_and_comes_back_last() {
    let desired = Case::basic().desired(&mut Handles::default());
    // The IFB was deleted under a working tree: the redirect now points at no device.
    let installed = Installed {
        upload: Slot::Ours(desired.upload.clone()),
        ingress: Slot::Ours(Redirect::Dangling),
        download: None,
    };
    let plan = reconcile("eth0", &desired, &installed, false).unwrap();
    let ops: Vec<String> = plan.ops.iter().map(|o| o.to_string()).collect();
    assert_eq!(
        ops.first().map(String::as_str),
        Some("tc qdisc del dev eth0 ingress"),
        "{plan}"
    );
    assert!(
        ops[1].starts_with("ip link add shp-eth0 type ifb"),
        "{plan}"
    );
    assert!(
        ops.last()
            .unwrap()
            .contains("mirred egress redirect dev shp-eth0"),
        "{plan}"
    );
    let teardown = teardown("eth0", &installed).to_string();
    assert!(
        teardown.contains("tc qdisc del dev eth0 ingress"),
        "{teardown}"
    );
}

#[test]
fn running_out_of_filter_handles_is_reported() {
    // 4,100 connections to one local port share a hash bucket, which holds 4,095 filters.
    let mut case = Case::basic();
    case.connections = (0..4100u64)
        .map(|i| {
            let remote = format!("10.1.{}.{}:5000", i / 200, i % 200 + 1);
            conn("10.0.0.1:443", &remote, i + 1, 100)
        })
        .collect();
    case.decisions = vec![decision("bulk", ""); case.connections.len()];
    let mut handles = Handles::default();
    let desired = case.desired(&mut handles);
    assert_eq!(desired.upload.filters.len(), 4095);
    assert_eq!(
        handles.exhausted(),
        Exhausted {
            minors: 0,
            filters: 2 * 5
        },
        "five connections, upload and download"
    );
    assert!(
        handles
            .exhausted()
            .to_string()
            .contains("4095 connections per hash bucket")
    );
    case.connections.truncate(4095);
    case.decisions.truncate(4095);
    case.desired(&mut handles);
    assert_eq!(handles.exhausted(), Exhausted::default());
}

/// Without fq_codel, a class's connections are spread over flow buckets, HTB leaves under the
/// class served round-robin: the first seven of a class each get a bucket of their own (bucket 0
/// also takes what no filter matched), keep it while they last, and a new connection takes the
/// least loaded one.
#[test]
fn without_fq_codel_connections_get_flow_buckets_of_their_own() {
    use super::planner::FLOW_BUCKETS;
    let mut case = Case::basic();
    case.fq_codel = false;
    case.connections = (0..7)
        .map(|i| conn(&format!("10.0.0.1:{}", 41000 + i), "10.0.0.2:443", i, 100))
        .collect();
    case.decisions = vec![decision("bulk", ""); 7];
    let mut handles = Handles::default();
    let first = case.desired(&mut handles);
    let tree = &first.upload;
    let inner = *tree
        .classes
        .iter()
        .find(|(_, c)| c.label == "bulk")
        .unwrap()
        .0;
    let buckets: Vec<u16> = tree
        .classes
        .iter()
        .filter(|(_, c)| c.parent == inner)
        .map(|(m, _)| *m)
        .collect();
    assert_eq!(buckets.len(), FLOW_BUCKETS);
    for minor in &buckets {
        let bucket = &tree.classes[minor];
        assert_eq!((bucket.rate, bucket.ceil), (200_000 / 8 / 8 * 8, 2_000_000));
        assert_eq!(bucket.burst, 3200, "two packets: 2 ms at 25 kbit/s is less");
        assert!(
            matches!(
                tree.leaves[minor],
                super::model::Leaf::Tbf {
                    burst: 1600,
                    limit: 12_800,
                    ..
                }
            ),
            "{:?}",
            tree.leaves[minor]
        );
    }
    let shared = buckets[0];
    let mut used: Vec<u16> = case
        .connections
        .iter()
        .map(|c| first.targets[&c.socket.key()].up.unwrap().leaf)
        .collect();
    assert!(
        !used.contains(&shared),
        "bucket 0 is left to unmatched traffic"
    );
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 7, "seven connections, seven buckets");
    for c in &case.connections {
        let t = first.targets[&c.socket.key()];
        assert_eq!(
            t.up.unwrap().leaf,
            t.down.unwrap().leaf,
            "same bucket both ways"
        );
        assert_eq!(
            t.up.unwrap().process,
            shared,
            "new connections start in the shared leaf"
        );
        assert_eq!(
            handles.leaf_minor("bulk", Some(100), c.socket.key()),
            Some(t.up.unwrap().leaf),
            "status reports the bucket"
        );
    }
    // One closes; a new one takes its bucket; the others keep theirs.
    let closed = case.connections.remove(2);
    case.decisions.remove(2);
    case.connections
        .push(conn("10.0.0.1:42000", "10.0.0.2:443", 99, 100));
    case.decisions.push(decision("bulk", ""));
    let second = case.desired(&mut handles);
    for c in &case.connections[..6] {
        let key = c.socket.key();
        assert_eq!(first.targets[&key], second.targets[&key], "{}", c.socket);
    }
    assert_eq!(
        second.targets[&99].up.unwrap().leaf,
        first.targets[&closed.socket.key()].up.unwrap().leaf
    );
    let plan = reconcile("eth0", &second, &installed_from(&first), false).unwrap();
    assert!(
        plan.ops.iter().all(|op| matches!(
            op,
            super::Op::AddFilter { .. } | super::Op::DeleteFilter { .. }
        )),
        "{plan}"
    );
}

/// Leaf queues hold 25 ms at the ceiling, in bytes, at least eight packets and at most 4 MiB;
/// up to 1 Gbit/s a token bucket that never limits splits GSO packets into MTU-sized segments.
#[test]
fn leaf_queues_are_bytes_sized_in_time() {
    use super::model::Leaf;
    use super::planner::leaf_for;
    let no_fq = Features { fq_codel: false };
    let tbf = |burst, limit| Leaf::Tbf {
        rate: 100_000_000_000,
        burst,
        limit,
    };
    assert_eq!(leaf_for(no_fq, 1_000_000, 1500), tbf(1600, 12_800));
    assert_eq!(leaf_for(no_fq, 20_000_000, 1500), tbf(1600, 62_500));
    assert_eq!(
        leaf_for(no_fq, 20_000_000, 9000),
        tbf(9600, 76_800),
        "jumbo frames fit"
    );
    assert_eq!(leaf_for(no_fq, 1_000_000_000, 1500), tbf(1600, 3_125_000));
    assert_eq!(
        leaf_for(no_fq, 10_000_000_000, 1500),
        Leaf::Bfifo { limit: 4 << 20 }
    );
    assert_eq!(
        leaf_for(Features { fq_codel: true }, 1_000_000, 1500),
        Leaf::FqCodel
    );
}

/// `overhead`, `mpu` and `linklayer` reach every HTB class on both devices, and `shaper plan`
/// prints them as tc would take them.
#[test]
fn link_layer_framing_applies_to_every_class() {
    let mut case = Case::basic();
    case.framing = super::Framing {
        overhead: 44,
        mpu: 64,
        link_layer: super::model::LinkLayer::Atm,
    };
    let desired = case.desired(&mut Handles::default());
    for tree in [&desired.upload, &desired.download] {
        assert!(tree.classes.values().all(|c| c.framing == case.framing));
    }
    let text = reconcile("eth0", &desired, &Installed::nothing(), false)
        .unwrap()
        .to_string();
    assert!(
        text.contains("htb rate 20mbit ceil 20mbit burst 65536b cburst 65536b quantum 200000 prio 0 linklayer atm overhead 44 mpu 64  # link"),
        "{text}"
    );
}

/// A class guaranteed less than eight minimum rates gets fewer buckets: their rates must add up
/// to no more than the class's, or HTB would let them exceed its ceiling together.
#[test]
fn a_slow_class_gets_no_more_buckets_than_its_rate_can_feed() {
    let mut case = Case::basic();
    case.fq_codel = false;
    case.classes = classes("24kbit:8mbit", Each::Class);
    let desired = case.desired(&mut Handles::default());
    let tree = &desired.upload;
    let inner = *tree
        .classes
        .iter()
        .find(|(_, c)| c.label == "bulk")
        .unwrap()
        .0;
    let rates: Vec<u64> = tree
        .classes
        .values()
        .filter(|c| c.parent == inner)
        .map(|c| c.rate)
        .collect();
    assert_eq!(
        rates,
        vec![8000; 3],
        "24 kbit/s feeds three buckets of the 8 kbit/s minimum"
    );
}

/// A blocked class gets no flow buckets: its one leaf drops everything, whatever the kernel.
#[test]
fn a_blocked_class_has_one_dropping_leaf_without_fq_codel() {
    let mut case = Case::basic();
    case.fq_codel = false;
    let mut bulk = case.classes.classes[&*Arc::<str>::from("bulk")].clone();
    bulk.block = true;
    case.classes.classes.insert(bulk.name.clone(), bulk);
    let desired = case.desired(&mut Handles::default());
    let tree = &desired.upload;
    let inner = *tree
        .classes
        .iter()
        .find(|(_, c)| c.label == "bulk")
        .unwrap()
        .0;
    let leaves: Vec<u16> = tree
        .classes
        .iter()
        .filter(|(_, c)| c.parent == inner)
        .map(|(m, _)| *m)
        .collect();
    assert_eq!(leaves.len(), 1, "{leaves:?}");
    assert_eq!(tree.leaves[&leaves[0]], super::planner::BLOCK_LEAF);
    let t = desired.targets[&1].up.unwrap();
    assert!(t.blocked && t.leaf == leaves[0]);
}

/// `default`'s connections share its flow buckets on the BPF path, where a bucket is only a
/// classid in a map; on the u32 path each bucket would cost a filter per connection, so there
/// they stay in bucket 0, the HTB default, with no filter at all.
#[test]
fn default_connections_get_buckets_only_where_they_cost_no_filter() {
    let mut case = Case::basic();
    case.fq_codel = false;
    case.connections = (0..5)
        .map(|i| conn(&format!("10.0.0.1:{}", 42000 + i), "10.0.0.2:443", i, 100))
        .collect();
    case.decisions = vec![decision("default", ""); 5];
    let leaves = |d: &super::Desired| {
        let mut l: Vec<u16> = case
            .connections
            .iter()
            .map(|c| d.targets[&c.socket.key()].up.unwrap().leaf)
            .collect();
        l.sort();
        l.dedup();
        l
    };
    let u32_path = case.desired(&mut Handles::default());
    assert_eq!(leaves(&u32_path), [u32_path.upload.default_minor]);
    assert!(
        u32_path.upload.filters.is_empty(),
        "{:?}",
        u32_path.upload.filters
    );
    let bpf_path = case.desired_with(&mut Handles::default(), true);
    assert_eq!(leaves(&bpf_path).len(), 5, "five connections, five buckets");
    assert!(bpf_path.upload.filters.is_empty());
}

#[test]
fn a_links_ip_bytes_leave_out_each_frames_header() {
    let link = super::LinkState {
        index: 2,
        tx_bytes: 10_000 + 14 * 10,
        rx_bytes: 3_000 + 14 * 40,
        tx_packets: 10,
        rx_packets: 40,
        header_len: 14,
        mtu: 1500,
    };
    assert_eq!(link.ip_bytes(), (10_000, 3_000));
    // A raw-IP device (tun, WireGuard) counts no link-layer header.
    let tun = super::LinkState {
        header_len: 0,
        ..link
    };
    assert_eq!(tun.ip_bytes(), (tun.tx_bytes, tun.rx_bytes));
}
