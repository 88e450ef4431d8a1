#!/usr/bin/env bash
# The devices' CPU in CI: cross-builds starling-client for aarch64-unknown-linux-gnu (Debian's
# gcc-aarch64-linux-gnu links it), checks it with clippy for that target, reports its stripped size
# (at most 25 MB), and runs the model crate's kernel and inference tests under qemu-aarch64 (every NEON
# kernel against the portable one; greedy text identical to the x86-64 build's, which the same tests
# pin). Release profile throughout, so the tests and the binary share one build of the dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null
fi
rustup target add "$target" >/dev/null
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
start=$(date +%s)
cargo build --release --locked -p starling-client --target "$target"
bin="target/$target/release/starling-client"
aarch64-linux-gnu-strip -o "target/$target/release/starling-client.stripped" "$bin"
size=$(stat -c %s "target/$target/release/starling-client.stripped")
echo "{\"aarch64_client_stripped_bytes\":$size,\"limit\":26214400}"
[ "$size" -le 26214400 ] || { echo "the stripped aarch64 client is over 25 MB" >&2; exit 1; }
# Every kernel against the portable one, and the inference tests, on emulated aarch64 (NEON).
cargo test --release --locked -p starling-model --target "$target" --lib --test infer
cargo clippy --release --locked -p starling-client -p starling-model --target "$target" --all-targets -- -D warnings
echo "{\"aarch64_step_seconds\":$(( $(date +%s) - start ))}"
