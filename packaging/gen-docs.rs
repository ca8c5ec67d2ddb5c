//! Writes stoa's man pages and shell completions from its clap definition
//! (`stoa::cli::Cli`), for the packages: `cargo run --example gen-docs -- OUT_DIR`.
//!
//! OUT_DIR/man/stoa.1 (+ stoa-SUBCOMMAND.1 for each visible subcommand), and
//! OUT_DIR/completions/{stoa.bash, _stoa, stoa.fish}. packaging/build.sh runs it.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

fn main() {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            eprintln!("usage: gen-docs OUT_DIR");
            std::process::exit(2);
        });
    if let Err(e) = generate(&out) {
        eprintln!("gen-docs: {e}");
        std::process::exit(1);
    }
}

fn generate(out: &Path) -> std::io::Result<()> {
    let man_dir = out.join("man");
    let completions_dir = out.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&completions_dir)?;

    let cmd = stoa::cli::Cli::command()
        .after_long_help(
            "Files: /etc/stoa/broker.toml (the broker's policy), /etc/stoa/config.toml (the \
             daemon), /var/lib/stoa-broker/admin.token (the admin token, root only), \
             /var/lib/stoa (the daemon's state).\n\nstoa runs as the systemd unit \
             stoa.service; `stoa doctor` checks an installation.",
        )
        .version(env!("CARGO_PKG_VERSION"));
    write_man(&cmd, "stoa", &man_dir)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = sub
            .clone()
            .bin_name(format!("stoa {}", sub.get_name()))
            .version(env!("CARGO_PKG_VERSION"));
        write_man(&page, &format!("stoa-{}", sub.get_name()), &man_dir)?;
    }

    for (shell, file) in [
        (Shell::Bash, "stoa.bash"),
        (Shell::Zsh, "_stoa"),
        (Shell::Fish, "stoa.fish"),
    ] {
        let mut cmd = cmd.clone();
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, "stoa", &mut buf);
        std::fs::write(completions_dir.join(file), buf)?;
    }
    Ok(())
}

fn write_man(cmd: &clap::Command, title: &str, dir: &Path) -> std::io::Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(title)
        .date(source_date())
        .source(format!("stoa {}", env!("CARGO_PKG_VERSION")))
        .manual("stoa manual")
        .render(&mut buf)?;
    std::fs::write(dir.join(format!("{title}.1")), buf)
}

/// The page date: `SOURCE_DATE_EPOCH` (reproducible builds) as YYYY-MM-DD, else none.
fn source_date() -> String {
    let Some(secs) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
    else {
        return String::new();
    };
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
