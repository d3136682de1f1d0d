//! Plain aligned text tables for terminal output. Every cell is escaped
//! ([`crate::text::escape`]): names come from processes and policies, and a control character
//! must neither reach the terminal nor split a row.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::text::escape;

/// Columns padded to their widest cell, two spaces apart, no trailing blanks; cells escaped.
pub fn render<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    render_rows(&header, rows)
}

/// [`render`] for a number of columns known only at run time (rows as long as `header`).
pub fn render_rows<R: AsRef<[String]>>(header: &[&str], rows: &[R]) -> String {
    let rows: Vec<Vec<Cow<str>>> = rows
        .iter()
        .map(|r| r.as_ref().iter().map(|c| escape(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (cell, &w) in cells.zip(&widths) {
            let _ = write!(text, "{cell:<w$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(|c| &**c));
    }
    out
}

/// `-` for a missing value.
pub fn or_dash(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn aligns_columns() {
        let text = super::render(
            ["A", "LONG"],
            &[
                ["xyz".to_string(), "1".to_string()],
                ["q".to_string(), "22".to_string()],
            ],
        );
        assert_eq!(text, "A    LONG\nxyz  1\nq    22\n");
    }

    #[test]
    fn a_newline_in_a_cell_does_not_split_its_row() {
        let text = super::render(
            ["NAME", "N"],
            &[["evil\nfake  9".to_string(), "1".to_string()]],
        );
        assert_eq!(text, "NAME           N\nevil\\nfake  9  1\n");
    }
}
