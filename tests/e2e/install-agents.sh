#!/bin/sh
# Installs one of the agent CLIs the end-to-end tests drive (tests/integration/agents_e2e.rs)
# from the npm registry into PREFIX (default /opt/stoa-ci/TOOL), unless that exact version is
# already there. Each is pinned to the version the recorded fixtures (tests/fixtures/agents)
# come from. Used by .ci/run, and by the test itself when the CLI is missing.
#
#   tests/e2e/install-agents.sh TOOL [PREFIX]     -> PREFIX/bin/<the tool's binary>
#   TOOL: claude-code | codex | gemini | opencode
set -eu
TOOL=${1:?usage: install-agents.sh claude-code|codex|gemini|opencode [PREFIX]}
PREFIX=${2:-/opt/stoa-ci/$TOOL}
case "$TOOL" in
  claude-code) PKG=@anthropic-ai/claude-code VERSION=2.1.197 BIN=claude ;;
  codex) PKG=@openai/codex VERSION=0.169.0 BIN=codex ;;
  gemini) PKG=@google/gemini-cli VERSION=0.61.0 BIN=gemini ;;
  opencode) PKG=opencode-ai VERSION=1.18.33 BIN=opencode ;;
  *) echo "install-agents: unknown tool '$TOOL' (claude-code, codex, gemini, opencode)" >&2; exit 2 ;;
esac
bin="$PREFIX/bin/$BIN"
pkg="$PREFIX/lib/node_modules/$PKG"

# The version as a whole word of `--version` ("2.1.197 (Claude Code)", "codex-cli 0.169.0").
has_version() {
  v=$("$bin" --version 2>/dev/null) || return 1
  case " $v " in *" $VERSION "*) return 0 ;; esac
  return 1
}

if [ -x "$bin" ] && has_version; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install-agents: npm not found (apt-get install nodejs npm)" >&2
  exit 1
fi
umask 022
npm install -g --no-fund --no-audit --prefix "$PREFIX" "$PKG@$VERSION" >&2
# Claude Code and OpenCode are wrappers whose postinstall puts the platform's native binary
# in place; npm skips it under ignore-scripts or an allowScripts policy. Do it by hand.
if ! has_version; then
  case "$TOOL" in
    claude-code) node "$pkg/install.cjs" >&2 ;;
    opencode) (cd "$pkg" && node postinstall.mjs) >&2 ;;
  esac
fi
# Agents run as each person's own user: everyone must be able to reach and run the binary.
chmod -R a+rX "$PREFIX"
if has_version; then
  echo "install-agents: $bin is $("$bin" --version 2>&1 | head -n 1)" >&2
else
  echo "install-agents: $bin reports '$("$bin" --version 2>&1 | head -n 1)', wanted $VERSION" >&2
  exit 1
fi
