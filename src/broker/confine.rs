//! Landlock confinement of runs (issue 14): the policy's `[confine]`, and what a spawn gets
//! from it. The ruleset itself is built and applied in the child ([`sys::Confine`]): after
//! the identity change, with `no_new_privs`, by the child's own system calls, opening each
//! path as the user.
//!
//! | rule               | refuses                                                              |
//! |--------------------|----------------------------------------------------------------------|
//! | `confine.required` | a spawn the policy confines, on a kernel without usable Landlock (none, or ABI < 3) |
//!
//! A confined run may write beneath its working directory (and a git worktree's linked git
//! directories), the user's home, `/tmp`, `/var/tmp`, `/dev/shm`, `/run/user/<uid>`, the
//! device nodes a shell needs, and `extra_write`; nowhere else (EACCES), whatever the Unix
//! permissions would allow. Reads are left to the Unix permissions.
#![forbid(unsafe_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use serde::Deserialize;

use stoa_executor::sys::{landlock, Confine};

use super::policy::Refusal;
use super::spawn::Account;
use crate::wire::{limits, Confinement, Purpose};

/// Most `extra_write` entries.
pub const MAX_EXTRA_WRITE: usize = 64;

/// Where every confined run may write besides its working directory and home.
const SHARED_DIRS: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];

/// The device nodes a shell and its programs open for writing (and their ioctls): the
/// run's own terminal is already open on fds 0–2, these are opened by path.
const DEVICES: [&str; 8] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
];

/// The policy's `[confine]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfinePolicy {
    /// Agents' tasks.
    pub agents: bool,
    /// Web terminals.
    pub terminals: bool,
    /// `POST /exec` runs.
    pub exec: bool,
    /// Refuse a run the policy confines when this kernel cannot confine it.
    pub required: bool,
    /// At Landlock ABI 6 and later, also keep a confined run from signalling processes
    /// outside it and from connecting to abstract unix sockets made outside it.
    pub scope: bool,
    /// More places confined runs may write: absolute paths, where `{user}`, `{uid}` and
    /// `{home}` stand for the run's user name, uid and home directory.
    pub extra_write: Vec<String>,
}

impl Default for ConfinePolicy {
    fn default() -> Self {
        ConfinePolicy {
            agents: true,
            terminals: false,
            exec: false,
            required: false,
            scope: true,
            extra_write: Vec::new(),
        }
    }
}

/// What this kernel offers: its Landlock ABI, or why there is none.
pub type Kernel = Result<u32, String>;

/// Probes this kernel once (at broker start).
pub fn probe_kernel() -> Kernel {
    match stoa_executor::sys::landlock_abi() {
        Ok(abi) => Ok(abi),
        Err(e) => Err(match e.raw_os_error() {
            Some(libc::ENOSYS) => {
                "this kernel has no Landlock (landlock_create_ruleset: ENOSYS; not built in, or a seccomp filter that predates it)".into()
            }
            Some(libc::EOPNOTSUPP) => {
                "this kernel has Landlock built in but not enabled (add landlock to the lsm= boot parameter)".into()
            }
            _ => format!("this kernel's Landlock cannot be used: {e}"),
        }),
    }
}

impl ConfinePolicy {
    pub fn validate(&self) -> Result<(), String> {
        if self.extra_write.len() > MAX_EXTRA_WRITE {
            return Err(format!(
                "confine.extra_write has more than {MAX_EXTRA_WRITE} entries"
            ));
        }
        for path in &self.extra_write {
            let shown = super::table::clip(path, 128);
            if !(path.starts_with('/') || path.starts_with("{home}")) {
                return Err(format!(
                    "confine.extra_write: {shown:?} is not absolute (or under {{home}})"
                ));
            }
            if path.len() > limits::MAX_PATH_BYTES || path.contains('\0') {
                return Err(format!(
                    "confine.extra_write: {shown:?} is too long or contains NUL"
                ));
            }
            let mut rest = path.as_str();
            while let Some(open) = rest.find('{') {
                let after = &rest[open..];
                let known = ["{user}", "{uid}", "{home}"]
                    .into_iter()
                    .find(|p| after.starts_with(p));
                let Some(known) = known else {
                    return Err(format!(
                        "confine.extra_write: {shown:?} has an unknown placeholder (known: {{user}}, {{uid}}, {{home}})"
                    ));
                };
                rest = &after[known.len()..];
            }
            if path.split('/').any(|c| c == "..") {
                return Err(format!("confine.extra_write: {shown:?} contains '..'"));
            }
        }
        Ok(())
    }

    /// Whether the policy confines runs for `purpose`.
    pub fn wants(&self, purpose: Purpose) -> bool {
        match purpose {
            Purpose::Agent => self.agents,
            Purpose::Terminal => self.terminals,
            Purpose::Exec => self.exec,
        }
    }

    /// The paths (besides the working directory) a confined run of `account` may write
    /// beneath.
    pub fn write_paths(&self, account: &Account) -> Vec<CString> {
        let home = account.home.as_os_str().as_bytes();
        let mut paths: Vec<Vec<u8>> = vec![home.to_vec()];
        paths.extend(SHARED_DIRS.iter().map(|d| d.as_bytes().to_vec()));
        paths.push(format!("/run/user/{}", account.uid).into_bytes());
        paths.extend(DEVICES.iter().map(|d| d.as_bytes().to_vec()));
        for extra in &self.extra_write {
            let text = extra
                .replace("{user}", &account.name)
                .replace("{uid}", &account.uid.to_string());
            // The home goes in as bytes: it need not be UTF-8.
            let mut bytes = Vec::new();
            let mut parts = text.split("{home}");
            if let Some(first) = parts.next() {
                bytes.extend_from_slice(first.as_bytes());
            }
            for part in parts {
                bytes.extend_from_slice(home);
                bytes.extend_from_slice(part.as_bytes());
            }
            paths.push(bytes);
        }
        paths
            .into_iter()
            .filter_map(|p| CString::new(p).ok())
            .collect()
    }

    /// What a spawn for `purpose` as `account` gets: the confinement to apply (if any) and
    /// what to report; or the refusal of `confine.required`.
    pub fn decide(
        &self,
        purpose: Purpose,
        kernel: &Kernel,
        account: &Account,
    ) -> Result<(Option<Confine>, Confinement), Refusal> {
        if !self.wants(purpose) {
            let key = match purpose {
                Purpose::Agent => "agents",
                Purpose::Terminal => "terminals",
                Purpose::Exec => "exec",
            };
            return Ok((
                None,
                Confinement::None {
                    reason: format!(
                        "the policy does not confine these runs (confine.{key} = false)"
                    ),
                },
            ));
        }
        let unusable = match kernel {
            Ok(abi) if *abi >= landlock::MIN_ABI => None,
            Ok(abi) => Some(format!(
                "this kernel's Landlock ABI is {abi}; stoa confines from ABI {} (truncation is not covered before)",
                landlock::MIN_ABI
            )),
            Err(why) => Some(why.clone()),
        };
        if let Some(why) = unusable {
            if self.required {
                return Err(Refusal::new(
                    "confine.required",
                    format!("{why}; the policy requires confined runs, so none is started"),
                ));
            }
            return Ok((None, Confinement::None { reason: why }));
        }
        let abi = *kernel.as_ref().expect("usable: checked above");
        let confine = Confine::new(abi, self.scope, self.write_paths(account))
            .map_err(|e| Refusal::new("confine.required", e.to_string()))?;
        Ok((Some(confine), Confinement::Landlock { abi }))
    }

    /// (name, value) pairs for `/health` and `stoa doctor`.
    pub fn report(&self, kernel: &Kernel) -> Vec<(String, String)> {
        let on = |b: bool| if b { "on" } else { "off" };
        let kernel_line = match kernel {
            Ok(abi) if *abi >= landlock::MIN_ABI => format!(
                "abi {abi}{}",
                if *abi >= landlock::SCOPE_ABI && self.scope {
                    " (writes; signals and abstract sockets scoped)"
                } else {
                    " (writes)"
                }
            ),
            Ok(abi) => format!(
                "not enforced: abi {abi} is below {} (truncation is not covered)",
                landlock::MIN_ABI
            ),
            Err(why) => format!("not enforced: {why}"),
        };
        vec![
            ("landlock".into(), kernel_line),
            (
                "confine".into(),
                format!(
                    "agents {}, terminals {}, exec {}; required {}",
                    on(self.agents),
                    on(self.terminals),
                    on(self.exec),
                    if self.required { "yes" } else { "no" }
                ),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn alice() -> Account {
        Account {
            name: "alice".into(),
            uid: 1001,
            gid: 1001,
            home: PathBuf::from("/home/alice"),
            shell: PathBuf::from("/bin/sh"),
            groups: vec![1001],
        }
    }

    fn strings(paths: &[CString]) -> Vec<String> {
        paths
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn policy_parses_and_refuses_unknown_keys() {
        let p: ConfinePolicy =
            toml::from_str("terminals = true\nextra_write = [\"/srv/{user}\"]\n").unwrap();
        assert!(p.agents && p.terminals && !p.exec && !p.required && p.scope);
        assert!(toml::from_str::<ConfinePolicy>("agent = true").is_err());
        for bad in ["relative", "/srv/{name}", "/srv/../etc", "/srv/{user"] {
            let p = ConfinePolicy {
                extra_write: vec![bad.into()],
                ..ConfinePolicy::default()
            };
            assert!(p.validate().is_err(), "{bad:?} accepted");
        }
        let p = ConfinePolicy {
            extra_write: vec!["/srv/{user}/{uid}".into(), "{home}/../x".into()],
            ..ConfinePolicy::default()
        };
        assert!(p.validate().unwrap_err().contains("'..'"));
        let many = ConfinePolicy {
            extra_write: vec!["/x".into(); MAX_EXTRA_WRITE + 1],
            ..ConfinePolicy::default()
        };
        assert!(many.validate().is_err());
    }

    #[test]
    fn the_allowed_paths() {
        let p = ConfinePolicy {
            extra_write: vec!["/srv/{user}-{uid}".into(), "{home}2/cache".into()],
            ..ConfinePolicy::default()
        };
        let paths = strings(&p.write_paths(&alice()));
        for want in [
            "/home/alice",
            "/tmp",
            "/var/tmp",
            "/dev/shm",
            "/run/user/1001",
            "/dev/null",
            "/dev/tty",
            "/dev/ptmx",
            "/dev/pts",
            "/srv/alice-1001",
            "/home/alice2/cache",
        ] {
            assert!(paths.iter().any(|p| p == want), "{want} missing: {paths:?}");
        }
        assert!(!paths.iter().any(|p| p == "/" || p.starts_with("/etc")));
    }

    #[test]
    fn decisions_by_purpose_and_kernel() {
        let p = ConfinePolicy::default();
        let (c, report) = p.decide(Purpose::Agent, &Ok(7), &alice()).unwrap();
        let c = c.expect("agents are confined");
        assert_eq!(report, Confinement::Landlock { abi: 7 });
        assert_eq!(report.to_string(), "landlock abi 7");
        assert_eq!(c.abi(), 7);
        use landlock::*;
        // Every write right of ABI 7, no read right, and the scopes.
        assert_eq!(
            c.handled_access() & (FS_READ_FILE | FS_READ_DIR | FS_EXECUTE),
            0
        );
        for right in [
            FS_WRITE_FILE,
            FS_REMOVE_FILE,
            FS_MAKE_REG,
            FS_REFER,
            FS_TRUNCATE,
            FS_IOCTL_DEV,
        ] {
            assert_ne!(c.handled_access() & right, 0);
        }
        assert_eq!(c.scoped(), SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET);
        assert_eq!(c.file_access(), FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV);
        // ABI 4: no ioctl right, no scopes.
        let (c, _) = p.decide(Purpose::Agent, &Ok(4), &alice()).unwrap();
        let c = c.unwrap();
        assert_eq!(c.handled_access() & FS_IOCTL_DEV, 0);
        assert_eq!(c.scoped(), 0);
        // Terminals and exec are not confined by default.
        for purpose in [Purpose::Terminal, Purpose::Exec] {
            let (c, report) = p.decide(purpose, &Ok(7), &alice()).unwrap();
            assert!(c.is_none());
            assert!(report
                .to_string()
                .starts_with("none (the policy does not confine"));
        }
        // Scopes off.
        let unscoped = ConfinePolicy {
            scope: false,
            ..ConfinePolicy::default()
        };
        let (c, _) = unscoped.decide(Purpose::Agent, &Ok(7), &alice()).unwrap();
        assert_eq!(c.unwrap().scoped(), 0);
    }

    #[test]
    fn no_landlock_is_reported_or_refused() {
        let none: Kernel = Err("this kernel has no Landlock (ENOSYS)".into());
        let p = ConfinePolicy::default();
        let (c, report) = p.decide(Purpose::Agent, &none, &alice()).unwrap();
        assert!(c.is_none());
        assert_eq!(
            report,
            Confinement::None {
                reason: "this kernel has no Landlock (ENOSYS)".into()
            }
        );
        let required = ConfinePolicy {
            required: true,
            ..ConfinePolicy::default()
        };
        let refusal = required
            .decide(Purpose::Agent, &none, &alice())
            .unwrap_err();
        assert_eq!(refusal.rule, "confine.required");
        assert!(refusal.message.contains("no Landlock"), "{refusal}");
        // ABI 2 cannot confine truncation: the same.
        let refusal = required
            .decide(Purpose::Agent, &Ok(2), &alice())
            .unwrap_err();
        assert!(refusal.message.contains("ABI is 2"), "{refusal}");
        // A run the policy does not confine is not refused.
        assert!(required.decide(Purpose::Exec, &none, &alice()).is_ok());
    }
}
