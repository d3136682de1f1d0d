//! `Daemon::tick` on fakes: sockets from a list, tc in [`RecordingBackend`]'s model, an empty
//! procfs, a stepped clock. No namespace, no netlink, no root.

use std::sync::{Arc, Mutex};

use super::classifier::{Classifier, RecordingClassifier, U32Classifier};
use super::{Daemon, Parts, RunOptions, ShapingState, Sockets};
use crate::config::Config;
use crate::scan::{Proto, ScanError, Socket, SocketSource, State};
use crate::shape::recording::RecordingBackend;
use crate::shape::{Op, Redirect, Slot, ifb_name};
use crate::units::Interval;

/// bulk for ssh, with a limit that doubles at ten o'clock; everything else in default.
const POLICY: &str = r#"
classes = { bulk = { prio = 7 } }
function classify(conn, ctx)
  if conn.remote_port == 22 then
    return "bulk", ctx.time.hour == 10 and "2mbit" or "1mbit"
  end
end
"#;

/// Sockets a test sets; the daemon scans them.
#[derive(Clone, Default)]
struct FakeSockets(Arc<Mutex<Vec<Socket>>>);

impl SocketSource for FakeSockets {
    fn scan(&mut self) -> Result<Vec<Socket>, ScanError> {
        Ok(self.0.lock().unwrap().clone())
    }
    fn name(&self) -> &'static str {
        "fake"
    }
}

fn socket(remote_port: u16, cookie: u64) -> Socket {
    Socket {
        proto: Proto::Tcp,
        local: format!("10.0.0.1:{}", 40000 + cookie).parse().unwrap(),
        remote: format!("10.0.0.2:{remote_port}").parse().unwrap(),
        state: State::Established,
        uid: 1000,
        inode: cookie,
        cookie,
        bytes_up: Some(0),
        bytes_down: Some(0),
    }
}

struct Rig {
    daemon: Daemon,
    sockets: FakeSockets,
    kernel: RecordingBackend,
    clock: Arc<Mutex<jiff::Zoned>>,
    _dir: tempfile::TempDir,
}

fn at(text: &str) -> jiff::Zoned {
    let civil: jiff::civil::DateTime = text.parse().unwrap();
    civil.to_zoned(jiff::tz::TimeZone::UTC).unwrap()
}

impl Rig {
    fn new() -> Rig {
        Rig::build(POLICY, |_| {})
    }

    /// A rig running `policy`, with `configure` applied to its configuration, on the u32 path.
    fn build(policy: &str, configure: impl FnOnce(&mut Config)) -> Rig {
        Rig::build_on(policy, configure, Box::new(U32Classifier::default()))
    }

    /// A rig whose classifier in the kernel is played by the test: it reports new and closed
    /// sockets, and shows what each apply wrote.
    fn with_fast_path() -> (Rig, RecordingClassifier) {
        let classifier = RecordingClassifier::default();
        let rig = Rig::build_on(POLICY, |_| {}, Box::new(classifier.clone()));
        (rig, classifier)
    }

    fn build_on(
        policy: &str,
        configure: impl FnOnce(&mut Config),
        classifier: Box<dyn Classifier>,
    ) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("policy.lua");
        std::fs::write(&script, policy).unwrap();
        std::fs::create_dir(dir.path().join("proc")).unwrap();
        let mut config = Config {
            interfaces: vec!["eth0".into()],
            script,
            state_dir: dir.path().join("state"),
            usage_flush_interval: Interval::from_millis(3_600_000),
            ..Config::default()
        };
        configure(&mut config);
        let sockets = FakeSockets::default();
        let kernel = RecordingBackend::default();
        kernel.add_link("eth0");
        let clock = Arc::new(Mutex::new(at("2026-11-23T09:00:00")));
        let read_clock = clock.clone();
        let parts = Parts {
            sockets: Box::new(sockets.clone()),
            tc: Box::new(kernel.clone()),
            classifier,
            proc_root: dir.path().join("proc"),
            clock: Box::new(move || read_clock.lock().unwrap().clone()),
            names: Box::new(crate::names::NoNames),
        };
        let options = RunOptions {
            script_named: true,
            ..RunOptions::default()
        };
        let daemon = Daemon::with_parts(config, options, parts).unwrap();
        Rig {
            daemon,
            sockets,
            kernel,
            clock,
            _dir: dir,
        }
    }

    /// A new daemon on the same configuration, state dir, sockets, kernel and clock, as after
    /// a restart; the old one is dropped without a flush (as by SIGKILL) unless the test
    /// flushed it.
    fn restart(&mut self) {
        let read_clock = self.clock.clone();
        let parts = Parts {
            sockets: Box::new(self.sockets.clone()),
            tc: Box::new(self.kernel.clone()),
            classifier: Box::new(U32Classifier::default()),
            proc_root: self._dir.path().join("proc"),
            clock: Box::new(move || read_clock.lock().unwrap().clone()),
            names: Box::new(crate::names::NoNames),
        };
        let options = RunOptions {
            script_named: true,
            ..RunOptions::default()
        };
        self.daemon = Daemon::with_parts(self.daemon.config.clone(), options, parts).unwrap();
    }

    fn set_sockets(&self, sockets: Vec<Socket>) {
        *self.sockets.0.lock().unwrap() = sockets;
    }

    fn set_time(&self, text: &str) {
        *self.clock.lock().unwrap() = at(text);
    }

    /// One cycle; returns the operations it applied.
    fn tick(&mut self) -> Vec<Op> {
        self.daemon.tick();
        self.kernel.take_applied()
    }

    fn state(&self) -> &ShapingState {
        &self.daemon.interfaces[0].state
    }
}

fn count(ops: &[Op], what: fn(&Op) -> bool) -> usize {
    ops.iter().filter(|op| what(op)).count()
}

/// The first cycle installs the tree, the IFB and the redirect; the same sockets again change
/// nothing.
fn started() -> Rig {
    let mut rig = Rig::new();
    rig.set_sockets(vec![socket(443, 1)]);
    let ops = rig.tick();
    assert_eq!(*rig.state(), ShapingState::Shaping, "{ops:?}");
    assert_eq!(count(&ops, |o| matches!(o, Op::AddRoot { .. })), 2);
    assert_eq!(count(&ops, |o| matches!(o, Op::AddIngress { .. })), 1);
    assert!(rig.tick().is_empty(), "an unchanged cycle sends nothing");
    rig
}

#[test]
fn a_new_connection_gets_its_leaf_and_filters() {
    let mut rig = started();
    rig.set_sockets(vec![socket(443, 1), socket(22, 2)]);
    let ops = rig.tick();
    // Its own 1 Mbit/s leaf both ways, with a qdisc and a filter on each device.
    let leaves: Vec<_> = ops
        .iter()
        .filter_map(|o| match o {
            Op::AddClass { dev, class, .. } if class.ceil == 1_000_000 => Some(dev.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(leaves, ["eth0", ifb_name("eth0").as_str()], "{ops:?}");
    assert_eq!(count(&ops, |o| matches!(o, Op::AddLeaf { .. })), 2);
    assert_eq!(count(&ops, |o| matches!(o, Op::AddFilter { .. })), 2);
    let flow = rig
        .daemon
        .cycle
        .flows()
        .get(2)
        .expect("a record for the new socket");
    assert_eq!(flow.decision.class.as_ref(), "bulk");
}

#[test]
fn a_changed_limit_changes_the_class_in_place() {
    let mut rig = started();
    rig.set_sockets(vec![socket(443, 1), socket(22, 2)]);
    rig.tick();
    rig.set_time("2026-11-23T10:00:00");
    let ops = rig.tick();
    assert!(!ops.is_empty());
    assert!(
        ops.iter().all(|o| match o {
            Op::ChangeClass { class, .. } => class.ceil == 2_000_000,
            Op::AddLeaf { .. } => true, // the leaf queue resized to the new ceiling
            _ => false,
        }),
        "only class changes: {ops:?}"
    );
    assert_eq!(count(&ops, |o| matches!(o, Op::ChangeClass { .. })), 2);
}

#[test]
fn a_connection_gone_loses_its_filter_and_leaf() {
    let mut rig = started();
    rig.set_sockets(vec![socket(443, 1), socket(22, 2)]);
    rig.tick();
    rig.set_sockets(vec![socket(443, 1)]);
    let ops = rig.tick();
    assert_eq!(count(&ops, |o| matches!(o, Op::DeleteFilter { .. })), 2);
    assert_eq!(count(&ops, |o| matches!(o, Op::DeleteClass { .. })), 2);
    let filter_first = ops
        .iter()
        .position(|o| matches!(o, Op::DeleteFilter { .. }))
        < ops.iter().position(|o| matches!(o, Op::DeleteClass { .. }));
    assert!(filter_first, "filters go before their class: {ops:?}");
    assert!(
        rig.daemon.cycle.flows().get(2).is_none(),
        "its record is gone"
    );
    assert_eq!(rig.daemon.cycle.flows().len(), 1);
}

#[test]
fn a_recreated_interface_is_reinstalled_in_full() {
    let mut rig = started();
    let reads = rig.kernel.reads();
    rig.kernel.add_link("eth0"); // deleted and added again: a new index, nothing installed
    let ops = rig.tick();
    assert_eq!(rig.kernel.reads(), reads + 1, "the kernel is read again");
    assert_eq!(
        count(
            &ops,
            |o| matches!(o, Op::AddRoot { dev, .. } if dev == "eth0")
        ),
        1,
        "{ops:?}"
    );
    assert_eq!(
        count(&ops, |o| matches!(o, Op::AddIngress { .. })),
        1,
        "{ops:?}"
    );
    assert_eq!(*rig.state(), ShapingState::Shaping);
    assert!(matches!(
        rig.kernel.installed_now("eth0").unwrap().upload,
        Slot::Ours(_)
    ));
}

#[test]
fn a_failed_operation_makes_the_next_cycle_read_the_kernel() {
    let mut rig = started();
    let reads = rig.kernel.reads();
    rig.kernel.fail_when(|op| {
        matches!(op, Op::AddFilter { dev, .. } if dev == "eth0").then(|| "No buffer space".into())
    });
    rig.set_sockets(vec![socket(443, 1), socket(22, 2)]);
    let ops = rig.tick();
    assert_eq!(count(&ops, |o| matches!(o, Op::AddFilter { .. })), 2);
    assert_eq!(*rig.state(), ShapingState::Failing(1));
    assert_eq!(rig.daemon.interfaces[0].failures, 1);
    rig.kernel.fail_when(|_| None);
    let ops = rig.tick();
    assert_eq!(
        rig.kernel.reads(),
        reads + 1,
        "the kernel is read, not trusted"
    );
    assert!(
        matches!(ops.as_slice(), [Op::AddFilter { dev, .. }] if dev == "eth0"),
        "only what is missing is added: {ops:?}"
    );
    assert_eq!(*rig.state(), ShapingState::Shaping);
    assert!(rig.tick().is_empty());
}

#[test]
fn a_partial_cycle_decides_only_the_new_connections() {
    let mut rig = started();
    rig.set_sockets(vec![socket(443, 1), socket(22, 2)]);
    rig.tick();
    // At ten the policy would give ssh 2 Mbit/s; a partial cycle for a new connection must not
    // re-decide the old ssh connection.
    rig.set_time("2026-11-23T10:00:00");
    let cycle = &mut rig.daemon.cycle;
    let outcome = cycle.run(
        Sockets::New(vec![socket(22, 3)]),
        super::Inputs {
            now: at("2026-11-23T10:00:00"),
            interface: Some("eth0".into()),
            usage: Arc::new(crate::account::StaticUsage::default()),
            accounting: None,
            links: &[],
            closed: Vec::new(),
            rates: super::Rates::default(),
        },
        &mut super::Timings::default(),
    );
    assert_eq!(outcome.decided, 1);
    let limit = |key| {
        let flows = cycle.flows();
        flows
            .get(key)
            .unwrap()
            .decision
            .limit
            .up
            .unwrap()
            .bits_per_sec()
    };
    assert_eq!(limit(2), 1_000_000, "the old connection kept its decision");
    assert_eq!(limit(3), 2_000_000, "the new one was decided now");
    assert_eq!(cycle.flows().len(), 3);
    // The plan is made from the whole table: the new connection's leaf and filters are added,
    // the old ones stay as they are.
    let iface = &mut rig.daemon.interfaces[0];
    let facts = super::KernelFacts::read(&mut rig.kernel.clone(), iface, false).unwrap();
    let plan = cycle
        .tc_plan(iface, facts, false)
        .unwrap()
        .expect("something changed");
    let ops = &plan.ops.ops;
    assert_eq!(
        count(ops, |o| matches!(o, Op::AddFilter { .. })),
        2,
        "{}",
        plan.ops
    );
    assert_eq!(
        count(ops, |o| matches!(o, Op::AddClass { .. })),
        2,
        "{}",
        plan.ops
    );
    assert!(
        ops.iter().all(|o| matches!(
            o,
            Op::AddFilter { .. } | Op::AddClass { .. } | Op::AddLeaf { .. }
        )),
        "nothing else is touched:\n{}",
        plan.ops
    );
}

#[test]
fn running_out_of_handles_is_reported() {
    let mut rig = started();
    // One u32 hash bucket holds 4095 filters; these all share local port 40000's bucket, and
    // each has a limit of its own (ssh), so each needs a filter.
    let crowd = (1..=4100u64)
        .map(|n| Socket {
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: format!("10.0.{}.{}:22", n / 250, n % 250 + 1)
                .parse()
                .unwrap(),
            ..socket(22, 10 + n)
        })
        .collect();
    rig.set_sockets(crowd);
    rig.tick();
    let status = super::status::StatusReport::of(&rig.daemon, false);
    assert!(status.interfaces[0].unplaced > 0, "{:?}", status.interfaces);
    assert_eq!(*rig.state(), ShapingState::Shaping, "the rest is shaped");
    let text = crate::cli::status::render(&status);
    assert!(text.contains("without a tc handle"), "{text}");
}

#[test]
fn a_dangling_redirect_goes_even_where_a_foreign_root_is_refused() {
    let mut rig = Rig::new();
    // A killed run's redirect to its deleted IFB, and someone's root qdisc since.
    rig.kernel.place(
        "eth0",
        Slot::Foreign("htb 1:".into()),
        Slot::Ours(Redirect::Dangling),
    );
    rig.set_sockets(vec![socket(443, 1)]);
    let ops = rig.tick();
    assert!(
        matches!(rig.state(), ShapingState::Refused(why) if why.contains("--replace")),
        "{}",
        rig.state()
    );
    assert!(
        matches!(
            rig.daemon.nothing_to_shape(),
            Some(crate::daemon::startup::StartError::NothingToShape { .. })
        ),
        "the only interface refused: nothing to shape"
    );
    assert_eq!(
        ops,
        [Op::DeleteIngress { dev: "eth0".into() }],
        "only the redirect that drops inbound traffic goes"
    );
    let installed = rig.kernel.installed_now("eth0").unwrap();
    assert_eq!(installed.ingress, Slot::Free);
    assert_eq!(installed.upload, Slot::Foreign("htb 1:".into()));
}

#[test]
fn priorities_without_a_capacity_are_warned_about_per_direction() {
    use crate::policy::{ClassDef, ClassSet};
    use crate::shape::Capacity;
    let mut classes = ClassSet::default();
    let none = Capacity::default();
    assert_eq!(
        super::cycle::capacity_warning(&classes, none),
        None,
        "one class"
    );
    let bulk = ClassDef {
        name: "bulk".into(),
        prio: 7,
        ..ClassDef::default_class()
    };
    classes.classes.insert(bulk.name.clone(), bulk);
    let w = super::cycle::capacity_warning(&classes, none).unwrap();
    assert!(
        w.contains("uses priorities but uplink and downlink are not set"),
        "{w}"
    );
    let up = Capacity {
        up: Some("18mbit".parse().unwrap()),
        down: None,
        ..Capacity::default()
    };
    let w = super::cycle::capacity_warning(&classes, up).unwrap();
    assert!(w.contains("but downlink is not set"), "{w}");
    let both = Capacity {
        down: Some("90mbit".parse().unwrap()),
        ..up
    };
    assert_eq!(super::cycle::capacity_warning(&classes, both), None);
    // A guaranteed rate is a priority of another kind.
    let mut classes = ClassSet::default();
    let voip = ClassDef {
        name: "voip".into(),
        rate: "1mbit".parse().unwrap(),
        ..ClassDef::default_class()
    };
    classes.classes.insert(voip.name.clone(), voip);
    let w = super::cycle::capacity_warning(&classes, up).unwrap();
    assert!(w.contains("guaranteed rates (voip)"), "{w}");
}

#[test]
fn status_json_gives_numbers_and_the_tc_handles_installed() {
    let mut rig = Rig::new();
    rig.set_sockets(vec![socket(22, 1), socket(443, 2)]);
    rig.tick();
    let status = super::status::StatusReport::of(&rig.daemon, true);
    let json = serde_json::to_value(&status).unwrap();
    let Some(Slot::Ours(tree)) = rig.kernel.installed_now("eth0").unwrap().download else {
        panic!("shaper's tree on the IFB")
    };
    let minor = |handle: &serde_json::Value| {
        let text = handle.as_str().expect("a handle");
        let (major, minor) = text.split_once(':').unwrap();
        assert_eq!(major, "5a", "{text}");
        u16::from_str_radix(minor, 16).unwrap()
    };
    let bulk = json["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bulk")
        .unwrap();
    // Unset means unlimited: null, not a string.
    assert_eq!(bulk["ceil"], serde_json::json!({"up": null, "down": null}));
    assert_eq!(tree.classes[&minor(&bulk["handle"])].prio, 7);
    assert!(tree.leaves.contains_key(&minor(&bulk["shared_handle"])));
    let ssh = json["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["connection"].as_str().unwrap().contains(":22 "))
        .unwrap();
    assert_eq!(
        ssh["limit"],
        serde_json::json!({"up": 1_000_000, "down": 1_000_000})
    );
    assert_eq!(ssh["ceil"]["down"], 1_000_000);
    assert_eq!(tree.classes[&minor(&ssh["handle"])].ceil, 1_000_000);
    assert!(ssh["rate_up"].is_u64(), "{ssh}");
    assert!(json["usage"]["day"]["down"].is_u64(), "{json}");
    assert!(json["link"]["capacity"]["up"].is_null(), "{json}");
    // And the text for people keeps units and shows the handles with --all.
    let text = crate::cli::status::render(&status);
    let handle = ssh["handle"].as_str().unwrap();
    assert!(text.contains("HANDLE") && text.contains(handle), "{text}");
    assert!(text.contains("1mbit"), "{text}");
}

/// The shipped monthly-quota example on a stepped clock: "80 %" and "95 %" pass once each in
/// November however many cycles see them, "80 %" again in December; each reaches
/// `notify_command` (a script writing its environment to a file), `status` and the metrics.
#[test]
fn quota_warnings_pass_once_per_threshold_per_month() {
    use std::os::unix::fs::PermissionsExt;
    let hooks = tempfile::tempdir().unwrap();
    let log = hooks.path().join("events.log");
    let hook = hooks.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\n{{ env | grep ^SHAPER_ | sort; echo ---; }} >> {}\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy = include_str!("../../examples/monthly-quota.lua");
    let mut rig = Rig::build(policy, |c| c.notify_command = Some(hook.clone()));
    rig.set_sockets(vec![socket(443, 1)]);
    let gb = 1_000_000_000;
    let step = |rig: &mut Rig, time: &str, tx: u64| {
        rig.set_time(time);
        rig.kernel.count("eth0", tx, 0);
        rig.tick();
    };
    step(&mut rig, "2026-11-23T09:00:00", 0);
    step(&mut rig, "2026-11-23T09:00:01", 79 * gb);
    assert!(rig.daemon.events.recent().is_empty(), "79 %: nothing yet");
    step(&mut rig, "2026-11-23T09:00:02", 2 * gb);
    step(&mut rig, "2026-11-23T09:00:03", 0);
    step(&mut rig, "2026-11-24T12:00:00", 0);
    step(&mut rig, "2026-11-25T12:00:00", 15 * gb);
    step(&mut rig, "2026-11-26T12:00:00", gb);
    step(&mut rig, "2026-12-01T00:00:10", gb);
    step(&mut rig, "2026-12-02T00:00:10", 85 * gb);
    step(&mut rig, "2026-12-03T00:00:10", gb);
    let passed: Vec<(String, String)> = rig
        .daemon
        .events
        .recent()
        .into_iter()
        .map(|e| (e.message, e.period_id))
        .collect();
    let nov = "2026-11 from day 1".to_string();
    let dec = "2026-12 from day 1".to_string();
    let msg = |p: u32| format!("{p} % of this month's 100 GB used");
    assert_eq!(
        passed,
        [(msg(80), nov.clone()), (msg(95), nov), (msg(80), dec)]
    );
    let status = super::status::StatusReport::of(&rig.daemon, false);
    assert_eq!(status.events.len(), 3);
    let metrics = super::metrics::render(&rig.daemon);
    assert!(
        metrics.contains("shaper_events_total{name=\"quota\"} 3"),
        "{metrics}"
    );
    // The hook runs on its own: wait for its three records.
    // A hang detector, not a speed test: generous for a loaded machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.matches("---").count() >= 3 || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(text.matches("---").count(), 3, "{text}");
    assert_eq!(text.matches("SHAPER_EVENT=quota").count(), 3, "{text}");
    assert!(
        text.contains(&format!("SHAPER_MESSAGE={}", msg(95))),
        "{text}"
    );
    assert!(text.contains("SHAPER_PERIOD=month"), "{text}");
    assert!(
        text.contains("SHAPER_PERIOD_ID=2026-12 from day 1"),
        "{text}"
    );
}

/// What passed is remembered across a restart: the same warning is not raised again in its
/// period, and is in the next.
#[test]
fn events_passed_are_remembered_across_a_restart() {
    use super::events::{Events, events_path};
    use crate::account::Period;
    use crate::policy::Notice;
    let dir = tempfile::tempdir().unwrap();
    let notice = || Notice {
        name: "quota".into(),
        message: "80 %".into(),
        period: Period::Month,
    };
    let mut events = Events::load(events_path(dir.path()), None, 1);
    events.raise(vec![notice(), notice()], &at("2026-11-23T09:00:00"));
    assert_eq!(events.recent().len(), 1);
    let mut again = Events::load(events_path(dir.path()), None, 1);
    again.raise(vec![notice()], &at("2026-11-30T09:00:00"));
    assert_eq!(again.recent().len(), 1, "not raised again in November");
    assert!(again.counts().is_empty());
    again.raise(vec![notice()], &at("2026-12-01T09:00:00"));
    assert_eq!(again.recent().len(), 2, "raised in December");
}

/// The policy reads yesterday's link usage (`ctx.usage("day", "link", 1)`) after midnight, from
/// the running daemon's history and after a restart that lost everything since the last flush.
#[test]
fn the_policy_reads_yesterday_after_midnight_and_after_a_kill() {
    let policy = r#"
classes = { bulk = {} }
function classify(conn, ctx)
  if ctx.usage("day", "link", 1).total == 5000 then return "bulk" end
end
"#;
    let mut rig = Rig::build(policy, |_| {});
    rig.set_sockets(vec![socket(443, 1)]);
    let class = |rig: &Rig| {
        rig.daemon
            .cycle
            .flows()
            .get(1)
            .unwrap()
            .decision
            .class
            .to_string()
    };
    rig.set_time("2026-11-23T23:59:00");
    rig.tick();
    rig.kernel.count("eth0", 5000, 0);
    rig.set_time("2026-11-23T23:59:30");
    rig.tick();
    assert_eq!(class(&rig), "default");
    rig.daemon.flush(&at("2026-11-23T23:59:30"));
    rig.set_time("2026-11-24T00:00:30");
    rig.tick();
    assert_eq!(
        class(&rig),
        "bulk",
        "yesterday, from the running daemon's history"
    );
    // Killed before the next flush: the 23rd is still the current day in usage.ron.
    rig.restart();
    rig.tick();
    assert_eq!(
        class(&rig),
        "bulk",
        "yesterday, archived from usage.ron at start"
    );
    // Flushed and restarted cleanly: from history.ron.
    rig.daemon.flush(&at("2026-11-24T00:00:30"));
    std::fs::remove_file(rig._dir.path().join("state/usage.ron")).unwrap();
    rig.restart();
    rig.tick();
    assert_eq!(class(&rig), "bulk", "yesterday, from history.ron");
}

/// A socket the classifier reports as new: `curl` (tgid 4242) opening `cookie` to `remote_port`.
fn reported(remote_port: u16, cookie: u64) -> crate::classify::NewSocket {
    let s = socket(remote_port, cookie);
    crate::classify::NewSocket {
        cookie,
        tgid: 4242,
        uid: s.uid,
        comm: "curl".into(),
        cgroup_id: 1,
        proto: s.proto,
        local: s.local,
        remote: s.remote,
        first_inbound: false,
        reported_at: std::time::Duration::ZERO,
    }
}

/// The first cycle on the fast path: the tree, no per-connection filters (the classifier puts
/// each connection into its leaf), and the scanned connection written to the classifier.
fn started_on_the_fast_path() -> (Rig, RecordingClassifier) {
    let (mut rig, classifier) = Rig::with_fast_path();
    rig.set_sockets(vec![socket(443, 1)]);
    let ops = rig.tick();
    assert_eq!(*rig.state(), ShapingState::Shaping, "{ops:?}");
    assert_eq!(
        count(&ops, |o| matches!(o, Op::AddFilter { .. })),
        0,
        "{ops:?}"
    );
    assert_eq!(classifier.applies(), 1);
    assert!(
        classifier.leaves(1).is_some(),
        "the scanned connection is written"
    );
    (rig, classifier)
}

/// A connection the classifier reports between cycles is decided, gets its own 1 Mbit/s leaf
/// both ways and is written to the classifier in that leaf, before any scan has seen it.
#[test]
fn a_reported_connection_gets_its_leaf_from_the_fast_path() {
    let (mut rig, classifier) = started_on_the_fast_path();
    assert!(rig.daemon.has_fast_path());
    classifier.report_new(reported(22, 2));
    rig.daemon.fast_path(std::time::Duration::ZERO);
    let ops = rig.kernel.take_applied();
    let leaf = |dev: &str| {
        ops.iter()
            .find_map(|o| match o {
                Op::AddClass {
                    dev: d,
                    minor,
                    class,
                } if d == dev && class.ceil == 1_000_000 && class.label != "hold" => {
                    Some(super::bpf::classid(*minor))
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("a 1 Mbit/s leaf on {dev}: {ops:?}"))
    };
    let written = classifier.leaves(2).expect("the new connection is written");
    assert_eq!(
        written,
        (Some(leaf("eth0")), Some(leaf(&ifb_name("eth0")))),
        "{ops:?}"
    );
    assert_eq!(
        count(&ops, |o| matches!(o, Op::AddFilter { .. })),
        0,
        "{ops:?}"
    );
    let flow = rig.daemon.cycle.flows().get(2).expect("a record for it");
    assert_eq!(flow.decision.class.as_ref(), "bulk");
    assert_eq!(classifier.applies(), 2);
    assert!(
        classifier.leaves(1).is_some(),
        "the other connection stays written"
    );
    // Nothing reported: nothing planned or applied.
    rig.daemon.fast_path(std::time::Duration::ZERO);
    assert!(rig.kernel.take_applied().is_empty());
    assert_eq!(classifier.applies(), 2);
}

/// Sockets that closed before any scan saw them are charged from their close reports: one the
/// fast path decided under its record's class, one never reported under the owner and the class
/// the kernel recorded.
#[test]
fn a_close_report_is_charged_to_its_owner_and_class() {
    use crate::account::{Period, UsageKey, UsageView};
    use crate::classify::{ByteCounters, ClosedSocket, SocketOwner};
    let (mut rig, classifier) = started_on_the_fast_path();
    classifier.report_new(reported(22, 2));
    rig.daemon.fast_path(std::time::Duration::ZERO);
    let shared = rig.daemon.interfaces[0]
        .handles()
        .class_minors("bulk")
        .expect("bulk is planned")
        .1;
    let owner = SocketOwner {
        tgid: 4343,
        uid: 1000,
        comm: "wget".into(),
        cgroup_id: 1,
    };
    classifier.report_closed(ClosedSocket {
        cookie: 2,
        proto: Proto::Tcp,
        owner: None,
        bytes: ByteCounters {
            up: 300_000,
            down: 20_000,
        },
        classes: classifier.leaves(2).unwrap(),
    });
    classifier.report_closed(ClosedSocket {
        cookie: 3,
        proto: Proto::Tcp,
        owner: Some(owner),
        bytes: ByteCounters {
            up: 5_000,
            down: 70_000,
        },
        classes: (
            Some(super::bpf::classid(shared)),
            Some(super::bpf::classid(shared)),
        ),
    });
    rig.set_time("2026-11-23T09:00:01");
    rig.tick();
    let now = at("2026-11-23T09:00:01");
    let usage = rig.daemon.accounting.view_at(&now);
    let day = |key: UsageKey| {
        let u = usage.usage(Period::Day, &key);
        (u.up.bytes(), u.down.bytes())
    };
    assert_eq!(day(UsageKey::Class("bulk".into())), (305_000, 90_000));
    assert_eq!(day(UsageKey::Process("wget".into())), (5_000, 70_000));
    assert_eq!(day(UsageKey::Class("default".into())), (0, 0));
    assert!(
        rig.daemon.cycle.flows().get(2).is_none(),
        "its record is gone"
    );
}

/// Writes what the process table reads of a process (`stat`, `status`) under the rig's procfs.
fn fake_process(rig: &Rig, pid: u32, name: &str) {
    let dir = rig._dir.path().join("proc").join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    // After the name: state, ppid, 17 fields, then the start time (field 22).
    let fields: Vec<String> = ["S", "1"]
        .into_iter()
        .map(str::to_string)
        .chain(std::iter::repeat_n("0".to_string(), 17))
        .chain(["12345".to_string(), "0".to_string()])
        .collect();
    std::fs::write(
        dir.join("stat"),
        format!("{pid} ({name}) {}\n", fields.join(" ")),
    )
    .unwrap();
    std::fs::write(
        dir.join("status"),
        format!("Name:\t{name}\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n"),
    )
    .unwrap();
}

/// A connection the policy gives a limit of its own is in its own leaf once decided; until a
/// later one of its process is decided, that one starts in a leaf made ahead with the same
/// limit, which the classifier is told is the process's: never unlimited while deciding.
#[test]
fn a_process_with_limited_connections_has_its_next_connections_start_limited() {
    let (mut rig, classifier) = started_on_the_fast_path();
    fake_process(&rig, 4242, "curl");
    classifier.report_new(reported(22, 2));
    rig.daemon.fast_path(std::time::Duration::ZERO);
    let ops = rig.kernel.take_applied();
    let limited: Vec<u32> = ops
        .iter()
        .filter_map(|o| match o {
            Op::AddClass { dev, minor, class }
                if dev == "eth0" && class.ceil == 1_000_000 && class.label != "hold" =>
            {
                Some(super::bpf::classid(*minor))
            }
            _ => None,
        })
        .collect();
    assert_eq!(limited.len(), 2, "its own leaf and one made ahead: {ops:?}");
    let own = classifier.leaves(2).unwrap().0.unwrap();
    let next = classifier
        .process_leaves(4242)
        .expect("the process has an entry")
        .0
        .unwrap();
    assert!(limited.contains(&own) && limited.contains(&next), "{ops:?}");
    assert_ne!(own, next, "not the connection's own leaf");
    // The next connection is decided on its report: the leaf made ahead, which its first
    // packets went to, becomes its own, and another is made ahead for the connections after it.
    classifier.report_new(reported(22, 3));
    rig.daemon.fast_path(std::time::Duration::ZERO);
    let ops = rig.kernel.take_applied();
    assert_eq!(classifier.leaves(3).unwrap().0, Some(next), "{ops:?}");
    let after = classifier.process_leaves(4242).unwrap().0.unwrap();
    assert!(![own, next].contains(&after), "{ops:?}");
    assert_eq!(
        count(
            &ops,
            |o| matches!(o, Op::AddClass { class, .. } if class.ceil == 1_000_000)
        ),
        2,
        "one leaf made ahead each way: {ops:?}"
    );
}

/// The classifier is told of the holding leaf, where the kernel keeps a new process's sockets
/// for their first 100 ms until the fast path decides them: none while no connection has a limit
/// of its own (the scanned one, to port 443, has none), then, from the fast path that decided
/// the first limited one, a leaf as limited as it both ways, kept once it has closed, for the
/// next new process.
#[test]
fn the_classifier_is_told_of_the_holding_leaf_once_a_connection_is_limited() {
    let (mut rig, classifier) = started_on_the_fast_path();
    assert_eq!(
        classifier.hold(),
        (None, None),
        "nothing limited, nothing held"
    );
    classifier.report_new(reported(22, 2));
    rig.daemon.fast_path(std::time::Duration::ZERO);
    let ops = rig.kernel.take_applied();
    let (up, down) = (
        added_hold(&ops, "eth0"),
        added_hold(&ops, &ifb_name("eth0")),
    );
    assert_eq!((up.1, down.1), (1_000_000, 1_000_000), "{ops:?}");
    assert_eq!(classifier.hold(), (Some(up.0), Some(down.0)));
    let own = classifier.leaves(2).unwrap();
    assert_ne!(own.0, Some(up.0), "a decided connection is in its own leaf");

    // The limited connection is gone by the next scan: the hold stays.
    rig.set_sockets(vec![socket(443, 1)]);
    rig.tick();
    assert_eq!(classifier.leaves(2), None);
    assert_eq!(classifier.hold(), (Some(up.0), Some(down.0)));
}

/// A reloaded policy that no longer limits connections of their own takes the holding leaf
/// away: the least limit the old one gave is not kept for it.
#[test]
fn a_reloaded_policy_without_limits_per_connection_holds_nothing() {
    let (mut rig, classifier) = started_on_the_fast_path();
    classifier.report_new(reported(22, 2));
    rig.daemon.fast_path(std::time::Duration::ZERO);
    assert!(classifier.hold().0.is_some());
    std::fs::write(
        rig._dir.path().join("policy.lua"),
        "classes = { bulk = { prio = 7 } }\nfunction classify(conn) return \"bulk\" end\n",
    )
    .unwrap();
    rig.daemon.reload().unwrap();
    rig.set_sockets(vec![socket(443, 1), socket(22, 2)]);
    rig.tick();
    assert_eq!(classifier.hold(), (None, None));
}

/// A policy that returns a limit per connection as a literal is held at it from its first
/// plan: its first limited connection after a start is held too, not only those after one was
/// seen limited.
#[test]
fn a_literal_limit_per_connection_holds_from_the_first_plan() {
    let classifier = RecordingClassifier::default();
    let policy = "classes = { bulk = {} }\n\
        function classify(conn)\n\
        \x20 if conn.remote_port == 22 then return \"bulk\", { up = \"3mbit\", down = \"5mbit\" } end\n\
        end\n";
    let mut rig = Rig::build_on(policy, |_| {}, Box::new(classifier.clone()));
    rig.set_sockets(vec![socket(443, 1)]);
    let ops = rig.tick();
    assert_eq!(
        (
            added_hold(&ops, "eth0").1,
            added_hold(&ops, &ifb_name("eth0")).1
        ),
        (3_000_000, 5_000_000)
    );
    assert!(classifier.hold().0.is_some() && classifier.hold().1.is_some());
}

/// The holding leaf `ops` added on `dev`: its full classid and its ceiling.
fn added_hold(ops: &[Op], dev: &str) -> (u32, u64) {
    ops.iter()
        .find_map(|o| match o {
            Op::AddClass {
                dev: d,
                minor,
                class,
            } if d == dev && class.label == "hold" => {
                Some((super::bpf::classid(*minor), class.ceil))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("a holding leaf on {dev}: {ops:?}"))
}
