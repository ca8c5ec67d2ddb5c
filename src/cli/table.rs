//! Human-readable output: tables whose columns line up, and `name: value` blocks. Every
//! cell is escaped (`escape::field`): what the server sends may be anyone's text.
#![forbid(unsafe_code)]

use serde_json::Value;

use super::escape;

/// Prints `rows` under `header`, each column as wide as its widest cell (the last column
/// is not padded).
pub fn print(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", render(header, rows));
}

pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| escape::field(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            if i + 1 < widths.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Prints `name: value` lines with the values lined up; empty values are left out.
pub fn fields(pairs: &[(&str, String)]) {
    let width = pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, _)| k.chars().count() + 1)
        .max()
        .unwrap_or(0);
    for (name, value) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        println!(
            "{:<width$} {}",
            format!("{name}:"),
            escape::field(value),
            width = width
        );
    }
}

/// A JSON value as a cell: strings as they are, null as nothing, others as JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_whatever_the_widths() {
        let out = render(
            &["ID", "USER", "WHAT"],
            &[
                vec!["1".into(), "a-very-long-user-name".into(), "x".into()],
                vec!["22222".into(), "bob".into(), "y\u{1b}]0;t".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "ID     USER                   WHAT");
        assert_eq!(lines[1], "1      a-very-long-user-name  x");
        // Escaped before it is measured: the columns still line up.
        assert_eq!(lines[2], "22222  bob                    y\\x1b]0;t");
    }
}
