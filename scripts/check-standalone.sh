#!/usr/bin/env bash
# The README's quick start, literally, in a clone with nothing beside it (no ../shared):
# run by .ci/run as root. It clones the committed tree into a root-owned directory of its
# own, runs `cargo run --release -- serve` there (its own target dir), checks that the API,
# the built-in web page and its xterm.js answer on 127.0.0.1:7433, stops it, builds and runs
# the unit tests (`cargo test --workspace --lib --bins`; the integration tests run once,
# in the checkout), and removes the clone and whatever the server created that was not
# there before (the service user `stoa`, /var/lib/stoa*).
#
#   scripts/check-standalone.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "check-standalone: run as root (the quick start runs as root)" >&2; exit 2; }
command -v git >/dev/null || { echo "check-standalone: git is missing" >&2; exit 2; }
command -v curl >/dev/null || { echo "check-standalone: curl is missing" >&2; exit 2; }
if (exec 3<>/dev/tcp/127.0.0.1/7433) 2>/dev/null; then
	echo "check-standalone: 127.0.0.1:7433 is already in use; stop what listens there" >&2
	exit 2
fi

mkdir -p /opt
base=$(mktemp -d /opt/stoa-alone.XXXXXX)
chmod 0755 "$base"
clone=$base/stoa
had_user=no; id stoa >/dev/null 2>&1 && had_user=yes
had_dirs=()
for d in /var/lib/stoa /var/lib/stoa-broker /var/lib/stoa-workers /run/stoa; do
	[ -e "$d" ] && had_dirs+=("$d")
done
server=
check_user=stoa-alone-check
had_group=no; getent group stoa-users >/dev/null && had_group=yes
cleanup() {
	if [ -n "$server" ]; then
		kill -TERM -- "-$server" 2>/dev/null || true
		for _ in $(seq 1 100); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
		kill -KILL -- "-$server" 2>/dev/null || true
	fi
	rm -rf "$base"
	for d in /var/lib/stoa /var/lib/stoa-broker /var/lib/stoa-workers /run/stoa; do
		# shellcheck disable=SC2076 # a literal match
		[[ " ${had_dirs[*]-} " =~ " $d " ]] || rm -rf "$d"
	done
	if id "$check_user" >/dev/null 2>&1; then
		# Its store, where the workers' directory was there before.
		rm -rf "/var/lib/stoa-workers/$(id -u "$check_user")"
		pkill -KILL -u "$check_user" 2>/dev/null || true
		userdel --remove "$check_user" 2>/dev/null || true
	fi
	[ $had_group = yes ] || groupdel stoa-users 2>/dev/null || true
	if [ $had_user = no ] && id stoa >/dev/null 2>&1; then
		pkill -KILL -u stoa 2>/dev/null || true
		userdel stoa 2>/dev/null || true
	fi
}
trap cleanup EXIT

[ $had_group = yes ] || groupadd stoa-users
id "$check_user" >/dev/null 2>&1 && userdel --remove "$check_user"
useradd --create-home --shell /bin/sh --groups stoa-users "$check_user"
git clone -q "$repo" "$clone"
[ "$(ls -A "$base")" = stoa ] || { echo "check-standalone: $base holds more than the clone" >&2; exit 1; }
cd "$clone"
echo "check-standalone: cloned $(git log -1 --format="%h %s" | cut -c1-70)"
unset CARGO_TARGET_DIR
echo "check-standalone: cargo run --release -- serve in $clone (nothing beside it)"
setsid cargo run --release -- serve >"$base/serve.log" 2>&1 </dev/null &
server=$!
status() { curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:7433$1" 2>/dev/null || true; }
deadline=$((SECONDS + 1200)) # the first release build is most of it
until [ "$(status /health)" = 200 ]; do
	if ! kill -0 "$server" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
		tail -n 40 "$base/serve.log" >&2
		echo "check-standalone: \`cargo run --release -- serve\` did not answer /health on 127.0.0.1:7433" >&2
		exit 1
	fi
	sleep 0.5
done
fail() { tail -n 40 "$base/serve.log" >&2; echo "check-standalone: $*" >&2; exit 1; }
curl -fsS http://127.0.0.1:7433/ | grep -q '/static/vendor/xterm/xterm.js' ||
	fail "GET / is not the built-in page"
[ "$(status /static/vendor/xterm/xterm.js)" = 200 ] || fail "GET /static/vendor/xterm/xterm.js is not 200"
[ "$(status /static/app.js)" = 200 ] || fail "GET /static/app.js is not 200"
# The API, with the admin token it made: a command run as a user of the default policy
# (group stoa-users) through the executor, which is stoa itself here (`cargo run` builds no
# stoa-executor).
token=$(cat /var/lib/stoa-broker/admin.token)
out=$(curl -sS -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
	-d "{\"unix_user\":\"$check_user\",\"argv\":[\"id\",\"-un\"]}" http://127.0.0.1:7433/exec || true)
case $out in
	*'"exit_code":0'*"$check_user"*|*"$check_user"*'"exit_code":0'*) ;;
	*) fail "POST /exec as $check_user: $out" ;;
esac
grep -q '"front ready"\|front ready' "$base/serve.log" || fail "the front never said it was ready"
kill -TERM -- "-$server"
for _ in $(seq 1 300); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
kill -0 "$server" 2>/dev/null && fail "stoa serve did not stop within 30 s of SIGTERM"
server=
# Only the C library: any other shared library would have needed its -dev package to link.
extra=$(ldd target/release/stoa | awk '{print $1}' |
	grep -Ev '^(linux-vdso\.so|libc\.so|libm\.so|libgcc_s\.so|/lib64/ld-linux|libpthread\.so|libdl\.so|librt\.so)' || true)
[ -z "$extra" ] || fail "stoa links $(echo "$extra" | tr '\n' ' '): a fresh machine would need their -dev packages"
echo "check-standalone: serve answered (/health, /, xterm.js, /exec); now the unit tests"
cargo test --workspace --lib --bins
echo "check-standalone: ok"
