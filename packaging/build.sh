#!/usr/bin/env bash
# Builds stoa's .deb and .rpm: packaging/build.sh [deb|rpm|all] (default all).
#
# Release binaries go to target/packaging/release (its own target dir, stripped, so a
# packaging build never invalidates anyone's target/release); man pages, completions and
# the Debian changelog to target/packaging/docs (the web page is built into the binary).
# Packages: target/packaging/debian/*.deb and
# target/packaging/generate-rpm/*.rpm. Needs cargo-deb / cargo-generate-rpm
# (cargo install --locked cargo-deb cargo-generate-rpm).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export CARGO_TARGET_DIR="$PWD/target/packaging"
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
docs=target/packaging/docs

cargo build --release --locked --workspace --bins --example gen-docs

# stoa-executor starts on every spawn: ship it statically linked (no dynamic loader, ~0.28
# ms a spawn: BENCHMARKS.md). stoa itself stays dynamic: the broker resolves users through
# NSS. An explicit --target keeps RUSTFLAGS off build scripts (as scripts/build-release.sh).
host=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" \
	cargo build --release --locked -p stoa-executor --target "$host"
install -m 0755 "$CARGO_TARGET_DIR/$host/release/stoa-executor" "$CARGO_TARGET_DIR/release/stoa-executor"

rm -rf "$docs"
"$CARGO_TARGET_DIR/release/examples/gen-docs" "$docs"
gzip -9n "$docs"/man/*.1

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
{
	echo "stoa ($version-1) unstable; urgency=medium"
	echo
	echo "  * Package of stoa $version, built by packaging/build.sh."
	echo "    See README.md and the git history for the changes."
	echo
	echo " -- stoa developers <stoa-maintainers@example.org>  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} > "$docs/changelog"

if [ "$what" = all ] || [ "$what" = deb ]; then
	cargo deb --no-build --strip --locked
fi
if [ "$what" = all ] || [ "$what" = rpm ]; then
	# A release signs it with the project's key; CI has none and makes no fake signature.
	cargo generate-rpm ${STOA_RPM_SIGNING_KEY:+--signing-key "$STOA_RPM_SIGNING_KEY"}
fi
ls -l target/packaging/debian/*.deb target/packaging/generate-rpm/*.rpm 2>/dev/null || true
