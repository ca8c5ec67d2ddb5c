#!/bin/sh
# Installs the Claude Code CLI the agents end-to-end test drives (tests/integration/agents_e2e.rs)
# from the npm registry into PREFIX (default /opt/stoa-ci/claude-code), unless that exact
# version is already there. Pinned to the version the fixtures in the shared research were
# recorded with. Used by .ci/run, and by the test itself when the CLI is missing.
#
#   tests/e2e/install-claude-code.sh [PREFIX]     -> PREFIX/bin/claude
set -eu
VERSION=2.1.197
PREFIX=${1:-/opt/stoa-ci/claude-code}
bin="$PREFIX/bin/claude"
pkg="$PREFIX/lib/node_modules/@anthropic-ai/claude-code"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "^$VERSION "; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install-claude-code: npm not found (apt-get install nodejs npm)" >&2
  exit 1
fi
umask 022
npm install -g --no-fund --no-audit --prefix "$PREFIX" "@anthropic-ai/claude-code@$VERSION" >&2
# The package is a wrapper whose postinstall hard-links the platform's native binary over a
# placeholder; npm skips it under ignore-scripts or an allowScripts policy. Do it by hand.
if ! "$bin" --version >/dev/null 2>&1; then
  node "$pkg/install.cjs" >&2
fi
# Agents run as each person's own user: everyone must be able to reach and run the binary.
chmod -R a+rX "$PREFIX"
version=$("$bin" --version)
case "$version" in
  "$VERSION "*) echo "install-claude-code: $bin is $version" >&2 ;;
  *) echo "install-claude-code: $bin reports '$version', wanted $VERSION" >&2; exit 1 ;;
esac
