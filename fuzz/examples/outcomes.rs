//! Replays `broker_requests` inputs (files or directories, e.g. `corpus/broker_requests`)
//! through the harness without libFuzzer and counts what the real broker answered, to see
//! how far the corpus gets, and how often the known findings happened:
//! `cargo run --example outcomes -- corpus/broker_requests`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use stoa_fuzz::harness::Harness;
use stoa_fuzz::records;

fn main() {
    let mut files: Vec<PathBuf> = Vec::new();
    for arg in std::env::args().skip(1) {
        let p = PathBuf::from(arg);
        match std::fs::read_dir(&p) {
            Ok(dir) => files.extend(dir.flatten().map(|e| e.path())),
            Err(_) => files.push(p),
        }
    }
    files.sort();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut launches = 0;
    for f in &files {
        let Ok(data) = std::fs::read(f) else { continue };
        let Some((seed, recs)) = records::parse(&data) else {
            continue;
        };
        let mut h = Harness::new();
        h.tally = Some(BTreeMap::new());
        h.run(seed, &recs);
        launches += h.launches;
        for (k, n) in h.tally.take().unwrap_or_default() {
            *counts.entry(k).or_default() += n;
        }
    }
    println!("{} inputs, {launches} launches", files.len());
    for (k, n) in counts {
        println!("{n:8}  {k}");
    }
}
