//! The broker's audit log: one JSON object per line, appended to a root-only file (default
//! `audit.jsonl` in the broker's state directory). Written by the broker, never by the
//! daemon: every spawn, refusal, exit and protocol violation. JSON encoding escapes
//! whatever users put in argv, paths or names.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tracing::error;

pub struct Audit {
    path: PathBuf,
    file: File,
}

impl Audit {
    pub fn open(path: &Path, owner: u32) -> Result<Audit, String> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| format!("cannot open the audit log {}: {e}", path.display()))?;
        let meta = file.metadata().map_err(|e| e.to_string())?;
        if meta.uid() != owner || meta.mode() & 0o077 != 0 {
            return Err(format!(
                "audit log {} must belong to uid {owner} with mode 0600",
                path.display()
            ));
        }
        Ok(Audit {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record: `event` plus `fields` plus the time.
    pub fn record(&mut self, event: &str, fields: Value) {
        let mut record = Map::new();
        record.insert(
            "time".into(),
            json!(humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()),
        );
        record.insert("event".into(), json!(event));
        if let Value::Object(extra) = fields {
            record.extend(extra);
        }
        let mut line = Value::Object(record).to_string();
        line.push('\n');
        // One write per record: O_APPEND keeps lines whole.
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            error!(path = %self.path.display(), "cannot write the audit log: {e}");
        }
    }
}
