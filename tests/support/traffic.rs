//! Real traffic between the namespaces of a pair, measured by iperf3 (installed by .ci/run).
//!
//! Rate-measuring tests share two cores with everything else, so they run one at a time: take
//! [`rate_lock`] for the whole test.

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::cgroup::TestCgroup;
use super::netns::Netns;

/// Serialises rate-measuring tests within the test binary.
pub fn rate_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An iperf3 server in a namespace, serving one test, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    pub fn start(ns: &Netns, port: u16) -> Server {
        let child = ns
            .command("iperf3")
            // -J: a client's --get-server-output then carries the server's intervals as JSON.
            .args(["-s", "-1", "-J", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 (install it: apt-get install iperf3)");
        let mut server = Server { child, port };
        // Wait until it listens (a loaded machine may take seconds to start it).
        let deadline = std::time::Instant::now() + super::daemon::allowance(2);
        loop {
            let listening = ns
                .command("ss")
                .args(["-Hltn", &format!("sport = :{port}")])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false);
            if listening {
                return server;
            }
            if let Ok(Some(exit)) = server.child.try_wait() {
                panic!("iperf3 -s -p {port} exited with {exit} before listening");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "iperf3 -s -p {port} is not listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One iperf3 client run.
pub struct Run {
    pub server: IpAddr,
    pub port: u16,
    /// The client's data port (`--cport`), so filters can be installed before traffic starts.
    pub cport: u16,
    pub seconds: u32,
    /// Seconds at the start left out of the result (TCP slow start).
    pub omit: u32,
    /// Server sends (download) instead of client.
    pub reverse: bool,
    /// UDP at this offered rate instead of TCP.
    pub udp_rate: Option<&'static str>,
    /// UDP payload size.
    pub length: Option<u32>,
    /// Parallel flows (`-P`), on consecutive local ports from `cport`.
    pub parallel: u16,
}

impl Run {
    pub fn tcp(server: IpAddr, port: u16, cport: u16) -> Run {
        Run {
            server,
            port,
            cport,
            seconds: 6,
            omit: 1,
            reverse: false,
            udp_rate: None,
            length: None,
            parallel: 1,
        }
    }

    /// Starts the client in `ns`; [`Measurement::finish`] waits for it.
    pub fn start(&self, ns: &Netns) -> Measurement {
        self.spawn(self.command(ns))
    }

    /// As [`Run::start`], with the client inside `cgroup` (whose sockets the BPF classifier
    /// sees).
    pub fn start_in(&self, ns: &Netns, cgroup: &TestCgroup) -> Measurement {
        let mut cmd = self.command(ns);
        let _procs = cgroup.enter(&mut cmd);
        self.spawn(cmd)
    }

    fn spawn(&self, mut cmd: Command) -> Measurement {
        Measurement {
            child: cmd.spawn().expect("start iperf3 client"),
            udp: self.udp_rate.is_some(),
            reverse: self.reverse,
        }
    }

    fn command(&self, ns: &Netns) -> Command {
        let mut cmd = ns.command("iperf3");
        cmd.args(["-c", &self.server.to_string(), "-p", &self.port.to_string()])
            .args(["--cport", &self.cport.to_string()])
            .args([
                "-t",
                &self.seconds.to_string(),
                "-O",
                &self.omit.to_string(),
                "-J",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.reverse {
            cmd.arg("-R");
        } else {
            // The receiver's per-second figures of an upload are the server's.
            cmd.arg("--get-server-output");
        }
        if let Some(rate) = self.udp_rate {
            cmd.args(["-u", "-b", rate]);
        }
        if self.parallel > 1 {
            cmd.args(["-P", &self.parallel.to_string()]);
        }
        if let Some(len) = self.length {
            cmd.args(["-l", &len.to_string()]);
        }
        cmd
    }
}

pub struct Measurement {
    child: Child,
    udp: bool,
    reverse: bool,
}

/// What one run measured.
#[derive(Debug)]
pub struct Result {
    /// Goodput at the receiver, bits per second, over the measured seconds.
    pub bits_per_second: f64,
    /// Receiver goodput per reporting interval (one per second), omitted seconds excluded.
    pub intervals: Vec<f64>,
    pub json: serde_json::Value,
}

impl Measurement {
    pub fn finish(self) -> Result {
        let out = self.child.wait_with_output().expect("iperf3 ran");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "iperf3 printed no JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        if let Some(err) = json.get("error") {
            panic!("iperf3 failed: {err}");
        }
        // The receiver's intervals: the client's own in a download, the server's in an upload.
        let receiver = if self.reverse {
            &json["intervals"]
        } else {
            &json["server_output_json"]["intervals"]
        };
        let measured: Vec<(f64, f64)> = receiver
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| &i["sum"])
                    .filter(|sum| sum["omitted"] != true)
                    .filter_map(|sum| Some((sum["bytes"].as_f64()?, sum["seconds"].as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        let intervals = measured.iter().map(|(b, s)| b * 8.0 / s).collect();
        let end = &json["end"];
        let bits_per_second = if self.udp {
            // The receiver's figure: bytes that arrived, over the test time.
            end["sum_received"]["bits_per_second"]
                .as_f64()
                .or_else(|| end["sum"]["bits_per_second"].as_f64())
                .expect("UDP result")
        } else {
            // TCP: the receiver's bytes over its measured seconds, less the first and the last
            // two, which iperf3 cuts at its own edges. Its end figure counts the omitted seconds'
            // bytes too and ends at the sender's last 128 KB write: at 1 Mbit/s it gave 95.8-100.1 %
            // of the limit in six runs of one flow whose goodput cannot pass 95.6 %. At the edges
            // the receiver's seconds read 47.8 Mbit/s (first, of a 100 Mbit/s flow) and 0.72 then
            // 1.24 Mbit/s (last two, at 1 Mbit/s) around steady seconds of 0.95-0.96.
            let steady = match measured.len() {
                n if n >= 4 => &measured[1..n - 2],
                _ => &measured[..],
            };
            let (bytes, seconds) = steady
                .iter()
                .fold((0.0, 0.0), |(b, s), (bi, si)| (b + bi, s + si));
            assert!(seconds > 0.0, "iperf3 gave no receiver intervals: {json}");
            bytes * 8.0 / seconds
        };
        Result {
            bits_per_second,
            intervals,
            json,
        }
    }
}
