//! shaper as a service: one daemon per runtime dir (pid file with a lock), a control socket for
//! `status`, `reload` and `stop`, signals (SIGTERM/SIGINT stop, SIGHUP reloads), and systemd
//! notifications when `NOTIFY_SOCKET` is set.
//!
//! The cycle runs on its own thread, which owns the [`Daemon`]; the main thread runs a small
//! tokio runtime for the socket and the signals and passes commands to the cycle thread, which
//! handles them between cycles. The control socket is mode 0600 (root only); to let a group
//! read `status`, change the socket's group and mode after start, e.g. with systemd's
//! `ExecStartPost=chgrp shaper /run/shaper/shaper.sock` and `chmod 0660`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::status::StatusReport;
use super::{Daemon, RunOptions};
use crate::config::Config;

pub const SOCKET_NAME: &str = "shaper.sock";
pub const PID_NAME: &str = "shaper.pid";

/// A request on the control socket (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Status {
        #[serde(default)]
        all: bool,
    },
    Reload,
    Stop,
}

/// The answer (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
}

impl Response {
    fn ok() -> Response {
        Response {
            ok: true,
            error: None,
            status: None,
        }
    }
    fn error(e: impl ToString) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            status: None,
        }
    }
}

struct Command {
    request: Request,
    reply: tokio::sync::oneshot::Sender<Response>,
}

fn notify(state: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(state);
}

/// The pid file, locked for the daemon's lifetime: a second daemon on the same runtime dir
/// finds it locked and refuses to start.
struct PidLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl PidLock {
    fn acquire(dir: &Path) -> anyhow::Result<PidLock> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the runtime dir {}", dir.display()))?;
        let path = dir.join(PID_NAME);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        if rustix::fs::flock(
            file.as_fd(),
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .is_err()
        {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "another shaper (pid {}) is running with runtime dir {}; stop it with `shaper stop` \
                 or use another --runtime-dir",
                pid.trim(),
                dir.display()
            );
        }
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(PidLock { path, _file: file })
    }
}

impl Drop for PidLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs the daemon until it is stopped. Fails before anything is installed if the script does
/// not load or another daemon holds the runtime dir.
pub fn run(config: Config, options: RunOptions) -> anyhow::Result<ExitCode> {
    let runtime_dir = config.runtime_dir.clone();
    let _pid = PidLock::acquire(&runtime_dir)?;
    let interval = config.interval.duration();
    let (commands, inbox) = mpsc::channel::<Command>();
    let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
    let cycle = std::thread::Builder::new()
        .name("shaper-cycle".into())
        .spawn(move || {
            let mut daemon = match Daemon::new(config, options) {
                Ok(d) => {
                    let _ = ready_tx.send(Ok(()));
                    d
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            cycle_loop(&mut daemon, interval, &inbox);
        })?;
    ready_rx
        .recv()
        .context("the cycle thread stopped while starting")??;

    let socket_path = runtime_dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&socket_path); // stale: we hold the lock
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve(&socket_path, commands.clone()));
    let _ = std::fs::remove_file(&socket_path);
    notify(&[sd_notify::NotifyState::Stopping]);
    // Stop the cycle thread (teardown, flush) if it is still running.
    let (reply, done) = tokio::sync::oneshot::channel();
    if commands
        .send(Command {
            request: Request::Stop,
            reply,
        })
        .is_ok()
    {
        let _ = done.blocking_recv();
    }
    let _ = cycle.join();
    result?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(socket_path: &Path, commands: mpsc::Sender<Command>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let listener = tokio::net::UnixListener::bind(socket_path)
        .with_context(|| format!("cannot create the control socket {}", socket_path.display()))?;
    std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(0o600))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!("running; control socket {}", socket_path.display());
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
            _ = hup.recv() => {
                let (reply, done) = tokio::sync::oneshot::channel();
                let _ = commands.send(Command { request: Request::Reload, reply });
                let _ = done.await;
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(read);
                if reader.read_line(&mut line).await.is_err() {
                    continue;
                }
                let (response, stop) = match serde_json::from_str::<Request>(&line) {
                    Ok(request) => {
                        let stop = matches!(request, Request::Stop);
                        let (reply, done) = tokio::sync::oneshot::channel();
                        let _ = commands.send(Command { request, reply });
                        (done.await.unwrap_or_else(|_| Response::error("the daemon stopped")), stop)
                    }
                    Err(e) => (Response::error(format!("bad request: {e}")), false),
                };
                let mut text = serde_json::to_string(&response)?;
                text.push('\n');
                let _ = write.write_all(text.as_bytes()).await;
                if stop {
                    return Ok(());
                }
            }
        }
    }
}

/// Cycles on schedule, handling commands in between.
fn cycle_loop(daemon: &mut Daemon, interval: Duration, inbox: &mpsc::Receiver<Command>) {
    let mut next = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next {
            daemon.reload_if_changed();
            daemon.tick();
            next += interval;
            if next < Instant::now() {
                next = Instant::now() + interval; // overran: skip, do not catch up
            }
            if daemon.cycles() % 10 == 1 {
                notify(&[sd_notify::NotifyState::Status(&daemon.summary())]);
            }
        }
        let wait = next.saturating_duration_since(Instant::now());
        let command = match inbox.recv_timeout(wait) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                daemon.shutdown();
                return;
            }
        };
        let response = match command.request {
            Request::Status { all } => Response {
                status: Some(StatusReport::of(daemon, all)),
                ..Response::ok()
            },
            Request::Reload => {
                notify(&[
                    sd_notify::NotifyState::Reloading,
                    sd_notify::NotifyState::monotonic_usec_now()
                        .unwrap_or(sd_notify::NotifyState::Reloading),
                ]);
                let r = daemon.reload();
                notify(&[sd_notify::NotifyState::Ready]);
                match r {
                    Ok(()) => Response::ok(),
                    Err(e) => Response::error(format!(
                        "reload failed, the previous policy stays in force: {e}"
                    )),
                }
            }
            Request::Stop => {
                daemon.shutdown();
                let _ = command.reply.send(Response::ok());
                return;
            }
        };
        let _ = command.reply.send(response);
    }
}

/// Sends one request to a running daemon.
pub fn request(runtime_dir: &Path, request: &Request) -> anyhow::Result<Response> {
    let path = runtime_dir.join(SOCKET_NAME);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach shaper at {} (is `shaper run` running, and may you read its socket?)",
            path.display()
        )
    })?;
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("bad answer from shaper: {line:?}"))
}
