#!/usr/bin/env bash
# The devices' CPU in CI: cross-builds starling-client for aarch64-unknown-linux-gnu (Debian's
# gcc-aarch64-linux-gnu links it), checks its stripped size (at most 25 MB), runs the model crate's kernel
# and inference tests under qemu-aarch64 (every NEON kernel — Q8_0, Q4_0, Q4_1, f32 — against the portable
# one; the native inference path against the burn model and the shipped model's greedy text, which the
# same tests pin on x86-64), with clippy's lints for that target.
#
# One `cargo test --no-run` builds the client binary and both test executables in one feature resolution
# (separate invocations would build the dependencies twice), release profile, warnings denied; the test
# executables then run under qemu directly. The workspace crates compile through clippy-driver
# (RUSTC_WORKSPACE_WRAPPER, what `cargo clippy` itself sets): clippy's lints on the aarch64-only code (the
# NEON kernels) come with that one build, where a separate `cargo clippy` would check every dependency
# again (five minutes on two cores).
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
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-D warnings"
start=$(date +%s)
list=$(mktemp)
# `--test cli` (the client's command-line test) makes cargo build the client binary itself.
RUSTC_WORKSPACE_WRAPPER="$(rustup which clippy-driver)" \
  cargo test --release --locked --target "$target" -p starling-client -p starling-model \
  --lib --test infer --test cli --no-run --message-format=json-render-diagnostics > "$list"
bin="target/$target/release/starling-client"
aarch64-linux-gnu-strip -o "$bin.stripped" "$bin"
size=$(stat -c %s "$bin.stripped")
echo "{\"aarch64_client_stripped_bytes\":$size,\"limit\":26214400}"
[ "$size" -le 26214400 ] || { echo "the stripped aarch64 client is over 25 MB" >&2; exit 1; }
# The model crate's unit tests (kernels) and inference tests, on emulated aarch64 (NEON).
mapfile -t tests < <(python3 - "$list" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test") \
            and m.get("package_id", "").find("starling-model") >= 0 and t.get("name") in ("starling_model", "infer"):
        print(m["executable"])
PY
)
[ "${#tests[@]}" -eq 2 ] || { echo "expected the model crate's lib and infer test executables, found: ${tests[*]}" >&2; exit 1; }
for t in "${tests[@]}"; do
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$t"
done
echo "{\"aarch64_step_seconds\":$(( $(date +%s) - start ))}"
