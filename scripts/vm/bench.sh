#!/usr/bin/env bash
# `cargo bench --bench spawn` in the cgroup v2 test VM: the release binaries of this tree,
# and optionally those of another (a directory with stoa and stoa-executor, e.g. the tree
# before a change), each in its own run in the same boot. TCG figures: compare ratios to
# the raw fork+exec reference of the same run, never absolute times.
#   scripts/vm/bench.sh [OTHER_DIST_DIR]
#   STOA_BENCH_ITERS (default 300), STOA_BENCH_WARMUP (default 30)
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/build-release.sh >&2
dist=$PWD/target/dist-vm-bench
rm -rf "$dist" && mkdir -p "$dist" && cp target/dist/stoa target/dist/stoa-executor "$dist/"
bench=$(cargo bench --bench spawn --no-run --message-format=json |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "spawn":
        print(m["executable"])' | tail -n 1)
other=${1:-}
script=$(mktemp "$PWD/target/vm-bench.XXXXXX.sh")
trap 'rm -f "$script"' EXIT
cat >"$script" <<SH
#!/bin/sh
export STOA_BENCH_ITERS=${STOA_BENCH_ITERS:-300} STOA_BENCH_WARMUP=${STOA_BENCH_WARMUP:-30}
echo "== this tree ($dist)"
STOA_BENCH_DIST=$dist $bench --bench || exit 1
if [ -n "$other" ]; then
  echo "== other ($other)"
  STOA_BENCH_DIST=$other $bench --bench || exit 1
fi
SH
chmod +x "$script"
STOA_VM_TIMEOUT=${STOA_VM_TIMEOUT:-1800} scripts/vm/run-in-vm.sh "$script"
