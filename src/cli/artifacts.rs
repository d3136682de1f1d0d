//! `shaper generate-artifacts DIR`: man pages and shell completions from the clap definition
//! (so they cannot drift from the real options), and the policy reference as a man page. Run by
//! packaging; hidden from `--help`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// The policy reference, shipped as `shaper-policy(7)`.
const POLICY_MD: &str = include_str!("../../docs/policy.md");

pub fn generate(dir: &Path) -> anyhow::Result<ExitCode> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    std::fs::write(man.join("shaper-policy.7"), markdown_to_man(POLICY_MD))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "shaper", &completions)?;
    }
    println!(
        "wrote man pages to {} and completions to {}",
        man.display(),
        completions.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn escape(line: &str) -> String {
    let text = line.replace('\\', "\\e").replace('`', "");
    if text.starts_with('.') || text.starts_with('\'') {
        format!("\\&{text}")
    } else {
        text
    }
}

/// A plain rendering of the reference's Markdown as roff: headings become sections, code
/// blocks and tables stay preformatted, everything else is filled text.
pub fn markdown_to_man(md: &str) -> String {
    let mut out = String::from(
        ".TH SHAPER-POLICY 7\n.SH NAME\nshaper-policy \\- the Lua policy reference of shaper\n",
    );
    let mut code = false;
    let mut table = false;
    for line in md.lines() {
        if line.starts_with("```") {
            out.push_str(if code { ".fi\n.RE\n" } else { ".RS\n.nf\n" });
            code = !code;
            continue;
        }
        if code {
            let _ = writeln!(out, "{}", escape(line));
            continue;
        }
        // An indented block (four spaces) is a command example: keep it as it is.
        if let Some(cmd) = line.strip_prefix("    ") {
            let _ = writeln!(out, ".RS\n.nf\n{}\n.fi\n.RE", escape(cmd));
            continue;
        }
        let is_row = line.starts_with('|');
        if is_row != table {
            out.push_str(if is_row { ".nf\n" } else { ".fi\n" });
            table = is_row;
        }
        if is_row {
            if !line.contains("---") {
                let _ = writeln!(out, "{}", escape(line));
            }
        } else if let Some(h) = line.strip_prefix("# ") {
            let _ = writeln!(out, ".SH {}", escape(&h.to_uppercase()));
        } else if let Some(h) = line.strip_prefix("## ") {
            let _ = writeln!(out, ".SH {}", escape(&h.to_uppercase()));
        } else if let Some(h) = line.strip_prefix("### ") {
            let _ = writeln!(out, ".SS {}", escape(h));
        } else if line.trim().is_empty() {
            out.push_str(".PP\n");
        } else {
            let _ = writeln!(out, "{}", escape(line.trim_start_matches("- ")));
        }
    }
    if table {
        out.push_str(".fi\n");
    }
    out
}
