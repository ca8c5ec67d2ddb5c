//! `stoa config get|set|list`: edits the daemon's TOML config in place, keeping comments and
//! layout, and refuses any change that would not load.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use toml_edit::{DocumentMut, Item, Value};

use crate::config::{self, DaemonConfig};

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print one setting (dotted key, e.g. execution.use_executor).
    Get { key: String },
    /// Change one setting: VALUE is TOML (true, 120, "text", ["a", "b"]); bare words are
    /// taken as strings.
    Set { key: String, value: String },
    /// Every setting in the file.
    List,
}

fn path() -> PathBuf {
    std::env::var_os("STOA_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(config::default_daemon_config)
}

fn load() -> Result<(PathBuf, DocumentMut), String> {
    let path = path();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let doc = text
        .parse::<DocumentMut>()
        .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?;
    Ok((path, doc))
}

fn parse_value(raw: &str) -> Value {
    // A TOML value if it is one, else the text as a string.
    format!("v = {raw}")
        .parse::<DocumentMut>()
        .ok()
        .and_then(|d| d.get("v").and_then(|i| i.as_value()).cloned())
        .unwrap_or_else(|| Value::from(raw))
}

fn lookup<'a>(doc: &'a DocumentMut, key: &str) -> Option<&'a Item> {
    let mut item = doc.as_item();
    for part in key.split('.') {
        item = item.get(part)?;
    }
    Some(item)
}

fn flatten(prefix: &str, item: &Item, out: &mut Vec<(String, String)>) {
    match item {
        Item::Table(t) => {
            for (k, v) in t.iter() {
                flatten(&join(prefix, k), v, out);
            }
        }
        Item::Value(Value::InlineTable(t)) => {
            for (k, v) in t.iter() {
                out.push((join(prefix, k), v.to_string().trim().to_string()));
            }
        }
        Item::Value(v) => out.push((prefix.to_string(), v.to_string().trim().to_string())),
        _ => {}
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

pub fn run(cmd: ConfigCommand) -> ExitCode {
    let result = (|| -> Result<(), String> {
        let (path, mut doc) = load()?;
        match cmd {
            ConfigCommand::Get { key } => match lookup(&doc, &key) {
                Some(Item::Value(v)) => println!("{}", v.to_string().trim()),
                Some(other) => println!("{}", other.to_string().trim()),
                None => {
                    return Err(format!(
                        "{key} is not set in {} (the default applies)",
                        path.display()
                    ))
                }
            },
            ConfigCommand::List => {
                let mut all = Vec::new();
                flatten("", doc.as_item(), &mut all);
                for (k, v) in all {
                    println!("{k} = {v}");
                }
            }
            ConfigCommand::Set { key, value } => {
                let parts: Vec<&str> = key.split('.').collect();
                if parts.iter().any(|p| p.is_empty()) {
                    return Err(format!("invalid key {key:?}"));
                }
                let (last, tables) = parts.split_last().expect("non-empty");
                let mut table = doc.as_table_mut();
                for part in tables {
                    let entry = table.entry(part).or_insert_with(|| {
                        let mut t = toml_edit::Table::new();
                        t.set_implicit(true);
                        Item::Table(t)
                    });
                    table = entry
                        .as_table_mut()
                        .ok_or_else(|| format!("{part} in {key} is not a table"))?;
                }
                table[*last] = Item::Value(parse_value(&value));
                let text = doc.to_string();
                DaemonConfig::parse(&text).map_err(|e| format!("not changed: {e}"))?;
                let tmp = path.with_extension("toml.tmp");
                std::fs::write(&tmp, &text)
                    .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
                if let Ok(meta) = std::fs::metadata(&path) {
                    let _ = std::fs::set_permissions(&tmp, meta.permissions());
                }
                std::fs::rename(&tmp, &path)
                    .map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
                eprintln!(
                    "{key} set in {}; `stoa daemon restart` applies it",
                    path.display()
                );
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stoa config: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_toml_or_text() {
        assert_eq!(parse_value("true").as_bool(), Some(true));
        assert_eq!(parse_value("120").as_integer(), Some(120));
        assert_eq!(parse_value("\"x y\"").as_str(), Some("x y"));
        assert_eq!(parse_value("claude").as_str(), Some("claude"));
        assert!(parse_value("[\"a\", \"b\"]").as_array().is_some());
    }
}
