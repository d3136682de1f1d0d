//! `shaper generate-artifacts DIR`: man pages and shell completions from the clap definition
//! (so they cannot drift from the real options), and the policy reference as a man page. Run by
//! packaging; hidden from `--help`.

use std::fmt::Write as _;
use std::iter::Peekable;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use clap::builder::PossibleValuesParser;
use clap_complete::{Generator, Shell};

use super::Cli;

/// The policy reference, shipped as `shaper-policy(7)`.
const POLICY_MD: &str = include_str!("../../docs/policy.md");

/// `shaper(1)`'s sections that clap has no place for, as (heading, [(term, text)]); the text is
/// Markdown inline markup, rendered by [`inline`] like the policy reference.
const MAIN_PAGE_SECTIONS: &[(&str, &[(&str, &str)])] = &[
    (
        "EXIT STATUS",
        &[
            ("0", "Success."),
            (
                "1",
                "Failure: an error, printed with what to do about it; for `check`, `simulate` \
                 and `clear`, problems found.",
            ),
            (
                "2",
                "Usage error: an unknown option or a bad value on the command line.",
            ),
            (
                "3",
                "`shaper status`: no daemon is running (the LSB convention).",
            ),
            (
                "4",
                "`shaper run`: the process lacks CAP_NET_ADMIN; run it as root or grant the \
                 capabilities the message names (LSB: insufficient privilege).",
            ),
            (
                "6",
                "`shaper run`: nothing can be shaped, every interface being refused (another \
                 program's root or ingress qdisc; remove it or use `--replace`). A missing \
                 interface is waited for instead (LSB: not configured).",
            ),
        ],
    ),
    (
        "ENVIRONMENT",
        &[
            (
                "SHAPER_CONFIG",
                "The configuration file, as `--config` (which takes precedence).",
            ),
            (
                "SHAPER_LOG",
                "Log filter in env-filter syntax, e.g. `shaper::scan=debug,info`. `-v` and `-q` \
                 take precedence; it takes precedence over the configuration's `log_level`.",
            ),
            (
                "JOURNAL_STREAM",
                "Set by systemd when standard error goes to the journal: shaper then logs to \
                 journald (or to standard error without timestamps, which the journal adds).",
            ),
            (
                "NO_COLOR",
                "When set to anything but the empty string, no colours in the log. Without it, \
                 colours are used only when standard error is a terminal.",
            ),
            (
                "TZ",
                "The time zone of log timestamps (local time with its UTC offset), of `--at` and \
                 of the policy's `ctx.time`.",
            ),
            (
                "NOTIFY_SOCKET",
                "Set by systemd for `Type=notify` services: shaper reports READY, RELOADING, \
                 STOPPING and a STATUS line.",
            ),
        ],
    ),
    (
        "FILES",
        &[
            (
                "/etc/shaper/shaper.ron",
                "The configuration, every key commented; `shaper config` prints the effective \
                 one. A missing default file means built-in defaults.",
            ),
            (
                "/etc/shaper/policy.lua",
                "The policy script (see **shaper-policy**(7)). Without it the built-in policy \
                 applies `--rate` and `--connection-rate`.",
            ),
            (
                "/var/lib/shaper/usage.ron",
                "Usage per hour, day, week and month, saved every 10 s and at shutdown.",
            ),
            (
                "/var/lib/shaper/history.ron",
                "Usage of past hours (48), days (400) and months (36), read by shaper usage.",
            ),
            (
                "/var/lib/shaper/events.ron",
                "Policy events already passed in their period (shaper.notify).",
            ),
            (
                "/run/shaper/shaper.pid, /run/shaper/shaper.sock",
                "The running daemon's pid file and control socket (mode 0600), used by `status`, \
                 `reload` and `stop`.",
            ),
            (
                "/usr/lib/systemd/system/shaper.service",
                "The systemd unit: `systemctl enable --now shaper`.",
            ),
            (
                "/usr/share/shaper/lua/",
                "The `shaper` Lua library (embedded in the binary; installed for reading) and its \
                 LuaCATS annotations, `meta.lua`, for lua-language-server.",
            ),
            (
                "/usr/share/doc/shaper/examples/",
                "Example policies, and `sample.ron`, a recorded snapshot for `shaper simulate`.",
            ),
        ],
    ),
    (
        "SEE ALSO",
        &[(
            "",
            "**shaper-policy**(7), **tc**(8), **tc-htb**(8), **systemd.service**(5)",
        )],
    ),
];

pub fn generate(dir: &Path) -> anyhow::Result<ExitCode> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    std::fs::write(man.join("shaper.1"), main_page()?)?;
    std::fs::write(man.join("shaper-policy.7"), markdown_to_man(POLICY_MD))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = completions.join(shell.file_name("shaper"));
        std::fs::write(&path, completion(shell)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "wrote man pages to {} and completions to {}",
        man.display(),
        completions.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `shaper(1)`: clap_mangen's sections, then [`MAIN_PAGE_SECTIONS`] in man-pages(7) order.
pub fn main_page() -> std::io::Result<Vec<u8>> {
    let page = clap_mangen::Man::new(Cli::command().disable_help_subcommand(true));
    let mut out = Vec::new();
    page.render_title(&mut out)?;
    page.render_name_section(&mut out)?;
    page.render_synopsis_section(&mut out)?;
    page.render_description_section(&mut out)?;
    page.render_options_section(&mut out)?;
    page.render_subcommands_section(&mut out)?;
    let mut extra = String::new();
    for (heading, entries) in MAIN_PAGE_SECTIONS {
        let _ = writeln!(extra, ".SH \"{heading}\"");
        for (term, text) in *entries {
            if term.is_empty() {
                extra.push_str(".PP\n");
            } else {
                let _ = writeln!(extra, ".TP\n\\fB{}\\fR", escape(term));
            }
            push_text(&mut extra, &inline(text, false));
        }
    }
    out.extend_from_slice(extra.as_bytes());
    page.render_version_section(&mut out)?;
    Ok(out)
}

/// Stands for "an interface name" in the generated completions until [`completion`] replaces
/// it with each shell's own way of listing interfaces (clap has no value hint for them).
const INTERFACE_MARKER: &str = "SHAPER_INTERFACE_NAMES";

/// Each shell's completion script, with `-i`/`--interface` completing the host's interfaces.
pub fn completion(shell: Shell) -> anyhow::Result<String> {
    // `-i` takes one made-up possible value, so every shell's generator writes its
    // possible-values form with the marker in it; that form is then swapped for live names.
    let mut cmd = Cli::command();
    let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().into()).collect();
    for name in names {
        cmd = cmd.mut_subcommand(name, |sub| {
            if sub.get_arguments().any(|a| a.get_id() == "interfaces") {
                sub.mut_arg("interfaces", |a| {
                    a.value_parser(PossibleValuesParser::new([INTERFACE_MARKER]))
                })
            } else {
                sub
            }
        });
    }
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "shaper", &mut script);
    let script = String::from_utf8(script)?;
    let (generated, live) = match shell {
        Shell::Bash => (
            format!("compgen -W \"{INTERFACE_MARKER}\""),
            "compgen -W \"$(command ls /sys/class/net 2>/dev/null)\"".to_string(),
        ),
        Shell::Zsh => (
            format!("({INTERFACE_MARKER})"),
            "_net_interfaces".to_string(),
        ),
        Shell::Fish => (
            format!("\"{INTERFACE_MARKER}\\t''\""),
            "\"(__fish_print_interfaces)\"".to_string(),
        ),
        _ => anyhow::bail!("no interface completion for {shell}"),
    };
    anyhow::ensure!(
        script.contains(&generated),
        "clap_complete's {shell} script no longer has `{generated}` for -i: update \
         artifacts::completion"
    );
    Ok(script.replace(&generated, &live))
}

/// Roff's special characters in running text: the escape character and the hyphen-minus (which
/// groff would otherwise print as a hyphen, breaking copied options).
fn escape(text: &str) -> String {
    text.replace('\\', "\\e").replace('-', "\\-")
}

/// Appends text lines, protecting those that roff would read as requests.
fn push_text(out: &mut String, text: &str) {
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with('.') || line.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(line);
        out.push('\n');
    }
}

/// Markdown inline markup as roff: code spans and strong emphasis bold, emphasis italic, links
/// as their text (a web address follows in angle brackets; a `#` anchor is dropped). `upper`
/// capitalises everything but code, for section headings.
fn inline(text: &str, upper: bool) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some((code, after)) = delimited(rest, "`", "`") {
            let _ = write!(out, "\\fB{}\\fR", escape(code));
            rest = after;
        } else if let Some((strong, after)) = delimited(rest, "**", "**") {
            let _ = write!(out, "\\fB{}\\fR", inline(strong, upper));
            rest = after;
        } else if let Some((em, after)) =
            delimited(rest, "*", "*").filter(|(em, _)| !em.starts_with(' ') && !em.ends_with(' '))
        {
            let _ = write!(out, "\\fI{}\\fR", inline(em, upper));
            rest = after;
        } else if let Some((label, after)) = delimited(rest, "[", "](")
            && let Some((target, after)) = after.split_once(')')
        {
            out.push_str(&inline(label, upper));
            if target.contains("://") {
                let _ = write!(out, " <{}>", escape(target));
            }
            rest = after;
        } else {
            let plain = if upper {
                c.to_uppercase().collect()
            } else {
                c.to_string()
            };
            out.push_str(&escape(&plain));
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// `text` starting with `open`: what lies before the next `close`, and what follows it.
fn delimited<'a>(text: &'a str, open: &str, close: &str) -> Option<(&'a str, &'a str)> {
    let body = text.strip_prefix(open)?;
    let end = body.find(close).filter(|&end| end > 0)?;
    Some((&body[..end], &body[end + close.len()..]))
}

/// Whether a line starts a block of its own (and so ends a paragraph or list item before it).
fn starts_block(line: &str) -> bool {
    line.starts_with('#')
        || line.starts_with('|')
        || line.starts_with("```")
        || list_item(line).is_some()
}

/// A list item's marker as roff's `.IP` tag, and its text.
fn list_item(line: &str) -> Option<(String, &str)> {
    if let Some(text) = line.strip_prefix("- ").or_else(|| line.strip_prefix("* ")) {
        return Some(("\\(bu".into(), text));
    }
    let (number, text) = line.split_once(". ")?;
    (!number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
        .then(|| (format!("{number}."), text))
}

/// Lines up to the next blank line or block start, joined (a paragraph's or list item's text).
fn continuation<'a>(first: &str, lines: &mut Peekable<impl Iterator<Item = &'a str>>) -> String {
    let mut text = first.to_string();
    while let Some(line) = lines.next_if(|l| !l.trim().is_empty() && !starts_block(l.trim_start()))
    {
        text.push('\n');
        text.push_str(line.trim_start());
    }
    text
}

/// A Markdown table as a tbl(1) table: a bold header row (omitted when empty) and text blocks
/// (`T{`…`T}`) so that long cells wrap within their column.
fn table(out: &mut String, rows: &[&str]) {
    let cells = |row: &str| -> Vec<String> {
        let row = row.trim().trim_start_matches('|');
        let row = row
            .strip_suffix('|')
            .filter(|r| !r.ends_with('\\'))
            .unwrap_or(row);
        let mut cells = vec![String::new()];
        let mut chars = row.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&'|') => {
                    cells.last_mut().expect("one cell").push('|');
                    chars.next();
                }
                '|' => cells.push(String::new()),
                c => cells.last_mut().expect("one cell").push(c),
            }
        }
        cells.iter().map(|c| c.trim().to_string()).collect()
    };
    let is_rule = |cells: &[String]| {
        cells
            .iter()
            .all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':')))
    };
    let rows: Vec<Vec<String>> = rows.iter().map(|r| cells(r)).collect();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (header, body): (&[Vec<String>], &[Vec<String>]) = match rows.split_first() {
        Some((head, rest)) if rest.first().is_some_and(|r| is_rule(r)) => {
            (std::slice::from_ref(head), &rest[1..])
        }
        _ => (&[], &rows),
    };
    let header = header.iter().find(|h| h.iter().any(|c| !c.is_empty()));
    // A column other than the last wraps only when it has a long cell; the wrapping columns share
    // what the others leave of a 70-character line (at least their longest word each).
    const WRAP_FROM: usize = 30;
    const LINE: usize = 70;
    let visible = |t: &str| t.chars().filter(|&c| c != '`' && c != '*').count();
    let column = |i: usize| rows.iter().filter_map(move |r| r.get(i));
    let longest: Vec<usize> = (0..columns)
        .map(|i| column(i).map(|c| visible(c)).max().unwrap_or(0))
        .collect();
    let wraps = |i: usize| i + 1 == columns || longest[i] > WRAP_FROM;
    let fixed: usize = (0..columns)
        .filter(|&i| !wraps(i))
        .map(|i| longest[i] + 3)
        .sum();
    let share = LINE.saturating_sub(fixed) / (0..columns).filter(|&i| wraps(i)).count().max(1);
    let widths: Vec<Option<usize>> = (0..columns)
        .map(|i| {
            let word = column(i)
                .flat_map(|c| c.split_whitespace())
                .map(visible)
                .max()
                .unwrap_or(0);
            (i + 1 < columns && wraps(i)).then(|| share.max(word))
        })
        .collect();
    let format = |font: &str| {
        let spec = |i: usize| match widths[i] {
            _ if i + 1 == columns => format!("l{font}x"),
            Some(width) => format!("l{font}w({width}n)"),
            None => format!("l{font}"),
        };
        (0..columns).map(spec).collect::<Vec<_>>().join(" ")
    };
    // Left-adjusted and unhyphenated: narrow columns cannot be justified without gaps (and groff
    // warnings), and hyphens would split identifiers.
    out.push_str(".PP\n.ad l\n.nh\n.TS\n");
    if header.is_some() {
        let _ = writeln!(out, "{}", format("B"));
    }
    let _ = writeln!(out, "{}.", format(""));
    if let Some(header) = header {
        table_row(out, header, &widths);
        out.push_str("_\n");
    }
    for row in body {
        table_row(out, row, &widths);
    }
    out.push_str(".TE\n.ad\n.hy\n");
}

/// One table row, missing cells empty: a text block (`T{`…`T}`) where the column wraps (the last,
/// and those with a width).
fn table_row(out: &mut String, row: &[String], widths: &[Option<usize>]) {
    for (i, width) in widths.iter().enumerate() {
        if i > 0 {
            out.push('\t');
        }
        let text = inline(row.get(i).map_or("", String::as_str), false);
        if i + 1 == widths.len() || width.is_some() {
            out.push_str("T{\n");
            push_text(out, &text);
            out.push_str("T}");
        } else if text.starts_with('.') || text.starts_with('\'') {
            let _ = write!(out, "\\&{text}");
        } else {
            out.push_str(&text);
        }
    }
    out.push('\n');
}

/// The policy reference's Markdown as `shaper-policy(7)`: the title becomes DESCRIPTION,
/// headings become sections, code blocks stay preformatted, tables become tbl(1) tables, lists
/// become indented paragraphs and inline markup becomes fonts.
pub fn markdown_to_man(md: &str) -> String {
    let mut out = format!(
        "'\\\" t\n.TH SHAPER-POLICY 7 \"\" \"shaper {}\" \"shaper manual\"\n.SH NAME\n\
         shaper-policy \\- the Lua policy reference of shaper\n",
        env!("CARGO_PKG_VERSION")
    );
    let mut lines = md.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with("```") {
            out.push_str(".PP\n.RS 4\n.nf\n");
            for code in lines.by_ref().take_while(|l| !l.starts_with("```")) {
                push_code(&mut out, code);
            }
            out.push_str(".fi\n.RE\n");
        } else if let Some(code) = line.strip_prefix("    ") {
            // An indented block is a command example: kept as it is, blank lines included.
            out.push_str(".PP\n.RS 4\n.nf\n");
            push_code(&mut out, code);
            while let Some(code) = lines.next_if(|l| l.starts_with("    ") || l.trim().is_empty()) {
                push_code(&mut out, code.strip_prefix("    ").unwrap_or(""));
            }
            out.push_str(".fi\n.RE\n");
        } else if line.starts_with('|') {
            let mut rows = vec![line];
            while let Some(row) = lines.next_if(|l| l.starts_with('|')) {
                rows.push(row);
            }
            table(&mut out, &rows);
        } else if line.starts_with("# ") {
            // The document's title: the page's NAME already says it.
            out.push_str(".SH DESCRIPTION\n");
        } else if let Some(heading) = line.strip_prefix("## ") {
            let _ = writeln!(out, ".SH \"{}\"", inline(heading, true));
        } else if let Some(heading) = line.trim_start_matches('#').strip_prefix(' ') {
            let _ = writeln!(out, ".SS \"{}\"", inline(heading, false));
        } else if let Some((tag, text)) = list_item(line) {
            let _ = writeln!(out, ".IP {tag} 4");
            push_text(&mut out, &inline(&continuation(text, &mut lines), false));
        } else {
            out.push_str(".PP\n");
            push_text(&mut out, &inline(&continuation(line, &mut lines), false));
        }
    }
    out.push_str(".SH \"SEE ALSO\"\n\\fBshaper\\fR(1), \\fBshaper\\-check\\fR(1), ");
    out.push_str("\\fBshaper\\-simulate\\fR(1)\n");
    out
}

/// A preformatted line: only escapes, leading spaces kept.
fn push_code(out: &mut String, line: &str) {
    if line.starts_with('.') || line.starts_with('\'') {
        out.push_str("\\&");
    }
    out.push_str(&escape(line));
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// `page` as man(1) shows it at 80 columns: (text, man's and groff's warnings).
    fn render(page: &[u8]) -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("page.7");
        std::fs::write(&path, page).unwrap();
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .expect("man (man-db) is installed");
        assert!(out.status.success(), "man -l failed: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        (text, String::from_utf8(out.stderr).unwrap())
    }

    fn assert_no_markdown(text: &str) {
        for raw in ["|---", "| ", "](#", "`", "**", "\\f"] {
            assert!(!text.contains(raw), "{raw:?} in the rendered page:\n{text}");
        }
    }

    #[test]
    fn policy_reference_renders_tables_and_links() {
        let roff = markdown_to_man(POLICY_MD);
        let (text, warnings) = render(roff.as_bytes());
        assert_eq!(warnings, "", "groff warnings:\n{warnings}\n{roff}");
        assert_no_markdown(&text);
        assert!(text.contains("THE SANDBOX AND ITS LIMITS"), "{text}");
        // A table row and a link's text, each on one line at 80 columns.
        let row = text
            .lines()
            .find(|l| l.contains("memory") && l.contains("64 MiB"));
        assert!(row.is_some(), "the limits table's memory row:\n{text}");
        assert!(text.contains("guaranteed rate: a limit"), "{text}");
    }

    #[test]
    fn markdown_edge_cases_render_as_text() {
        let md = "# Title\n\n## A `mixed_Case` heading\n\n\
                  Some *emphasis*, **strong**, a [site](https://example.org) and `a\\b`.\n\n\
                  .a line that looks like a request\n\n\
                  - one\n  continued\n- two\n\n\
                  | a | b |\n|---|:--|\n| x\\|y | `z` |\n\n    indented --flag\n";
        let roff = markdown_to_man(md);
        let (text, warnings) = render(roff.as_bytes());
        assert_eq!(warnings, "", "groff warnings:\n{warnings}\n{roff}");
        assert_no_markdown(&text);
        for expected in [
            "A mixed_Case HEADING",
            "Some emphasis, strong, a site <https://example.org> and a\\b.",
            ".a line that looks like a request",
            "one continued",
            "x|y",
            "indented --flag",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing:\n{text}\n{roff}"
            );
        }
    }

    #[test]
    fn main_page_has_exit_status_environment_and_files() {
        let (text, warnings) = render(&main_page().unwrap());
        assert_eq!(warnings, "", "groff warnings:\n{warnings}");
        for expected in [
            "EXIT STATUS",
            "no daemon is running",
            "CAP_NET_ADMIN",
            "nothing can be shaped",
            "ENVIRONMENT",
            "SHAPER_CONFIG",
            "FILES",
            "/etc/shaper/policy.lua",
            "SEE ALSO",
            "shaper-policy(7)",
        ] {
            assert!(text.contains(expected), "{expected:?} missing:\n{text}");
        }
    }

    #[test]
    fn interface_completion_lists_interfaces() {
        for (shell, live) in [
            (Shell::Bash, "/sys/class/net"),
            (Shell::Zsh, "_net_interfaces"),
            (Shell::Fish, "__fish_print_interfaces"),
        ] {
            let script = completion(shell).unwrap();
            assert!(script.contains(live), "{shell}: no {live}");
            assert!(!script.contains(INTERFACE_MARKER), "{shell}: marker left");
        }
        // Bash, for real: complete `shaper run -i l` and `shaper config --interface ''`.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shaper.bash");
        std::fs::write(&path, completion(Shell::Bash).unwrap()).unwrap();
        let interfaces = || -> Vec<String> {
            std::fs::read_dir("/sys/class/net")
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        };
        let before = interfaces();
        let out = Command::new("bash")
            .arg("-c")
            .arg(
                r#"source "$1"
                   COMP_WORDS=(shaper run -i l); COMP_CWORD=3; _shaper shaper l -i
                   echo "run: ${COMPREPLY[*]}"
                   COMP_WORDS=(shaper config --interface ""); COMP_CWORD=3; _shaper shaper "" --interface
                   echo "config: ${COMPREPLY[*]}""#,
            )
            .arg("bash")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let words = |prefix: &str| -> Vec<String> {
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or("");
            line.split_whitespace().map(String::from).collect()
        };
        assert!(words("run: ").contains(&"lo".to_string()), "{text} {out:?}");
        // Every interface present before and after (tests elsewhere may add and remove some).
        let after = interfaces();
        let offered = words("config: ");
        for name in before.iter().filter(|n| after.contains(n)) {
            assert!(offered.contains(name), "{name} not offered: {text} {out:?}");
        }
    }
}
