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
    /// Print one setting: its value in the file, or the default in force.
    Get {
        /// The setting's dotted name, e.g. execution.use_executor.
        key: String,
    },
    /// Change one setting. A text setting (an agent's env value, listen, …) takes VALUE as
    /// the text it is; an agent's command takes a path or a TOML list (["npx", "claude"]);
    /// others take TOML (true, 120, ["a", "b"]).
    Set {
        /// The setting's dotted name, e.g. agents.claude-code.env.BASE_URL.
        key: String,
        /// The new value.
        value: String,
    },
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

/// What `key` holds, to read a value given for it on the command line.
#[derive(Debug, PartialEq)]
enum Kind {
    /// Text: the value is taken as it is typed.
    Text,
    /// An agent's command: a TOML list, or else one path.
    Command,
    /// Anything else: TOML, or text if it is not TOML.
    Toml,
}

fn kind_of(key: &str) -> Kind {
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        ["agents", _, "env", _] => Kind::Text,
        ["agents", _, "command"] => Kind::Command,
        _ => match default_of(key) {
            Some(toml::Value::String(_)) => Kind::Text,
            _ if key == "web_dir" => Kind::Text,
            _ => Kind::Toml,
        },
    }
}

/// The default in force for `key`, if it has one.
fn default_of(key: &str) -> Option<toml::Value> {
    let mut value = toml::Value::try_from(DaemonConfig::default()).ok()?;
    for part in key.split('.') {
        value = value.get(part)?.clone();
    }
    Some(value)
}

fn value_for(key: &str, raw: &str) -> Value {
    match kind_of(key) {
        Kind::Text => Value::from(raw),
        Kind::Command => match parse_value(raw) {
            v @ Value::Array(_) => v,
            _ => Value::from(raw),
        },
        Kind::Toml => parse_value(raw),
    }
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
                None => match default_of(&key) {
                    Some(v) => {
                        println!("{}", v.to_string().trim());
                        eprintln!("(the default: {key} is not set in {})", path.display());
                    }
                    None if key.starts_with("agents.") || key == "web_dir" => {
                        eprintln!(
                            "(not set in {}: stoa's built-in choice applies)",
                            path.display()
                        );
                    }
                    None => return Err(format!("there is no setting {key:?}")),
                },
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
                table[*last] = Item::Value(value_for(&key, &value));
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

    #[test]
    fn text_settings_take_the_value_as_typed() {
        let v = value_for("agents.claude-code.env.RETRIES", "123");
        assert_eq!(v.as_str(), Some("123"));
        let v = value_for("agents.codex.env.QUOTED", "\"x\"");
        assert_eq!(v.as_str(), Some("\"x\""));
        assert_eq!(
            value_for("listen", "0.0.0.0:80").as_str(),
            Some("0.0.0.0:80")
        );
        assert_eq!(value_for("exec_output_limit", "5").as_integer(), Some(5));
        assert_eq!(
            value_for("execution.use_executor", "false").as_bool(),
            Some(false)
        );
    }

    #[test]
    fn commands_are_a_path_or_a_list_and_both_load() {
        let one = value_for("agents.claude-code.command", "/opt/my tools/claude");
        assert_eq!(one.as_str(), Some("/opt/my tools/claude"));
        let list = value_for("agents.claude-code.command", "[\"npx\", \"claude\"]");
        assert_eq!(list.as_array().map(|a| a.len()), Some(2));
        for (value, argv) in [
            (one, vec!["/opt/my tools/claude"]),
            (list, vec!["npx", "claude"]),
        ] {
            let mut doc = DocumentMut::new();
            doc["agents"] = toml_edit::table();
            doc["agents"]["claude-code"] = toml_edit::table();
            doc["agents"]["claude-code"]["command"] = Item::Value(value);
            let config = DaemonConfig::parse(&doc.to_string()).unwrap();
            assert_eq!(config.agents["claude-code"].command, argv);
        }
    }

    #[test]
    fn defaults_are_known() {
        assert_eq!(
            default_of("exec_output_limit").and_then(|v| v.as_integer()),
            Some(1 << 20)
        );
        assert!(default_of("execution.use_executor").is_some());
        assert!(default_of("no.such.key").is_none());
    }
}
