#!/usr/bin/env bash
# Fuzzes every cargo-fuzz target in fuzz/ for SECONDS each (default 120), one after the
# other, and prints how many inputs each one ran. Exits non-zero if any target crashed,
# failed an assertion, timed out, ran out of memory or did not run.
#
#   fuzz/run.sh [SECONDS]
#
# cargo-fuzz passes nightly-only flags to rustc (-Zsanitizer=address, sanitizer coverage);
# RUSTC_BOOTSTRAP=1 lets a stable rustc accept them. cargo-fuzz is installed if missing.
# Inputs that find new coverage are added to fuzz/corpus/<target>/ (git keeps only the
# seed-* and regression-* files there); a failing input is written to
# fuzz/artifacts/<target>/ and the target's log is in fuzz/artifacts/logs/.
set -euo pipefail

secs="${1:-120}"
case "$secs" in
  '' | *[!0-9]*)
    echo "usage: fuzz/run.sh [SECONDS]" >&2
    exit 2
    ;;
esac

fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
cd "$fuzz_dir/.."
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# -a: debug assertions (overflow checks) on, as in the tests.
cargo fuzz build -a

mapfile -t targets < <(cargo fuzz list)
if [ ${#targets[@]} -eq 0 ]; then
  echo "fuzz: no targets found" >&2
  exit 1
fi

logs="$fuzz_dir/artifacts/logs"
mkdir -p "$logs"
failed=()
summary=()
for t in "${targets[@]}"; do
  corpus="$fuzz_dir/corpus/$t"
  mkdir -p "$corpus"
  args=(
    -max_total_time="$secs"
    -rss_limit_mb=2048
    -print_final_stats=1
    -max_len=8192
    -timeout=30
  )
  [ -f "$fuzz_dir/dicts/$t.dict" ] && args+=(-dict="$fuzz_dir/dicts/$t.dict")
  log="$logs/$t.log"
  echo "fuzz: $t for ${secs}s (log: $log)"
  start=$(date +%s)
  rc=0
  cargo fuzz run -a "$t" "$corpus" -- "${args[@]}" >"$log" 2>&1 || rc=$?
  took=$(($(date +%s) - start))
  execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
  line="$t: ${execs:-?} executions in ${took}s"
  if [ "$rc" -ne 0 ] || [ -z "$execs" ]; then
    line="$line: FAILED (exit $rc)"
    failed+=("$t")
    echo "---- $t: what failed ----" >&2
    grep -E -A 4 "panicked at|^==[0-9]+==ERROR|^SUMMARY" "$log" >&2 || true
    echo "---- $t: end of log ----" >&2
    tail -n 40 "$log" >&2
    echo "---- $t: failing inputs ----" >&2
    ls -l "$fuzz_dir/artifacts/$t" >&2 2>/dev/null || true
  fi
  echo "fuzz: $line"
  summary+=("$line")
done

echo "fuzz: summary"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run -a <target> fuzz/artifacts/<target>/<file>)" >&2
  exit 1
fi
