//! `shaper top` in a real terminal (tmux, 80×24) against a daemon in a namespace with two
//! processes moving traffic (issue 13's acceptance).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::daemon::DaemonProcess;
use crate::support::netns::NetnsPair;
use crate::support::traffic::Server;

/// Two classes with a ceiling per process: `alpha` gets 1 Mbit/s, `zulu` 8 Mbit/s.
const POLICY: &str = r#"
classes = {
  slow = { prio = 6, ceil = { up = "1mbit", down = "1mbit" }, each = "process" },
  fast = { prio = 2, ceil = { up = "8mbit", down = "8mbit" }, each = "process" },
}
function classify(conn, ctx)
  local p = conn.process
  if p and p.name == "alpha" then return "slow" end
  if p and p.name == "zulu" then return "fast" end
end
"#;

/// A process killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tmux server of the test's own (its own socket), killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// An 80×24 session running a shell.
    fn new(dir: &Path) -> Tmux {
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let out = tmux.run(&["new-session", "-d", "-x", "80", "-y", "24", "sh"]);
        assert!(out.status.success(), "tmux (apt-get install tmux): {out:?}");
        tmux
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        crate::support::output(
            Command::new("tmux")
                .arg("-S")
                .arg(&self.socket)
                .args(args)
                .env_remove("TMUX"),
        )
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "0"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success());
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "0"]).stdout).into_owned()
    }

    fn alternate_screen(&self) -> bool {
        let out = self.run(&["display-message", "-p", "-t", "0", "#{alternate_on}"]);
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }

    /// Waits until the screen satisfies `ok`; panics with the screen after the allowance.
    fn wait(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + crate::support::daemon::allowance(20);
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "{what}: not seen in\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The line holding `what`, and its position.
fn line<'a>(screen: &'a str, what: &str) -> (usize, &'a str) {
    screen
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains(what))
        .unwrap_or_else(|| panic!("{what} in\n{screen}"))
}

/// The cell of `row` under the header `column` (tables are left-aligned under their header).
fn cell<'a>(screen: &'a str, column: &str, row: &str) -> &'a str {
    let (_, header) = line(screen, "PROCESS");
    let at = header
        .find(column)
        .unwrap_or_else(|| panic!("{column} in {header}"));
    let (_, l) = line(screen, row);
    l.get(at..)
        .unwrap_or("")
        .split_whitespace()
        .next()
        .unwrap_or("")
}

fn moving(screen: &str, row: &str) -> bool {
    screen.contains(row) && !matches!(cell(screen, "DOWN", row), "" | "0bit")
}

#[test]
fn top_shows_two_processes_sorts_switches_views_and_restores_the_terminal() {
    let pair = NetnsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("policy.lua");
    std::fs::write(&script, POLICY).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let group = crate::status::TestGroup::new();
    // Shaping from the start, so the rates shown are the shaped ones.
    let daemon = DaemonProcess::start(
        &pair.a,
        dir.path(),
        &[
            "--script",
            script.to_str().unwrap(),
            "--status-group",
            &group.name,
        ],
    );
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for (name, port) in [("alpha", 5301u16), ("zulu", 5302)] {
        // The kernel's name for a process is its file's: a copy of iperf3 per name.
        let exe = dir.path().join(name);
        std::fs::copy("/usr/bin/iperf3", &exe).expect("iperf3 (apt-get install iperf3)");
        servers.push(Server::start(&pair.b, port));
        let client = pair
            .a
            .command(&exe)
            .args(["-c", &NetnsPair::B_V4.to_string(), "-p", &port.to_string()])
            .args(["-t", "60", "-R"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        clients.push(Running(client));
    }
    daemon.wait_for(15, "both processes seen", |s| {
        let names: Vec<&str> = s["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        names.contains(&"alpha") && names.contains(&"zulu")
    });

    let tmux = Tmux::new(dir.path());
    let command = format!(
        "{} top --runtime-dir {}; echo top-exit-$?",
        env!("CARGO_BIN_EXE_shaper"),
        dir.path().join("run").display()
    );
    tmux.keys(&[&command, "Enter"]);
    let screen = tmux.wait("both processes moving", |s| {
        moving(s, "alpha ") && moving(s, "zulu ")
    });
    assert!(tmux.alternate_screen(), "top runs on the alternate screen");
    assert_eq!(cell(&screen, "LIMIT", "alpha "), "1mbit", "{screen}");
    assert_eq!(cell(&screen, "LIMIT", "zulu "), "8mbit", "{screen}");
    assert_eq!(cell(&screen, "CLASS", "alpha "), "slow", "{screen}");
    assert!(
        screen.contains("DOWN*") && screen.contains("s sort (DOWN)"),
        "{screen}"
    );
    // By download, the 8 Mbit/s process is first.
    let screen = tmux.wait("zulu above alpha", |s| {
        moving(s, "alpha ") && moving(s, "zulu ") && line(s, "zulu ").0 < line(s, "alpha ").0
    });
    assert_eq!(screen.lines().count(), 24, "{screen}");

    // `1`: by name; `s`: the next column.
    tmux.keys(&["1"]);
    let screen = tmux.wait("sorted by name", |s| s.contains("s sort (PROCESS)"));
    assert!(
        line(&screen, "alpha ").0 < line(&screen, "zulu ").0,
        "{screen}"
    );
    tmux.keys(&["s"]);
    let screen = tmux.wait("sorted by class", |s| s.contains("s sort (CLASS)"));
    assert!(
        line(&screen, "zulu ").0 < line(&screen, "alpha ").0,
        "fast, slow: {screen}"
    );

    // tab: the class view, with each class's ceiling.
    tmux.keys(&["Tab"]);
    let screen = tmux.wait("the class view", |s| s.contains("CEIL"));
    assert!(line(&screen, "slow ").1.contains("1mbit"), "{screen}");
    assert!(line(&screen, "fast ").1.contains("8mbit"), "{screen}");
    assert!(!screen.contains("alpha"), "{screen}");

    // q: the shell is back, off the alternate screen.
    tmux.keys(&["q"]);
    tmux.wait("the shell again", |s| s.contains("top-exit-0"));
    assert!(!tmux.alternate_screen());

    // A member of the status group runs it without root; the daemon stopping ends it, with a
    // message and exit status 3.
    let as_member = format!(
        "setpriv --reuid=65534 --regid=65534 --groups={} {command}",
        group.gid
    );
    tmux.keys(&[&as_member, "Enter"]);
    tmux.wait("top again", |s| s.contains("s sort (DOWN)"));
    assert!(daemon.control(&["stop"]).status.success());
    let screen = tmux.wait("top ended", |s| s.contains("top-exit-3"));
    assert!(screen.contains("the daemon went away"), "{screen}");
    assert!(!tmux.alternate_screen());
    drop((clients, servers));
}
