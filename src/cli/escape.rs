//! Strings from the server shown on a terminal: a terminal's command, a worktree, a name
//! can be chosen by any user and hold escape sequences (retitle the window, rewrite the
//! screen, feed the admin's terminal answers). Human-readable output escapes control
//! characters; JSON output stays exact.
#![forbid(unsafe_code)]

use std::fmt::Write;

/// Whether `c` could steer a terminal or reorder what is shown: C0 and C1 controls, DEL,
/// and the bidirectional overrides and isolates.
fn dangerous(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape(s: &str, keep_lines: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' | '\t' if keep_lines => out.push(c),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if dangerous(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if dangerous(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// One line of a table: every control character escaped (`\x1b`, `\n`, `\u{9b}`).
pub fn field(s: &str) -> String {
    escape(s, false)
}

/// Text shown as text (an agent's answer): newlines and tabs kept, other controls escaped.
pub fn text(s: &str) -> String {
    escape(s, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped() {
        assert_eq!(field("a\x1b]0;pwned\x07b"), "a\\x1b]0;pwned\\x07b");
        assert_eq!(field("x\ny\u{9b}2J"), "x\\ny\\u{9b}2J");
        assert_eq!(field("ab\u{202e}cd"), "ab\\u{202e}cd");
        assert_eq!(text("one\n\ttwo\x1b[2J"), "one\n\ttwo\\x1b[2J");
        assert_eq!(field("plain é 日本"), "plain é 日本");
    }
}
