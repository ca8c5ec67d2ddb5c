//! Replays `broker_requests` inputs (files or directories, e.g. `corpus/broker_requests`)
//! through the model without libFuzzer and counts what happened, to see how far the corpus
//! gets: `cargo run --example outcomes -- corpus/broker_requests`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use stoa_fuzz::model::{Model, Outcome};
use stoa_fuzz::records;
use stoa_fuzz::stream::reference_frames;

fn main() {
    let mut files: Vec<PathBuf> = Vec::new();
    for arg in std::env::args().skip(1) {
        let p = PathBuf::from(arg);
        match std::fs::read_dir(&p) {
            Ok(dir) => files.extend(dir.flatten().map(|e| e.path())),
            Err(_) => files.push(p),
        }
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for f in &files {
        let Ok(data) = std::fs::read(f) else { continue };
        let Some((_, recs)) = records::parse(&data) else {
            continue;
        };
        let stream = records::stream(&recs);
        let framed = reference_frames(&stream);
        let mut model = Model::new();
        for p in framed.payloads {
            let key = match model.step(p) {
                Outcome::Violation(why) => format!("violation: {}", gist(&why)),
                Outcome::SpawnRefused(why) => format!("spawn refused: {}", gist(&why)),
                other => format!("{other:?}"),
            };
            *counts.entry(key).or_default() += 1;
            if model.dead.is_some() {
                break;
            }
        }
    }
    println!("{} inputs", files.len());
    for (k, n) in counts {
        println!("{n:8}  {k}");
    }
}

/// A reason without its particulars (quoted values, numbers).
fn gist(why: &str) -> String {
    why.split(['"', '{'])
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(48)
        .collect::<String>()
        .trim()
        .to_string()
}
