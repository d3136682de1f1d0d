//! `shaper status` for people: the daemon's [`StatusReport`] as text. Names and messages others
//! chose (processes, users, classes, policy errors and events) are escaped
//! ([`crate::text::escape`]): in the tables by [`super::table`], on the other lines here.

use std::fmt::Write as _;

use super::table::{or_dash, render as table, render_rows};
use crate::daemon::status::{Limit, StatusReport};
use crate::text::escape;
use crate::units::Rate;

/// A rate in bits/s for people (`1.53mbit`).
pub fn rate(bits: u64) -> String {
    Rate::from_bits_per_sec(bits).human()
}

/// A limit for people: `2mbit:unlimited`, or `unlimited`.
pub fn limit(l: &Limit) -> String {
    l.rate_pair().to_string()
}

/// The text `shaper status` prints.
pub fn render(report: &StatusReport) -> String {
    // With --all (connections listed), the tc handles of classes and leaves too.
    let all = report.connections.is_some();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "shaper (pid {}) running {} since {}, {} cycles, classifier {}{}",
        report.pid,
        escape(&report.policy),
        report.started,
        report.cycles,
        report.classifier,
        if report.dry_run { ", dry run" } else { "" }
    );
    if let Some(f) = &report.fast_path {
        if f.lost > 0 || f.deferred > 0 {
            let _ = writeln!(
                out,
                "fast path under a flood of new sockets: {} reports found the queue full, {} \
                 deferred (classified by their process's class)",
                f.lost, f.deferred
            );
        }
        let us = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} µs"));
        let _ = writeln!(
            out,
            "fast path: {} new sockets, report to decision p50 {}, p99 {}, CPU {} per socket",
            f.sockets,
            us(f.p50_us),
            us(f.p99_us),
            f.cpu_us_per_socket
                .map_or("-".to_string(), |c| format!("{c:.0} µs"))
        );
    }
    if let Some(ns) = &report.own_pid_namespace {
        let _ = writeln!(
            out,
            "PID namespace of its own: new sockets' owners found by socket {}, by an earlier \
             tie {}, not found {} (classified by what can be seen); {} processes tied to their \
             host pid",
            ns.by_socket, ns.by_tie, ns.unresolved, ns.processes
        );
    }
    for i in &report.interfaces {
        let unplaced = if i.unplaced > 0 {
            format!("; {} classes or filters without a tc handle", i.unplaced)
        } else {
            String::new()
        };
        let detail = i
            .detail
            .as_ref()
            .map(|d| format!(": {}", escape(d)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "interface {}: {}{detail} ({} operations last cycle, {} failed in all{unplaced})",
            escape(&i.name),
            i.state,
            i.operations,
            i.failures
        );
    }
    let not_shaping: Vec<String> = report
        .interfaces
        .iter()
        .filter(|i| i.state != "shaping")
        .map(|i| format!("{} is {}", escape(&i.name), i.state))
        .collect();
    if report.classes.iter().any(|c| !c.in_force) {
        let _ = writeln!(
            out,
            "warning: the class ceilings below are not in force ({})",
            not_shaping.join(", ")
        );
    }
    for w in &report.warnings {
        let _ = writeln!(out, "warning: {}", escape(w));
    }
    if let Some(f) = &report.reload_error {
        let _ = writeln!(
            out,
            "reload failed at {}, the previous policy stays in force: {}",
            f.at,
            escape(&f.message)
        );
    }
    if let Some(f) = &report.usage_save_error {
        let _ = writeln!(out, "usage save failed at {}: {}", f.at, escape(&f.message));
    }
    if report.rate.is_some() || report.connection_rate.is_some() {
        let _ = writeln!(
            out,
            "limits: interface {}, each connection {}",
            report.rate.as_ref().map_or("none".to_string(), limit),
            report
                .connection_rate
                .as_ref()
                .map_or("none".to_string(), limit)
        );
    }
    let usage: Vec<String> = report
        .usage
        .iter()
        .map(|(p, u)| format!("{p} {}", u.human()))
        .collect();
    let _ = writeln!(out, "usage (up/down): {}", usage.join(", "));
    let unattributed: Vec<String> = report
        .unattributed
        .iter()
        .map(|(p, u)| format!("{p} {}", u.human()))
        .collect();
    if !unattributed.is_empty() {
        let _ = writeln!(
            out,
            "  of which (unattributed): {}",
            unattributed.join(", ")
        );
    }
    let stages: Vec<String> = report
        .stages_ms
        .iter()
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect();
    let _ = writeln!(out, "last cycle (ms): {}", stages.join(", "));
    let rows: Vec<Vec<String>> = report
        .classes
        .iter()
        .map(|c| {
            let mut row = vec![c.name.clone()];
            if all {
                row.extend([
                    or_dash(c.handle.as_ref()),
                    or_dash(c.shared_handle.as_ref()),
                ]);
            }
            row.extend([
                c.prio.to_string(),
                match (c.blocked, c.in_force) {
                    (true, true) => "blocked".to_string(),
                    (true, false) => "blocked (not in force)".to_string(),
                    (false, true) => limit(&c.ceil),
                    (false, false) => format!("{} (not in force)", limit(&c.ceil)),
                },
                c.connections.to_string(),
                rate(c.rate_up),
                rate(c.rate_down),
                c.today.human(),
            ]);
            row
        })
        .collect();
    out.push('\n');
    let header: &[&str] = if all {
        &[
            "CLASS", "HANDLE", "LEAF", "PRIO", "CEIL", "CONNS", "UP", "DOWN", "TODAY",
        ]
    } else {
        &["CLASS", "PRIO", "CEIL", "CONNS", "UP", "DOWN", "TODAY"]
    };
    out.push_str(&render_rows(header, &rows));
    let rows: Vec<[String; 6]> = report
        .processes
        .iter()
        .take(20)
        .map(|p| {
            [
                format!("{} ({})", p.name, p.pid),
                or_dash(p.user.as_ref()),
                p.connections.to_string(),
                rate(p.rate_up),
                rate(p.rate_down),
                p.today.human(),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        ["PROCESS", "USER", "CONNS", "UP", "DOWN", "TODAY"],
        &rows,
    ));
    if let Some(conns) = &report.connections {
        let rows: Vec<[String; 7]> = conns
            .iter()
            .map(|c| {
                [
                    c.described(),
                    or_dash(c.process.as_ref()),
                    c.class.clone(),
                    or_dash(c.handle.as_ref()),
                    or_dash(c.limit.as_ref().map(limit)),
                    rate(c.rate_up),
                    rate(c.rate_down),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            [
                "CONNECTION",
                "PROCESS",
                "CLASS",
                "HANDLE",
                "LIMIT",
                "UP",
                "DOWN",
            ],
            &rows,
        ));
    }
    if !report.errors.is_empty() {
        out.push_str("\npolicy errors:\n");
        for e in &report.errors {
            let _ = writeln!(out, "  {} (x{})", escape(&e.message), e.count);
        }
    }
    if !report.events.is_empty() {
        out.push_str(
            "
recent events:
",
        );
        for e in report.events.iter().rev().take(5) {
            let _ = writeln!(
                out,
                "  {} {}: {}",
                e.at,
                escape(&e.name),
                escape(&e.message)
            );
        }
    }
    out
}
