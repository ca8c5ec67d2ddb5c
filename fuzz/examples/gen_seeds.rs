//! Writes the seed corpora: `fuzz/corpus/<target>/seed-<name>` (real frames, see
//! `stoa_fuzz::seeds`). Run from fuzz/: `cargo run --example gen_seeds`. libFuzzer's own
//! additions to those directories are ignored by git; only `seed-*` and `regression-*`
//! files are kept.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in [
        ("frame_decoder", stoa_fuzz::seeds::frame_decoder()),
        ("broker_requests", stoa_fuzz::seeds::broker_requests()),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            // A name that says what it is keeps its prefix; the rest are seeds.
            let file = if name.starts_with("regression-") {
                name.to_string()
            } else {
                format!("seed-{name}")
            };
            let path = dir.join(file);
            std::fs::write(&path, &bytes)?;
            println!("{} ({} bytes)", path.display(), bytes.len());
        }
    }
    Ok(())
}
