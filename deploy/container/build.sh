#!/usr/bin/env bash
# Builds the coordinator image FROM scratch: the binary plus the shared libraries it links (as ldd lists
# them, with the dynamic loader), laid out in a fresh context directory, then `podman build`.
#
#   deploy/container/build.sh [BINARY] [TAG]
#
# BINARY defaults to target/release/starling-coordinator (cargo build --release -p starling-coordinator);
# TAG to starling-coordinator:<crate version>. Needs podman (Debian: apt-get install podman runc).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-$root/target/release/starling-coordinator}"
version="$(grep -m1 '^version' "$root/Cargo.toml" | cut -d'"' -f2)"
tag="${2:-starling-coordinator:$version}"
[ -x "$bin" ] || { echo "no binary at $bin: cargo build --release -p starling-coordinator" >&2; exit 2; }

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/var/lib/starling" "$ctx/rootfs/tmp"
cp "$bin" "$ctx/rootfs/usr/local/bin/starling-coordinator"
strip "$ctx/rootfs/usr/local/bin/starling-coordinator" 2>/dev/null || true
# Every library the binary links, at the path the loader looks for it (the loader itself included).
ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\/[^ ]+ \(/{print $1}' | sort -u | while read -r lib; do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
chmod 1777 "$ctx/rootfs/tmp"
cp "$here/Containerfile" "$ctx/Containerfile"
podman build --quiet -f "$ctx/Containerfile" -t "$tag" "$ctx" >/dev/null
size=$(podman image inspect "$tag" --format '{{.Size}}')
echo "{\"image\":\"$tag\",\"bytes\":$size}"
