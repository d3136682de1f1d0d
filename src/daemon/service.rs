//! shaper as a service: one daemon per runtime dir (pid file with a lock) and per interface
//! ([`super::iflock`]), a control socket for `status`, `reload` and `stop`, signals
//! (SIGTERM/SIGINT stop, SIGHUP reloads), and systemd notifications when `NOTIFY_SOCKET` is set.
//!
//! The cycle runs on its own thread, which owns the [`Daemon`]; the main thread runs a small
//! tokio runtime for the socket and the signals and passes commands to the cycle thread, which
//! handles them between cycles. The control socket is mode 0600 (root only), or 0660 with the
//! configured `status_group` so its members can run `status` and `top` without root. Whoever
//! opens the socket, only root (or the daemon's own user) may `reload` or `stop` it: the peer's
//! uid is read with SO_PEERCRED, and others are refused with a message naming the group.
//!
//! No client can hold the daemon up: each is served by a task of its own, must send its request
//! within [`CLIENT_TIMEOUT`] and in at most [`MAX_REQUEST`] bytes, and the clients served at
//! once are bounded (more are told so and closed), so signals and other clients are handled
//! whatever one client does, and memory stays bounded. The bounds are separate budgets, so
//! that no one else can lock root out: root (and the daemon's own user) has [`MAX_CLIENTS`]
//! slots of its own; every other user (a `status_group` member) at most
//! [`MAX_CLIENTS_PER_USER`], of [`MAX_OTHER_CLIENTS`] they share; and `metrics_listen`'s HTTP
//! clients have [`super::metrics::MAX_CLIENTS`] (the excess gets a `503`).
//!
//! Running as root, the runtime and state dirs must be root's and writable by no one else
//! ([`crate::trust::private_dir`]): whoever can write there could replace the socket or plant
//! links where the pid file and usage are written.
//! The pid file and the socket are put back when the runtime dir is cleaned under a running
//! daemon ([`super::rundir`]), so `status` and `stop` keep finding it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use super::rundir::RuntimeDir;
use super::status::StatusReport;
use super::{Daemon, RunOptions};
use crate::config::Config;

pub use super::rundir::{PID_NAME, SOCKET_NAME};

/// The longest request line, in bytes; a request is one short JSON line.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Root's control clients (and the daemon's own user's) served at once; each may hold up to
/// [`MAX_REQUEST`] bytes.
pub const MAX_CLIENTS: usize = 128;
/// Other users' control clients served at once, all together.
pub const MAX_OTHER_CLIENTS: usize = 128;
/// One other user's control clients served at once: one member of `status_group` cannot take
/// every slot from the others.
pub const MAX_CLIENTS_PER_USER: usize = 16;
/// How long a client may take to send its request, and to take the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// With the BPF classifier, how long the cycle thread waits for new sockets before it looks
/// for commands again (the most a command waits).
const FAST_PATH_SLICE: Duration = Duration::from_millis(20);
/// How long `shaper status`/`reload`/`stop` wait for the daemon's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The Prometheus metrics ([`super::metrics::render`]).
    Metrics,
}

/// The answer (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
    /// The metrics text, for [`Request::Metrics`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

impl Response {
    fn ok() -> Response {
        Response {
            ok: true,
            error: None,
            status: None,
            metrics: None,
        }
    }
    fn error(e: impl ToString) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            status: None,
            metrics: None,
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

/// The group that may read status through the socket (config `status_group`).
#[derive(Debug, Clone)]
struct StatusGroup {
    name: Arc<str>,
    gid: u32,
}

impl StatusGroup {
    /// Looks the group up now, so a misspelt name fails the start rather than every client.
    fn resolve(name: &str) -> anyhow::Result<StatusGroup> {
        let group = nix::unistd::Group::from_name(name)
            .with_context(|| format!("status_group = {name:?}: cannot look the group up"))?
            .with_context(|| {
                format!(
                    "status_group = {name:?}: no such group; create it (`groupadd {name}`) or \
                     unset status_group"
                )
            })?;
        Ok(StatusGroup {
            name: name.into(),
            gid: group.gid.as_raw(),
        })
    }
}

/// The control socket's client slots: root's, and the other users' with a share per user
/// (see the module docs).
#[derive(Debug, Default)]
struct Budget {
    root: usize,
    others: usize,
    per_user: std::collections::HashMap<u32, usize>,
}

/// Why a control client was turned away.
#[derive(Debug, Clone, Copy)]
enum Busy {
    Root,
    Others,
    User(u32),
}

impl Busy {
    /// The answer to the client turned away, one JSON line.
    fn answer(self) -> String {
        let message = match self {
            Busy::Root => {
                format!("shaper is serving {MAX_CLIENTS} control clients already; try again")
            }
            Busy::Others => format!(
                "shaper is serving {MAX_OTHER_CLIENTS} control clients of users other than root \
                 already; try again"
            ),
            Busy::User(uid) => format!(
                "shaper is serving {MAX_CLIENTS_PER_USER} control clients of uid {uid} already; \
                 close some and try again"
            ),
        };
        let mut line =
            serde_json::to_string(&Response::error(message)).expect("a response always serialises");
        line.push('\n');
        line
    }
}

/// A control client's slot, given back when its task ends.
struct Slot {
    budget: Arc<std::sync::Mutex<Budget>>,
    /// `None` for root's slots.
    user: Option<u32>,
}

/// Takes a slot for a client of `uid` (`privileged`: root or the daemon's own user).
fn take_slot(
    budget: &Arc<std::sync::Mutex<Budget>>,
    uid: u32,
    privileged: bool,
) -> Result<Slot, Busy> {
    let mut b = budget.lock().unwrap_or_else(|e| e.into_inner());
    if privileged {
        if b.root >= MAX_CLIENTS {
            return Err(Busy::Root);
        }
        b.root += 1;
        return Ok(Slot {
            budget: budget.clone(),
            user: None,
        });
    }
    if b.others >= MAX_OTHER_CLIENTS {
        return Err(Busy::Others);
    }
    let mine = b.per_user.entry(uid).or_default();
    if *mine >= MAX_CLIENTS_PER_USER {
        return Err(Busy::User(uid));
    }
    *mine += 1;
    b.others += 1;
    Ok(Slot {
        budget: budget.clone(),
        user: Some(uid),
    })
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        match self.user {
            None => b.root -= 1,
            Some(uid) => {
                b.others -= 1;
                if let Some(n) = b.per_user.get_mut(&uid) {
                    *n -= 1;
                    if *n == 0 {
                        b.per_user.remove(&uid);
                    }
                }
            }
        }
    }
}

/// Runs the daemon until it is stopped. Fails before anything is installed if the script does
/// not load or another daemon holds the runtime dir.
pub fn run(mut config: Config, options: RunOptions) -> anyhow::Result<ExitCode> {
    if !options.dry_run {
        super::startup::require_net_admin()?;
    }
    let runtime_dir = config.runtime_dir.clone();
    let strict = rustix::process::geteuid().is_root();
    for (dir, what) in [
        (&runtime_dir, "runtime dir"),
        (&config.state_dir, "state dir"),
    ] {
        crate::trust::private_dir(dir, strict).with_context(|| format!("the {what}"))?;
    }
    let status_group = config
        .status_group
        .as_deref()
        .map(StatusGroup::resolve)
        .transpose()?;
    let mut files = RuntimeDir::acquire(
        &runtime_dir,
        strict,
        status_group.as_ref().map(|g| (g.name.clone(), g.gid)),
    )?;
    // One daemon per interface whatever the runtime dir; a dry run changes nothing, so it may
    // watch alongside. The interfaces are resolved once, so the daemon shapes what it locked.
    config.interfaces = config.shaped_interfaces()?;
    let _interfaces = (!options.dry_run)
        .then(|| super::iflock::InterfaceLock::acquire(&config.interfaces))
        .transpose()?;
    let interval = config.interval.duration();
    let metrics_listen = config.metrics_listen;
    let (commands, inbox) = mpsc::channel::<Command>();
    let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
    let cycle = std::thread::Builder::new()
        .name("shaper-cycle".into())
        .spawn(move || {
            let mut daemon = match Daemon::new(config, options) {
                Ok(d) => d,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            // The first cycle runs before the daemon says it is ready, so a start that can
            // shape nothing fails now, with the fix, rather than running on uselessly.
            daemon.tick();
            if let Some(e) = daemon.nothing_to_shape() {
                daemon.shutdown();
                let _ = ready_tx.send(Err(e.into()));
                return;
            }
            if let Some(w) = daemon.capacity_warning() {
                tracing::warn!("{w}");
            }
            let _ = ready_tx.send(Ok(()));
            notify(&[sd_notify::NotifyState::Status(&daemon.summary())]);
            cycle_loop(&mut daemon, interval, &inbox);
        })?;
    ready_rx
        .recv()
        .context("the cycle thread stopped while starting")??;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve(
        &mut files,
        status_group.map(|g| g.name),
        metrics_listen,
        commands.clone(),
    ));
    // Closes the clients still connected.
    drop(runtime);
    files.remove_socket();
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

/// Listens on `metrics_listen`; a failure is logged and the daemon runs on without it (shaping
/// matters more than its metrics).
async fn metrics_listener(
    metrics_listen: Option<std::net::SocketAddr>,
) -> Option<tokio::net::TcpListener> {
    let addr = metrics_listen?;
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            tracing::info!("serving metrics on http://{addr}/metrics");
            Some(listener)
        }
        Err(e) => {
            tracing::error!(
                "cannot serve metrics on {addr} ({e}); running without (check metrics_listen)"
            );
            None
        }
    }
}

/// The metrics from the cycle thread, or `None` when it is gone.
async fn ask_metrics(commands: mpsc::Sender<Command>) -> Option<String> {
    let (reply, done) = tokio::sync::oneshot::channel();
    commands
        .send(Command {
            request: Request::Metrics,
            reply,
        })
        .ok()?;
    done.await.ok()?.metrics
}

async fn serve(
    files: &mut RuntimeDir,
    group: Option<Arc<str>>,
    metrics_listen: Option<std::net::SocketAddr>,
    commands: mpsc::Sender<Command>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let metrics = metrics_listener(metrics_listen).await;
    let mut listener = files.bind()?;
    // The runtime dir may be cleaned under a running daemon: look for the files each second.
    let mut check = tokio::time::interval(super::rundir::CHECK_INTERVAL);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let budget = Arc::new(std::sync::Mutex::new(Budget::default()));
    let metrics_slots = Arc::new(tokio::sync::Semaphore::new(super::metrics::MAX_CLIENTS));
    let own_uid = rustix::process::geteuid().as_raw();
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!("running; control socket {}", files.socket_path().display());
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
            _ = stop_rx.recv() => return Ok(()),
            Some(accepted) = async {
                match &metrics {
                    Some(l) => Some(l.accept().await),
                    None => std::future::pending().await,
                }
            } => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                // Metrics clients have slots of their own, apart from the control socket's.
                match metrics_slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let commands = commands.clone();
                        tokio::spawn(async move {
                            super::metrics::serve_http(stream, ask_metrics(commands)).await;
                            drop(slot);
                        });
                    }
                    Err(_) => super::metrics::refuse_busy(stream),
                }
            }
            _ = check.tick() => {
                if let Some(restored) = files.restore() {
                    listener = restored;
                }
            }
            _ = hup.recv() => {
                // Answered by nobody: the reload is logged, and signals keep being handled.
                let (reply, _) = tokio::sync::oneshot::channel();
                let _ = commands.send(Command { request: Request::Reload, reply });
            }
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors, say: do not spin.
                        tracing::warn!("control socket: cannot accept a client: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Who connected (the kernel's record, taken at connect).
                let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
                let privileged = uid == 0 || uid == own_uid;
                match take_slot(&budget, uid, privileged) {
                    Ok(slot) => {
                        tokio::spawn(serve_client(
                            stream,
                            privileged,
                            group.clone(),
                            commands.clone(),
                            stop_tx.clone(),
                            slot,
                        ));
                    }
                    // A new socket's send buffer is empty: this (non-blocking) write completes.
                    Err(busy) => {
                        if let Ok(mut stream) = stream.into_std() {
                            let _ = stream.write(busy.answer().as_bytes());
                        }
                    }
                }
            }
        }
    }
}

/// Why a client that is not root may not `reload` or `stop`, and what to do instead.
fn refusal(request: &Request, group: Option<&str>) -> String {
    let what = match request {
        Request::Reload => "reload",
        _ => "stop",
    };
    let others = match group {
        Some(g) => format!(
            "members of the status group {g:?} (config status_group) may only read `shaper \
             status` and `shaper top`"
        ),
        None => "others may ask for status".to_string(),
    };
    format!("only root may reload or stop shaper: run `sudo shaper {what}`; {others}")
}

/// Serves one control client: reads one request line (within [`CLIENT_TIMEOUT`] and
/// [`MAX_REQUEST`]), passes it to the cycle thread and writes the answer. Asks the accept loop to
/// end after a `stop`.
async fn serve_client(
    stream: tokio::net::UnixStream,
    privileged: bool,
    group: Option<Arc<str>>,
    commands: mpsc::Sender<Command>,
    stop: tokio::sync::mpsc::Sender<()>,
    _slot: Slot,
) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let read = tokio::time::timeout(CLIENT_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let (response, stopping) = match read {
        Err(_) => (
            Response::error(format!(
                "no request within {CLIENT_TIMEOUT:?}: send one JSON line right after connecting"
            )),
            false,
        ),
        Ok(Err(_)) => return,
        Ok(Ok(_)) if line.len() > MAX_REQUEST => (
            Response::error(format!(
                "request longer than the limit of {MAX_REQUEST} bytes: a request is one short \
                 JSON line"
            )),
            false,
        ),
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Ok(request @ (Request::Reload | Request::Stop)) if !privileged => {
                (Response::error(refusal(&request, group.as_deref())), false)
            }
            Ok(request) => {
                let stopping = matches!(request, Request::Stop);
                let (reply, done) = tokio::sync::oneshot::channel();
                let _ = commands.send(Command { request, reply });
                let response = done
                    .await
                    .unwrap_or_else(|_| Response::error("the daemon stopped"));
                (response, stopping)
            }
            Err(e) => (Response::error(format!("bad request: {e}")), false),
        },
    };
    if let Ok(mut text) = serde_json::to_string(&response) {
        text.push('\n');
        let _ = tokio::time::timeout(CLIENT_TIMEOUT, write.write_all(text.as_bytes())).await;
    }
    if stopping {
        let _ = stop.send(()).await;
    }
}

/// Cycles on schedule, handling commands in between. The first cycle has run.
fn cycle_loop(daemon: &mut Daemon, interval: Duration, inbox: &mpsc::Receiver<Command>) {
    let mut next = Instant::now() + interval;
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
        let received = if daemon.has_fast_path() {
            // New sockets are shaped as they are reported; commands wait at most a slice.
            match inbox.try_recv() {
                Ok(c) => Ok(c),
                Err(TryRecvError::Empty) => {
                    daemon.fast_path(wait.min(FAST_PATH_SLICE));
                    continue;
                }
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
            }
        } else {
            inbox.recv_timeout(wait)
        };
        let command = match received {
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
            Request::Metrics => Response {
                metrics: Some(super::metrics::render(daemon)),
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
                tracing::info!("`shaper stop`: stopping");
                daemon.shutdown();
                let _ = command.reply.send(Response::ok());
                return;
            }
        };
        let _ = command.reply.send(response);
    }
}

/// No daemon answers on the control socket.
#[derive(Debug, thiserror::Error)]
#[error("shaper is not running: nothing listens on {} (start it with `shaper run` or `systemctl start shaper`)", socket.display())]
pub struct NotRunning {
    pub socket: PathBuf,
}

/// Sends one request to a running daemon. As root, only through a runtime dir no one else can
/// write (anyone who could might have put their own socket there).
pub fn request(runtime_dir: &Path, request: &Request) -> anyhow::Result<Response> {
    if rustix::process::geteuid().is_root() {
        match crate::trust::check_private_dir(runtime_dir) {
            Err(e) if !e.is_not_found() => return Err(e).context("the runtime dir"),
            _ => {}
        }
    }
    let path = runtime_dir.join(SOCKET_NAME);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(stream) => stream,
        // No socket, or nobody listening on it: no daemon runs (`status` exits 3 for this).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(NotRunning { socket: path }.into());
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(e).with_context(|| {
                format!(
                    "cannot open shaper's control socket {}: run as root, or have root set \
                     status_group in /etc/shaper/shaper.ron to a group you are in",
                    path.display()
                )
            });
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot reach shaper at {} (may you read its socket?)",
                    path.display()
                )
            });
        }
    };
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .with_context(|| {
            format!(
                "shaper at {} did not answer within {ANSWER_TIMEOUT:?}",
                path.display()
            )
        })?;
    serde_json::from_str(&line).with_context(|| format!("bad answer from shaper: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_users_cannot_take_roots_slots_nor_each_others() {
        let budget = Arc::new(std::sync::Mutex::new(Budget::default()));
        let nobody: Vec<Slot> = (0..MAX_CLIENTS_PER_USER)
            .map(|_| take_slot(&budget, 65534, false).unwrap())
            .collect();
        assert!(matches!(
            take_slot(&budget, 65534, false),
            Err(Busy::User(65534))
        ));
        // Another member still gets in, and root has all its slots.
        let other = take_slot(&budget, 1000, false).unwrap();
        let root: Vec<Slot> = (0..MAX_CLIENTS)
            .map(|_| take_slot(&budget, 0, true).unwrap())
            .collect();
        assert!(matches!(take_slot(&budget, 0, true), Err(Busy::Root)));
        assert!(Busy::Root.answer().contains("128 control clients already"));
        // Slots come back when their clients end.
        drop((nobody, other, root));
        let b = budget.lock().unwrap();
        assert_eq!((b.root, b.others, b.per_user.len()), (0, 0, 0));
    }

    #[test]
    fn other_users_share_a_bounded_pool() {
        let budget = Arc::new(std::sync::Mutex::new(Budget::default()));
        let many: Vec<Slot> = (0..MAX_OTHER_CLIENTS as u32)
            .map(|i| take_slot(&budget, 1000 + i, false).unwrap())
            .collect();
        assert!(matches!(take_slot(&budget, 5000, false), Err(Busy::Others)));
        assert!(take_slot(&budget, 0, true).is_ok());
        drop(many);
    }
}
