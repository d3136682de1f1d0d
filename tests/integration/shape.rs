//! The shaping backend against a real kernel: trees installed over netlink in a namespace, read
//! back, reconciled, adopted after a kill, refused next to foreign qdiscs, and torn down. Rates
//! measured through these trees are in the `rates` test binary.

use shaper::policy::{Decision, Each};
use shaper::scan::{Proto, Socket};
use shaper::shape::model::{Class, Direction, Family, Filter, Key};
use shaper::shape::netlink::{Cause, NetlinkError, Request};
use shaper::shape::{Installed, Op, Plan, Redirect, ShapeError, Slot, TcBackend, reconcile};

use crate::support::netns::{Netns, NetnsPair};
use crate::support::shaping::{Shaper, class, class_set, decision, flow};

fn kernel_view(ns: &Netns) -> (String, String) {
    (ns.ip(&["-o", "link", "show"]), tc(ns, &["qdisc", "show"]))
}

fn tc(ns: &Netns, args: &[&str]) -> String {
    let out = ns.command("tc").args(args).output().expect("run tc");
    assert!(
        out.status.success(),
        "tc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `shaper clear -i veth0` in `ns`, which must succeed.
pub(crate) fn shaper_clear(ns: &Netns) {
    let out = ns
        .command(env!("CARGO_BIN_EXE_shaper"))
        .args(["clear", "--interface", "veth0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mixed_flows() -> Vec<(Socket, Decision)> {
    let mut unconnected = flow(Proto::Udp, 4, 5353, 0, 4);
    unconnected.remote = "0.0.0.0:0".parse().unwrap();
    vec![
        (flow(Proto::Tcp, 4, 40001, 443, 1), decision("bulk", "")),
        (
            flow(Proto::Tcp, 6, 40002, 443, 2),
            decision("default", "1mbit:3mbit"),
        ),
        (
            flow(Proto::Udp, 4, 40003, 443, 3),
            decision("bulk", "500kbit"),
        ),
        (unconnected, decision("bulk", "")),
    ]
}

#[test]
fn installed_tree_reads_back_and_nothing_changed_means_nothing_sent() {
    let pair = NetnsPair::new();
    let mut shaper = Shaper::new(&pair.a);
    let classes = class_set(vec![class("bulk", "2mbit:8mbit", Each::Class)]);
    let flows = mixed_flows();
    assert!(shaper.shape(&classes, &flows) > 10);
    let desired = shaper.desired(&classes, &flows);
    let installed = shaper.backend.installed(NetnsPair::IFNAME).unwrap();
    let (Slot::Ours(up), Some(Slot::Ours(down))) = (&installed.upload, &installed.download) else {
        panic!("shaper's trees not recognised: {installed:?}");
    };
    let strip = |t: &shaper::shape::DeviceTree| {
        let mut t = t.clone();
        t.classes.values_mut().for_each(|c| c.label.clear());
        t
    };
    assert_eq!(
        up,
        &strip(&desired.upload),
        "upload tree reads back as installed"
    );
    assert_eq!(
        down,
        &strip(&desired.download),
        "download tree reads back as installed"
    );
    assert_eq!(installed.ingress, Slot::Ours(Redirect::ToIfb));
    let again = reconcile(NetnsPair::IFNAME, &desired, &installed, false).unwrap();
    assert!(
        again.is_empty(),
        "a second reconcile sends nothing:\n{again}"
    );
    let classes_text = tc(&pair.a, &["class", "show", "dev", "veth0"]);
    assert!(
        classes_text.contains("class htb 5a:1 root"),
        "{classes_text}"
    );
    let ingress = tc(&pair.a, &["filter", "show", "dev", "veth0", "ingress"]);
    assert!(
        ingress.contains("mirred (Egress Redirect to device shp-veth0)"),
        "{ingress}"
    );
}

#[test]
fn clear_leaves_the_namespace_as_it_was() {
    let pair = NetnsPair::new();
    let before = kernel_view(&pair.a);
    let mut shaper = Shaper::new(&pair.a);
    let classes = class_set(vec![class("bulk", "2mbit", Each::Connection)]);
    shaper.shape(&classes, &mixed_flows());
    assert_ne!(kernel_view(&pair.a), before);
    shaper.clear();
    assert_eq!(kernel_view(&pair.a), before);
    // Through the command line too.
    shaper.shape(&classes, &mixed_flows());
    shaper_clear(&pair.a);
    assert_eq!(kernel_view(&pair.a), before);
}

#[test]
fn a_redirect_whose_ifb_is_gone_is_removed_by_reconcile_and_by_clear() {
    let pair = NetnsPair::new();
    let before = kernel_view(&pair.a);
    let mut shaper = Shaper::new(&pair.a);
    let classes = class_set(vec![class("bulk", "2mbit", Each::Class)]);
    shaper.shape(&classes, &mixed_flows());
    pair.a.ip(&["link", "del", "shp-veth0"]);
    assert!(
        !pair.inbound_opens(),
        "the dangling redirect drops inbound packets (the fault this test is about)"
    );
    let installed = shaper.backend.installed(NetnsPair::IFNAME).unwrap();
    assert_eq!(installed.ingress, Slot::Ours(Redirect::Dangling));
    // The next reconcile removes it first, then rebuilds.
    let plan = shaper.apply(&classes, &mixed_flows());
    assert_eq!(plan.ops[0].to_string(), "tc qdisc del dev veth0 ingress");
    let installed = shaper.backend.installed(NetnsPair::IFNAME).unwrap();
    assert_eq!(installed.ingress, Slot::Ours(Redirect::ToIfb));
    assert!(pair.inbound_opens_within(crate::support::daemon::allowance(3)));
    // `shaper clear` (no daemon) removes it in the same state.
    pair.a.ip(&["link", "del", "shp-veth0"]);
    shaper_clear(&pair.a);
    assert_eq!(kernel_view(&pair.a), before);
    assert!(pair.inbound_opens_within(crate::support::daemon::allowance(3)));
}

/// Versions before the cookie put the redirect at pref 1 (now the cls_bpf filter's): such a
/// redirect is shaper's, to be replaced (`Dangling`), with its IFB and without it.
#[test]
fn a_redirect_from_before_the_cookie_is_still_recognised_when_its_ifb_is_gone() {
    let pair = NetnsPair::new();
    pair.a.ip(&["link", "add", "shp-veth0", "type", "ifb"]);
    pair.a.ip(&["link", "set", "shp-veth0", "up"]);
    tc(&pair.a, &["qdisc", "add", "dev", "veth0", "ingress"]);
    tc(
        &pair.a,
        &[
            "filter",
            "add",
            "dev",
            "veth0",
            "parent",
            "ffff:",
            "prio",
            "1",
            "protocol",
            "all",
            "u32",
            "match",
            "u32",
            "0",
            "0",
            "action",
            "mirred",
            "egress",
            "redirect",
            "dev",
            "shp-veth0",
        ],
    );
    let mut shaper = Shaper::new(&pair.a);
    let installed = shaper.backend.installed(NetnsPair::IFNAME).unwrap();
    assert_eq!(installed.ingress, Slot::Ours(Redirect::Dangling));
    pair.a.ip(&["link", "del", "shp-veth0"]);
    let installed = shaper.backend.installed(NetnsPair::IFNAME).unwrap();
    assert_eq!(installed.ingress, Slot::Ours(Redirect::Dangling));
}

#[test]
fn a_foreign_root_qdisc_is_refused_without_replace() {
    let pair = NetnsPair::new();
    tc(
        &pair.a,
        &[
            "qdisc", "add", "dev", "veth0", "root", "handle", "1:", "htb",
        ],
    );
    let mut shaper = Shaper::new(&pair.a);
    let classes = class_set(vec![]);
    let desired = shaper.desired(&classes, &mixed_flows());
    let installed = shaper.backend.installed("veth0").unwrap();
    assert_eq!(installed.upload, Slot::Foreign("htb 1:".into()));
    let err = reconcile("veth0", &desired, &installed, false).unwrap_err();
    assert!(matches!(err, ShapeError::Foreign { .. }), "{err}");
    assert!(tc(&pair.a, &["qdisc", "show", "dev", "veth0"]).contains("qdisc htb 1: root"));
    let plan = reconcile("veth0", &desired, &installed, true).unwrap();
    assert!(shaper.backend.apply(&plan).is_empty());
    assert!(tc(&pair.a, &["qdisc", "show", "dev", "veth0"]).contains("qdisc htb 5a: root"));
}

#[test]
fn a_restart_adopts_what_a_killed_run_left() {
    let pair = NetnsPair::new();
    let classes = class_set(vec![class("bulk", "2mbit", Each::Class)]);
    let flows = mixed_flows();
    {
        let mut first = Shaper::new(&pair.a);
        first.shape(&classes, &flows);
        // Dropped without teardown, as after SIGKILL: the kernel keeps the tree.
    }
    let mut second = Shaper::new(&pair.a);
    let installed = second.backend.installed("veth0").unwrap();
    assert!(
        matches!(installed.upload, Slot::Ours(_)),
        "recognised as shaper's: {installed:?}"
    );
    let ops = second.shape(&classes, &flows);
    assert_eq!(ops, 0, "the same decisions need no change");
    let changed = class_set(vec![class("bulk", "3mbit", Each::Class)]);
    // The class, its flow buckets and their queues change in place: nothing is deleted or added.
    let plan = second.apply(&changed, &flows);
    assert!(
        !plan.ops.is_empty()
            && plan
                .ops
                .iter()
                .all(|op| matches!(op, Op::ChangeClass { .. } | Op::AddLeaf { .. })),
        "a small change stays small after adoption:\n{plan}"
    );
    second.clear();
    assert_eq!(
        second.backend.installed("veth0").unwrap(),
        Installed::nothing()
    );
}

#[test]
fn a_refusal_names_the_request_the_device_and_the_kernels_reason() {
    let pair = NetnsPair::new();
    // A root qdisc of shaper's handle without its hash tables: the kernel refuses entries.
    tc(
        &pair.a,
        &[
            "qdisc", "add", "dev", "veth0", "root", "handle", "5a:", "htb",
        ],
    );
    let mut shaper = Shaper::new(&pair.a);
    let filter = Op::AddFilter {
        dev: "veth0".into(),
        handle: 0x0103_4007,
        filter: Filter {
            family: Family::V4,
            keys: vec![Key {
                off: 8,
                val: 6 << 16,
                mask: 0x00ff_0000,
            }],
            class: 0x42,
        },
    };
    let missing = Op::DeleteRoot {
        dev: "nosuch0".into(),
    };
    let failures = shaper.backend.apply(&Plan {
        ops: vec![filter.clone(), missing.clone()],
    });
    assert_eq!(
        failures,
        vec![
            (
                filter,
                ShapeError::Netlink(NetlinkError {
                    request: Request::AddFilter,
                    device: Some("veth0".into()),
                    cause: Cause::Kernel {
                        errno: libc::EINVAL,
                        extack: Some("cls_u32: Specified hash table not found".into()),
                    },
                })
            ),
            (missing, ShapeError::NoSuchInterface("nosuch0".into())),
        ]
    );
}

#[test]
fn a_plan_looks_each_device_up_once_and_again_after_recreating_it() {
    let pair = NetnsPair::new();
    let mut shaper = Shaper::new(&pair.a);
    let classes = class_set(vec![class("bulk", "2mbit:8mbit", Each::Class)]);
    let desired = shaper.desired(&classes, &mixed_flows());
    let installed = shaper.backend.installed(NetnsPair::IFNAME).unwrap();
    let plan = reconcile(NetnsPair::IFNAME, &desired, &installed, false).unwrap();
    let before = shaper.backend.link_lookups;
    assert!(shaper.backend.apply(&plan).is_empty());
    assert!(plan.ops.len() > 10, "{plan}");
    assert_eq!(
        shaper.backend.link_lookups - before,
        2,
        "veth0 once, and its IFB once after creating it:\n{plan}"
    );

    // The IFB deleted and created again within one plan has a new ifindex, which the plan
    // must use (the old one would be refused with ENODEV).
    let ifb = "shp-veth0".to_string();
    let root = Op::AddRoot {
        dev: ifb.clone(),
        direction: Direction::Download,
        default_minor: 1,
    };
    let class = Op::AddClass {
        dev: ifb.clone(),
        minor: 1,
        class: Class {
            parent: 0,
            rate: 8_000_000,
            ceil: 8_000_000,
            burst: 65_536,
            cburst: 65_536,
            quantum: 1600,
            prio: 0,
            framing: Default::default(),
            label: String::new(),
        },
    };
    let recreate = Plan {
        ops: vec![
            Op::DeleteIngress {
                dev: NetnsPair::IFNAME.into(),
            },
            Op::DeleteRoot { dev: ifb.clone() },
            Op::DeleteIfb { name: ifb.clone() },
            Op::AddIfb { name: ifb.clone() },
            root,
            class,
        ],
    };
    let failures = shaper.backend.apply(&recreate);
    assert!(failures.is_empty(), "{failures:?}");
    let qdiscs = tc(&pair.a, &["class", "show", "dev", &ifb]);
    assert!(qdiscs.contains("class htb 5a:1 root"), "{qdiscs}");
}
