#!/usr/bin/env bash
# A throwaway `stoa serve` for bench-render.mjs (as root, loopback only):
#
#   tests/browser/bench-server.sh start   # builds release binaries, prints URL and TOKEN
#   node tests/browser/bench-render.mjs "$URL" "$TOKEN"
#   tests/browser/bench-server.sh stop    # stops it, removes its users and directory
#
# It uses its own names (user stoa-wb-u in group stoa-wb-users, service user stoa-wb-svc,
# /run/stoa-webbench) so that the integration tests, which kill the stoa-t-* users'
# processes, leave it alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=/run/stoa-webbench
user=stoa-wb-u
group=stoa-wb-users
svc=stoa-wb-svc

stop() {
  if [ -f "$dir/pid" ]; then
    pid=$(cat "$dir/pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  for u in "$user" "$svc"; do
    pkill -KILL -u "$u" 2>/dev/null || true
  done
  sleep 0.2
  for u in "$user" "$svc"; do
    userdel --remove "$u" 2>/dev/null || true
  done
  groupdel "$group" 2>/dev/null || true
  rm -rf "$dir"
}

case "${1:-}" in
start)
  stop
  cargo build --release --locked -p stoa -p stoa-executor >&2
  getent group "$group" >/dev/null || groupadd "$group"
  useradd --create-home --shell /bin/sh --groups "$group" --key UID_MIN=2000 "$user"
  mkdir -p "$dir/bin"
  chmod 0755 "$dir"
  install -m 0755 target/release/stoa target/release/stoa-executor "$dir/bin/"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat >"$dir/broker.toml" <<EOF
executor_path = "$dir/bin/stoa-executor"
state_dir = "$dir/broker"
service_user = "$svc"
allow_groups = ["$group"]
min_uid = 1000
EOF
  cat >"$dir/config.toml" <<EOF
listen = "127.0.0.1:$port"
state_dir = "$dir/daemon"
EOF
  STOA_LOG=info NO_COLOR=1 HOME="$dir" setsid "$dir/bin/stoa" serve \
    --broker-config "$dir/broker.toml" --config "$dir/config.toml" \
    </dev/null >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
  for _ in $(seq 200); do
    curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.1
  done
  token=$(STOA_BROKER_CONFIG="$dir/broker.toml" "$dir/bin/stoa" user add bench --unix-user "$user")
  echo "URL=http://127.0.0.1:$port/"
  echo "TOKEN=$token"
  ;;
stop)
  stop
  ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
