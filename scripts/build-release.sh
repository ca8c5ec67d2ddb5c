#!/usr/bin/env bash
# The release binaries as shipped, in target/dist/:
#  - stoa: linked dynamically (the broker resolves users through NSS, which needs the
#    system's shared libc and its modules);
#  - stoa-executor: linked statically. It is started on every spawn, and skipping the
#    dynamic loader saves ~0.28 ms a spawn (BENCHMARKS.md). It makes no NSS calls.
set -euo pipefail
cd "$(dirname "$0")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --locked -p stoa
# An explicit --target keeps RUSTFLAGS off build scripts and out of the normal target dir.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p stoa-executor --target "$host"
mkdir -p target/dist
install -m 0755 target/release/stoa target/dist/stoa
install -m 0755 "target/$host/release/stoa-executor" target/dist/stoa-executor
echo "target/dist/stoa, target/dist/stoa-executor (static)"
