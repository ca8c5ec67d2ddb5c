//! Landlock confinement on the real kernel: a confined child can write beneath the allowed
//! paths and gets EACCES elsewhere, its device nodes work, a git worktree's linked git
//! directories are allowed only when they link back, and at ABI 6 it cannot signal a
//! process outside its domain. No user change here (the integration tests do that as
//! real users): the confinement applies to any uid.
//!
//! No test harness: forking needs a process with one thread.

use std::ffi::CString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use stoa_executor::sys::{self, landlock, ChildSpec, Confine};

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

/// Runs `sh -c script` in `cwd` under `confine`; its exit code.
fn run(confine: Option<&Confine>, cwd: &Path, script: &str) -> i32 {
    let exe = nix::fcntl::open(
        "/bin/sh",
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .expect("open /bin/sh");
    let spec = ChildSpec {
        exe: exe.as_fd(),
        argv: vec![c"sh".into(), c"-c".into(), CString::new(script).unwrap()],
        env: vec![c"PATH=/usr/local/bin:/usr/bin:/bin".into()],
        stdio: None,
        extra_fds: vec![],
        controlling_tty: false,
        identity: None,
        rlimits: vec![],
        umask: 0o022,
        cwd: Some(cstr(cwd)),
        cwd_id: None,
        parent_death_signal: None,
        cgroup_procs: vec![],
        cgroup_dir: None,
        confine,
    };
    let pid = sys::spawn_child(&spec, std::time::Duration::from_secs(60)).expect("spawn");
    match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).expect("wait") {
        nix::sys::wait::WaitStatus::Exited(_, code) => code,
        other => panic!("the child ended with {other:?}"),
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
}

fn main() {
    let abi = sys::landlock_abi().expect(
        "this test needs a kernel with Landlock (see /sys/kernel/security/lsm); it has none",
    );
    assert!(
        abi >= landlock::MIN_ABI,
        "Landlock ABI {abi} is too old for stoa"
    );
    let base = PathBuf::from(format!("/tmp/stoa-ll-exec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let work = base.join("work");
    let extra = base.join("extra");
    let outside = base.join("outside");
    for d in [&work, &extra, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(outside.join("existing"), "keep").unwrap();
    let confine = Confine::new(abi, true, vec![cstr(&extra), c"/dev/null".into()]).unwrap();

    // Unconfined, the same script writes everywhere (the test can fail).
    let script = format!(
        "echo a > ok; echo b > {e}/ok; echo c > /dev/null || exit 3; \
         if echo d 2>/dev/null > {o}/no; then exit 4; fi; \
         if true 2>/dev/null > {o}/existing; then exit 5; fi; \
         if mkdir {o}/dir 2>/dev/null; then exit 6; fi; \
         if rm {o}/existing 2>/dev/null; then exit 7; fi; \
         if ln -s x {o}/link 2>/dev/null; then exit 8; fi; \
         if mv ok {o}/moved 2>/dev/null; then exit 9; fi; \
         mkdir sub && mv ok sub/ok && mv sub/ok {e}/moved || exit 10",
        e = extra.display(),
        o = outside.display()
    );
    assert_eq!(
        run(None, &work, &script),
        4,
        "unconfined, it could not write outside"
    );
    std::fs::remove_file(outside.join("no")).unwrap();
    std::fs::remove_dir_all(&work).unwrap();
    std::fs::create_dir(&work).unwrap();

    assert_eq!(run(Some(&confine), &work, &script), 0, "confined run");
    assert_eq!(read(&work.join("sub/ok")), "", "moved on");
    assert_eq!(read(&extra.join("moved")), "a");
    assert_eq!(read(&extra.join("ok")), "b");
    assert_eq!(read(&outside.join("existing")), "keep");
    assert!(!outside.join("no").exists() && !outside.join("dir").exists());
    println!("landlock: writes confined (ABI {abi})");

    // The error is EACCES ("Permission denied"), as the issue says.
    let code = run(
        Some(&confine),
        &work,
        &format!(
            "echo x 2> err > {}/no; grep -q 'Permission denied' err",
            outside.display()
        ),
    );
    assert_eq!(
        code,
        0,
        "the error was not EACCES: {}",
        read(&work.join("err"))
    );

    // A linked git worktree: its git directories are allowed (a commit works) ...
    let repo = base.join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    git(&repo, &["commit", "-q", "--allow-empty", "-m", "first"]);
    let tree = base.join("tree");
    git(&repo, &["worktree", "add", "-q", tree.to_str().unwrap()]);
    let commit =
        "echo x > f && git add f && git -c user.name=t -c user.email=t@t commit -q -m second";
    assert_eq!(
        run(Some(&confine), &tree, commit),
        0,
        "commit in a worktree"
    );
    // ... and a forged `.git` file (naming a directory that does not link back) allows
    // nothing: a confined run cannot widen the next run's rules.
    let forged = base.join("forged");
    std::fs::create_dir(&forged).unwrap();
    std::fs::write(
        forged.join(".git"),
        format!("gitdir: {}\n", outside.display()),
    )
    .unwrap();
    std::fs::create_dir(outside.join("worktrees")).unwrap();
    let escape = format!(
        "if echo x 2>/dev/null > {}/no; then exit 1; fi",
        outside.display()
    );
    assert_eq!(
        run(Some(&confine), &forged, &escape),
        0,
        "a forged gitdir was allowed"
    );
    // Nor one naming the genuine worktree's git directory from another directory.
    let gitdir = read(&tree.join(".git"));
    std::fs::write(forged.join(".git"), format!("{gitdir}\n")).unwrap();
    let gitdir = PathBuf::from(gitdir.trim_start_matches("gitdir: "));
    let escape = format!(
        "if echo x 2>/dev/null > {}/no; then exit 1; fi",
        gitdir.display()
    );
    assert_eq!(
        run(Some(&confine), &forged, &escape),
        0,
        "another worktree's gitdir was allowed"
    );
    println!("landlock: git worktree directories allowed only when they link back");

    // Scoped signals (ABI 6): a process outside the domain cannot be signalled.
    if abi >= landlock::SCOPE_ABI {
        let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
        let script = format!(
            "if kill -TERM {} 2> err; then exit 1; fi; grep -q 'not permitted' err",
            sleeper.id()
        );
        let code = run(Some(&confine), &work, &script);
        let alive = sleeper.try_wait().unwrap().is_none();
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert!(
            alive,
            "the confined run killed a process outside its domain"
        );
        assert_eq!(
            code,
            0,
            "kill was not refused with EPERM: {}",
            read(&work.join("err"))
        );
        // Unconfined, it can (the test can fail).
        let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
        assert_eq!(run(None, &work, &format!("kill -TERM {}", sleeper.id())), 0);
        let _ = sleeper.wait();
        println!("landlock: signals scoped");
    }
    std::fs::remove_dir_all(&base).unwrap();
}
