//! `shaper top`: a full-screen live view of the daemon's status, refreshed every cycle over the
//! control socket, per process, class, user or connection, with the limit in force next to each
//! rate (what nethogs and bandwhich cannot show).
//!
//! Drawing is a pure function of (status, [`ViewState`], frame size), [`render`], so it is
//! tested on ratatui's `TestBackend`; keys change only the [`ViewState`] ([`ViewState::key`]).
//! The terminal is restored on `q`, Ctrl-C, a panic, and when the daemon stops (then the
//! message is printed and `top` exits 3, as `status` does with no daemon).
//!
//! Names and messages others chose are escaped ([`crate::text::escape`]), and a process's pid
//! stays on screen however long its (escaped) name: the name is cut, not the pid.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Flex, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table};

use super::status::rate;
use crate::daemon::service::{self, Request};
use crate::daemon::status::{Bytes, Limit, StatusReport};
use crate::text::escape;
use crate::units::{Rate, Size};

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Runtime dir of the daemon to watch [default: the configured one]
    #[arg(long, value_name = "DIR", value_parser = super::path_arg)]
    pub runtime_dir: Option<PathBuf>,
}

/// What the table lists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum View {
    #[default]
    Process,
    Class,
    User,
    Connection,
}

impl View {
    const ALL: [View; 4] = [View::Process, View::Class, View::User, View::Connection];

    fn name(self) -> &'static str {
        match self {
            View::Process => "process",
            View::Class => "class",
            View::User => "user",
            View::Connection => "connection",
        }
    }

    fn index(self) -> usize {
        View::ALL.iter().position(|v| *v == self).unwrap_or(0)
    }

    fn step(self, by: usize) -> View {
        View::ALL[(self.index() + by) % View::ALL.len()]
    }
}

/// What the user chose: the view, each view's sort column, and the filter.
#[derive(Debug, Clone, Default)]
pub struct ViewState {
    pub view: View,
    /// Sort column per view (an index into its columns); `None`: the view's default (DOWN).
    sort: [Option<usize>; 4],
    /// Rows are kept when a cell contains this (case-insensitively).
    pub filter: String,
    /// `/` was pressed: keys edit the filter until Enter or Esc.
    pub editing: bool,
}

/// What a key asks of the loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Quit,
    Redraw,
}

impl ViewState {
    fn sort_column(&self) -> usize {
        let columns = columns(self.view);
        self.sort[self.view.index()]
            .unwrap_or_else(|| columns.iter().position(|c| c.0 == "DOWN").unwrap_or(0))
    }

    /// Applies a key: `q`/Esc/Ctrl-C quit, tab/shift-tab switch views, `s` sorts by the next
    /// column and `1`–`9` by that column, `/` edits the filter.
    pub fn key(&mut self, key: KeyEvent) -> Action {
        if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL) {
            return Action::Quit;
        }
        if self.editing {
            match key.code {
                KeyCode::Enter => self.editing = false,
                KeyCode::Esc => {
                    self.editing = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            return Action::Redraw;
        }
        let n = columns(self.view).len();
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Tab => self.view = self.view.step(1),
            KeyCode::BackTab => self.view = self.view.step(View::ALL.len() - 1),
            KeyCode::Char('s') => {
                self.sort[self.view.index()] = Some((self.sort_column() + 1) % n);
            }
            KeyCode::Char(c @ '1'..='9') => {
                let column = c as usize - '1' as usize;
                if column < n {
                    self.sort[self.view.index()] = Some(column);
                }
            }
            KeyCode::Char('/') => self.editing = true,
            _ => {}
        }
        Action::Redraw
    }
}

/// A cell's text and what it sorts by: numbers largest first, text in order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SortKey {
    Number(std::cmp::Reverse<u64>),
    Text(String),
}

struct Item {
    cells: Vec<String>,
    keys: Vec<SortKey>,
}

impl Item {
    fn new() -> Item {
        Item {
            cells: Vec::new(),
            keys: Vec::new(),
        }
    }
    /// A text cell, escaped.
    fn text(mut self, text: impl Into<String>) -> Item {
        let text = escape(&text.into()).into_owned();
        self.keys.push(SortKey::Text(text.to_lowercase()));
        self.cells.push(text);
        self
    }
    fn number(mut self, text: String, n: u64) -> Item {
        self.cells.push(text);
        self.keys.push(SortKey::Number(std::cmp::Reverse(n)));
        self
    }
    fn rates(self, up: u64, down: u64) -> Item {
        self.number(rate(up), up).number(rate(down), down)
    }
    /// A limit, short (`1mbit`, `-/8mbit`: up/down, `-` unlimited); it sorts by its download
    /// side, unlimited first.
    fn limit(self, l: &Limit) -> Item {
        let side = |r: Option<u64>| r.map_or_else(|| "-".to_string(), rate);
        let text = if l.up == l.down {
            side(l.up)
        } else {
            format!("{}/{}", side(l.up), side(l.down))
        };
        self.number(text, l.down.unwrap_or(u64::MAX))
    }
    /// Today's and this month's bytes, up and down together.
    fn usage(self, today: &Bytes, month: &Bytes) -> Item {
        let total = |b: &Bytes| b.up.saturating_add(b.down);
        self.number(Size::from_bytes(total(today)).human(), total(today))
            .number(Size::from_bytes(total(month)).human(), total(month))
    }
}

/// The widest a column other than the first grows to fit its entries (the first takes what is
/// left, and at least 10).
const WIDEST_COLUMN: usize = 20;

/// Each view's columns: header and least width (the first column takes what is left; the
/// others grow to their longest entry, up to [`WIDEST_COLUMN`]).
fn columns(view: View) -> &'static [(&'static str, u16)] {
    match view {
        // Who runs a process is in the user view: here the name gets the room.
        View::Process => &[
            ("PROCESS", 0),
            ("CLASS", 7),
            ("CONN", 4),
            ("UP", 10),
            ("DOWN", 10),
            ("LIMIT", 11),
            ("TODAY", 8),
            ("MONTH", 8),
        ],
        View::Class => &[
            ("CLASS", 0),
            ("PRIO", 4),
            ("EACH", 7),
            ("CONN", 4),
            ("UP", 10),
            ("DOWN", 10),
            ("CEIL", 11),
            ("TODAY", 8),
            ("MONTH", 8),
        ],
        View::User => &[
            ("USER", 0),
            ("PROCS", 5),
            ("CONN", 4),
            ("UP", 10),
            ("DOWN", 10),
            ("TODAY", 8),
            ("MONTH", 8),
        ],
        View::Connection => &[
            ("CONNECTION", 0),
            ("PROCESS", 14),
            ("CLASS", 7),
            ("UP", 10),
            ("DOWN", 10),
            ("LIMIT", 12),
        ],
    }
}

/// The rows of `view`, filtered and sorted as `state` says.
fn items(status: &StatusReport, state: &ViewState) -> Vec<Item> {
    let mut items: Vec<Item> = match state.view {
        View::Process => status
            .processes
            .iter()
            .map(|p| {
                Item::new()
                    .text(format!("{} {}", p.name, p.pid))
                    .text(p.classes.join(","))
                    .number(p.connections.to_string(), p.connections)
                    .rates(p.rate_up, p.rate_down)
                    .limit(&p.limit)
                    .usage(&p.today, &p.month)
            })
            .collect(),
        View::Class => status
            .classes
            .iter()
            .map(|c| {
                Item::new()
                    .text(c.name.clone())
                    .number(c.prio.to_string(), u64::from(7 - c.prio.min(7)))
                    .text(c.each.clone())
                    .number(c.connections.to_string(), c.connections)
                    .rates(c.rate_up, c.rate_down)
                    .limit(&c.ceil)
                    .usage(&c.today, &c.month)
            })
            .collect(),
        View::User => status
            .users
            .iter()
            .map(|u| {
                Item::new()
                    .text(u.name.clone())
                    .number(u.processes.to_string(), u.processes)
                    .number(u.connections.to_string(), u.connections)
                    .rates(u.rate_up, u.rate_down)
                    .usage(&u.today, &u.month)
            })
            .collect(),
        View::Connection => status
            .connections
            .iter()
            .flatten()
            .map(|c| {
                Item::new()
                    .text(c.described())
                    .text(c.process.clone().unwrap_or_else(|| "-".into()))
                    .text(c.class.clone())
                    .rates(c.rate_up, c.rate_down)
                    .limit(&c.ceil)
            })
            .collect(),
    };
    let filter = state.filter.to_lowercase();
    if !filter.is_empty() {
        items.retain(|i| i.cells.iter().any(|c| c.to_lowercase().contains(&filter)));
    }
    let column = state.sort_column();
    // Ties keep the daemon's order (stable sort).
    items.sort_by(|a, b| a.keys.get(column).cmp(&b.keys.get(column)));
    items
}

/// `1.2mbit of 18mbit`, or `1.2mbit (no uplink set)`.
fn against(now: u64, capacity: Option<u64>, key: &str) -> String {
    match capacity {
        Some(c) => format!(
            "{} of {} ({}%)",
            rate(now),
            Rate::from_bits_per_sec(c).human(),
            now.saturating_mul(100) / c.max(1)
        ),
        None => format!("{} (no {key} set)", rate(now)),
    }
}

/// The header: who runs, the link against its capacity, usage, and what went wrong.
fn header(status: &StatusReport) -> Vec<Line<'static>> {
    let link = &status.link;
    let month = status
        .usage
        .get(&crate::account::Period::Month)
        .copied()
        .unwrap_or_default();
    let today = status
        .usage
        .get(&crate::account::Period::Day)
        .copied()
        .unwrap_or_default();
    let mut lines = vec![
        Line::from(format!(
            "shaper top  pid {}  {}  classifier {}  cycle {}{}",
            status.pid,
            escape(&status.policy),
            status.classifier,
            status.cycles,
            if status.dry_run { "  DRY RUN" } else { "" }
        )),
        Line::from(format!(
            "up {}   down {}",
            against(link.rate_up, link.capacity.up, "uplink"),
            against(link.rate_down, link.capacity.down, "downlink")
        )),
        Line::from(format!(
            "today {} up {} down   month {} up {} down",
            Size::from_bytes(today.up).human(),
            Size::from_bytes(today.down).human(),
            Size::from_bytes(month.up).human(),
            Size::from_bytes(month.down).human(),
        )),
    ];
    let mut problems: Vec<String> = Vec::new();
    if let Some(f) = &status.reload_error {
        problems.push(format!("reload failed, old policy in force: {}", f.message));
    }
    if let Some(f) = &status.usage_save_error {
        problems.push(format!("usage save failed: {}", f.message));
    }
    problems.extend(
        status
            .errors
            .iter()
            .map(|e| format!("policy error (x{}): {}", e.count, e.message)),
    );
    for i in status.interfaces.iter().filter(|i| i.state != "shaping") {
        problems.push(format!("interface {}: {}", i.name, i.state));
    }
    let problems: Vec<String> = problems.iter().map(|p| escape(p).into_owned()).collect();
    let bad = Style::default().add_modifier(Modifier::BOLD);
    lines.push(match problems.first() {
        None => Line::from("no policy errors"),
        Some(first) if problems.len() == 1 => Line::styled(first.clone(), bad),
        Some(first) => Line::styled(format!("{first} (+{} more)", problems.len() - 1), bad),
    });
    lines
}

/// Draws the whole screen: a pure function of the report, the view state and the frame size.
pub fn render(frame: &mut Frame, status: &StatusReport, state: &ViewState) {
    let [head, tabs, body, foot] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header(status)), head);

    let reverse = Style::default().add_modifier(Modifier::REVERSED);
    let mut spans = Vec::new();
    for v in View::ALL {
        let style = if v == state.view {
            reverse
        } else {
            Style::default()
        };
        spans.push(Span::styled(format!(" {} ", v.name()), style));
        spans.push(Span::raw(" "));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), tabs);

    let cols = columns(state.view);
    let sorted = state.sort_column();
    let header_row = Row::new(cols.iter().enumerate().map(|(i, (name, _))| {
        let text = if i == sorted {
            format!("{name}*")
        } else {
            name.to_string()
        };
        Cell::from(text)
    }))
    .style(Style::default().add_modifier(Modifier::BOLD));
    let items = items(status, state);
    let widths: Vec<Constraint> = cols
        .iter()
        .enumerate()
        .map(|(c, &(_, w))| {
            if w == 0 {
                Constraint::Min(10)
            } else {
                // Widened to the longest entry (up to a limit), so a class name is not cut to
                // `interac` while the first column has room to give.
                let longest = items
                    .iter()
                    .filter_map(|i| i.cells.get(c))
                    .map(|t| t.chars().count())
                    .max()
                    .unwrap_or(0);
                Constraint::Length(w.max(u16::try_from(longest.min(WIDEST_COLUMN)).unwrap_or(w)))
            }
        })
        .collect();
    // The table's own column layout, to cut names to fit while keeping their pids.
    let areas = Layout::horizontal(widths.clone())
        .flex(Flex::Start)
        .spacing(1)
        .split(body);
    let with_pid = pid_column(state.view);
    let rows = items.into_iter().map(|i| {
        Row::new(i.cells.into_iter().enumerate().map(|(c, text)| {
            if Some(c) == with_pid {
                Cell::from(fit_keeping_last_word(&text, usize::from(areas[c].width)))
            } else {
                Cell::from(text)
            }
        }))
    });
    frame.render_widget(
        Table::new(rows, widths)
            .header(header_row)
            .flex(Flex::Start)
            .column_spacing(1),
        body,
    );

    let footer = if state.editing {
        format!("filter: {}_   (enter keep, esc clear)", state.filter)
    } else {
        let filter = if state.filter.is_empty() {
            String::new()
        } else {
            format!("  filter: {}", state.filter)
        };
        format!(
            "q quit  tab view  s sort ({})  1-{} column  / filter{filter}",
            cols[sorted].0,
            cols.len()
        )
    };
    frame.render_widget(Paragraph::new(Line::styled(footer, reverse)), foot);
}

/// The column of `view` whose cells end in a pid (`name 42`, `name (42)`), if any.
fn pid_column(view: View) -> Option<usize> {
    match view {
        View::Process => Some(0),
        View::Connection => Some(1),
        View::Class | View::User => None,
    }
}

/// `text` cut to `width` characters by shortening what comes before its last word (a pid),
/// marked with `…`, so the pid stays whole.
fn fit_keeping_last_word(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let Some(at) = text.rfind(' ') else {
        return text.to_string();
    };
    let (name, last) = text.split_at(at);
    let keep = width.saturating_sub(last.chars().count() + 1);
    let mut out: String = name.chars().take(keep).collect();
    out.push('…');
    out.push_str(last);
    out
}

/// Asks the daemon for everything, connections included.
fn fetch(dir: &std::path::Path) -> anyhow::Result<StatusReport> {
    let response = service::request(dir, &Request::Status { all: true })?;
    match response.status {
        Some(status) => Ok(status),
        None => anyhow::bail!("{}", response.error.unwrap_or_else(|| "no status".into())),
    }
}

/// The terminal in raw mode on the alternate screen; restored when dropped, so every way out
/// (including `?` and panics, through ratatui's hook) leaves the shell usable.
struct Screen(ratatui::DefaultTerminal);

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

pub fn run(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    // Before the screen is taken, so "not running" or "may not open the socket" reads as
    // plain text.
    let mut status = match fetch(dir) {
        Ok(s) => s,
        Err(e) if e.is::<service::NotRunning>() => {
            eprintln!("shaper: {e}");
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e),
    };
    let mut state = ViewState::default();
    let mut screen = Screen(ratatui::try_init()?);
    let mut next = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next {
            match fetch(dir) {
                Ok(s) => status = s,
                Err(e) => {
                    drop(screen);
                    eprintln!(
                        "shaper top: the daemon went away: {}",
                        super::error_chain(&e)
                    );
                    return Ok(ExitCode::from(3));
                }
            }
            next = now + Duration::from_millis(status.interval_ms.max(200));
        }
        screen.0.draw(|f| render(f, &status, &state))?;
        if event::poll(next.saturating_duration_since(Instant::now()))?
            && let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
            && state.key(key) == Action::Quit
        {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    /// Two processes in two classes, as a daemon would report them.
    fn report() -> StatusReport {
        let bytes = |n: u64| serde_json::json!({"up": n, "down": n * 2});
        serde_json::from_value(serde_json::json!({
            "pid": 42, "policy": "/etc/shaper/policy.lua", "started": "now", "cycles": 7,
            "interval_ms": 1000, "dry_run": false, "classifier": "u32",
            "rate": null, "connection_rate": null,
            "link": {"capacity": {"up": 18_000_000, "down": null}, "rate_up": 900_000, "rate_down": 5_000_000},
            "interfaces": [{"name": "eth0", "state": "shaping", "operations": 0, "failures": 0}],
            "stages_ms": {}, "usage": {"day": bytes(1_000_000), "month": bytes(50_000_000)},
            "classes": [
                {"name": "slow", "prio": 6, "ceil": {"up": 1_000_000, "down": 1_000_000}, "each": "process",
                 "connections": 2, "rate_up": 100_000, "rate_down": 990_000, "today": bytes(10), "month": bytes(20)},
                {"name": "fast", "prio": 2, "ceil": {"up": null, "down": 8_000_000}, "each": "process",
                 "connections": 2, "rate_up": 800_000, "rate_down": 4_000_000, "today": bytes(30), "month": bytes(40)}
            ],
            "processes": [
                {"pid": 100, "name": "zulu", "user": "bob", "classes": ["fast"],
                 "limit": {"up": null, "down": 8_000_000}, "connections": 2,
                 "rate_up": 800_000, "rate_down": 4_000_000, "today": bytes(3_000), "month": bytes(9_000)},
                {"pid": 200, "name": "alpha", "user": "alice", "classes": ["slow"],
                 "limit": {"up": 1_000_000, "down": 1_000_000}, "connections": 2,
                 "rate_up": 100_000, "rate_down": 990_000, "today": bytes(5_000), "month": bytes(6_000)}
            ],
            "users": [
                {"name": "alice", "processes": 1, "connections": 2, "rate_up": 100_000, "rate_down": 990_000,
                 "today": bytes(5_000), "month": bytes(6_000)},
                {"name": "bob", "processes": 1, "connections": 2, "rate_up": 800_000, "rate_down": 4_000_000,
                 "today": bytes(3_000), "month": bytes(9_000)}
            ],
            "connections": [
                {"connection": "tcp 10.0.0.1:40000 -> 10.0.0.2:5201 established", "process": "zulu (100)",
                 "class": "fast", "limit": null, "ceil": {"up": null, "down": 8_000_000},
                 "rate_up": 800_000, "rate_down": 4_000_000}
            ],
            "errors": [{"message": "policy.lua:3: attempt to index a nil value", "count": 2,
                        "example": null, "last_seen": 0}]
        }))
        .unwrap()
    }

    fn screen(status: &StatusReport, state: &ViewState, w: u16, h: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
        terminal.draw(|f| render(f, status, state)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..h)
            .map(|y| (0..w).map(|x| buffer[(x, y)].symbol()).collect::<String>())
            .collect()
    }

    fn row_of(lines: &[String], what: &str) -> usize {
        lines
            .iter()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("{what} on screen:\n{}", lines.join("\n")))
    }

    fn press(state: &mut ViewState, code: KeyCode) -> Action {
        state.key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    #[test]
    fn processes_with_rates_and_limits_fit_80_by_24() {
        let lines = screen(&report(), &ViewState::default(), 80, 24);
        let text = lines.join("\n");
        let zulu = &lines[row_of(&lines, "zulu 100")];
        assert!(zulu.contains("4mbit") && zulu.contains("-/8mbit"), "{text}");
        let alpha = &lines[row_of(&lines, "alpha 200")];
        assert!(
            alpha.contains("990kbit") && alpha.contains("1mbit"),
            "{text}"
        );
        assert!(text.contains("900kbit of 18mbit (5%)"), "{text}");
        assert!(text.contains("no downlink set"), "{text}");
        assert!(text.contains("attempt to index a nil value"), "{text}");
        assert!(
            lines[23].contains("q quit") && lines[23].contains("s sort (DOWN)"),
            "{text}"
        );
        assert!(
            row_of(&lines, "zulu") < row_of(&lines, "alpha"),
            "by DOWN:\n{text}"
        );
    }

    /// Issue 28, item 8: a class name longer than the column's least width is shown whole, in
    /// 80 columns and on a wide terminal, where the process column took everything else.
    #[test]
    fn a_long_class_name_is_not_cut() {
        let mut status = report();
        status.processes[0].classes = vec!["interactive".into()];
        status.connections.as_mut().unwrap()[0].class = "interactive".into();
        let mut state = ViewState::default();
        for width in [80, 160] {
            let lines = screen(&status, &state, width, 24);
            let zulu = &lines[row_of(&lines, "zulu 100")];
            assert!(
                zulu.contains("interactive "),
                "{width}: {}",
                lines.join("\n")
            );
        }
        state.view = View::Connection;
        let lines = screen(&status, &state, 80, 24);
        assert!(
            lines[row_of(&lines, "10.0.0.1")].contains("interactive"),
            "{}",
            lines.join("\n")
        );
    }

    #[test]
    fn sort_keys_and_tab_change_the_screen() {
        let status = report();
        let mut state = ViewState::default();
        // 1: by PROCESS name, alphabetical.
        press(&mut state, KeyCode::Char('1'));
        let lines = screen(&status, &state, 80, 24);
        assert!(row_of(&lines, "alpha") < row_of(&lines, "zulu"));
        assert!(lines[23].contains("sort (PROCESS)"));
        // s: the next column (CLASS): fast before slow.
        press(&mut state, KeyCode::Char('s'));
        let lines = screen(&status, &state, 80, 24);
        assert!(lines[23].contains("sort (CLASS)"));
        assert!(row_of(&lines, "zulu") < row_of(&lines, "alpha"));
        // tab: classes, each sorted on its own.
        press(&mut state, KeyCode::Tab);
        let lines = screen(&status, &state, 80, 24);
        assert!(lines[row_of(&lines, "CEIL")].contains("CLASS"));
        assert!(row_of(&lines, "fast ") < row_of(&lines, "slow "));
        press(&mut state, KeyCode::Tab);
        let lines = screen(&status, &state, 80, 24);
        assert!(row_of(&lines, "PROCS") < row_of(&lines, "bob"));
        press(&mut state, KeyCode::Tab);
        let lines = screen(&status, &state, 80, 24);
        assert!(lines[row_of(&lines, "10.0.0.1:40000")].contains("zulu"));
        press(&mut state, KeyCode::Tab);
        assert_eq!(state.view, View::Process);
        assert!(
            screen(&status, &state, 80, 24)[23].contains("sort (CLASS)"),
            "kept per view"
        );
    }

    #[test]
    fn control_characters_in_a_name_are_escaped_and_the_pid_kept() {
        let mut status = report();
        status.processes[0].name = "\x1b[31mevil\nzulu 7 fake row of a long name".to_string();
        let state = ViewState {
            view: View::Process,
            ..ViewState::default()
        };
        let lines = screen(&status, &state, 80, 24);
        let text = lines.join("\n");
        assert!(!text.contains('\x1b'), "{text}");
        let row = &lines[row_of(&lines, "\\x1b[31mev")];
        assert!(row.contains("… 100 "), "the pid stays: {text}");
        assert!(row.contains("-/8mbit"), "one row: {text}");
        // The connection view's process column keeps it too.
        let state = ViewState {
            view: View::Connection,
            ..ViewState::default()
        };
        let mut status = report();
        status.connections.as_mut().unwrap()[0].process =
            Some("\x1b[31mevil\nlong name (100)".to_string());
        let lines = screen(&status, &state, 80, 24);
        let text = lines.join("\n");
        assert!(!text.contains('\x1b') && text.contains("… (100)"), "{text}");
    }

    #[test]
    fn fitting_cuts_the_name_not_the_pid() {
        assert_eq!(fit_keeping_last_word("firefox 42", 20), "firefox 42");
        assert_eq!(
            fit_keeping_last_word("a-very-long-name 4242", 12),
            "a-very… 4242"
        );
        assert_eq!(fit_keeping_last_word("long name (77)", 10), "long… (77)");
    }

    #[test]
    fn slash_filters_and_q_or_ctrl_c_quit() {
        let status = report();
        let mut state = ViewState::default();
        press(&mut state, KeyCode::Char('/'));
        for c in "alp".chars() {
            press(&mut state, KeyCode::Char(c));
        }
        assert_eq!(
            press(&mut state, KeyCode::Char('q')),
            Action::Redraw,
            "typed, not quit"
        );
        press(&mut state, KeyCode::Backspace);
        press(&mut state, KeyCode::Enter);
        let text = screen(&status, &state, 80, 24).join("\n");
        assert!(text.contains("alpha") && !text.contains("zulu"), "{text}");
        assert!(text.contains("filter: alp"), "{text}");
        assert_eq!(press(&mut state, KeyCode::Char('q')), Action::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(ViewState::default().key(ctrl_c), Action::Quit);
    }
}
