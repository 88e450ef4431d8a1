#!/usr/bin/env bash
# The coordinator image, tested for real: builds it, creates a coordinator directory on the host (the
# volume), runs `serve` in a container, enrols a device through the running container's admin socket
# (`podman exec … enrol`), and has a `starling-client` on the host enrol over QUIC and train one round;
# the container must exit 0 with version 1 published.
#
#   deploy/container/test.sh [COORDINATOR-BINARY] [CLIENT-BINARY]
#
# Defaults: target/release/starling-{coordinator,client}. Needs podman and runc (Debian packages) and root
# or a rootless podman set up. Prints one JSON line with the figures.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
coord_bin="${1:-$root/target/release/starling-coordinator}"
client_bin="${2:-$root/target/release/starling-client}"
tag="starling-coordinator:test"
work="$(mktemp -d)"
name="starling-test-$$"
cleanup() {
  podman rm -f "$name" >/dev/null 2>&1 || true
  [ -n "${client_pid:-}" ] && kill "$client_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

runtime=()
# crun cannot run on hybrid cgroup hosts (this project's machines); runc can.
command -v runc >/dev/null 2>&1 && runtime=(--runtime runc)
started=$(date +%s)
"$here/build.sh" "$coord_bin" "$tag"

state="$work/state"
cat > "$work/coordinator.toml" <<'TOML'
[network]
listen = "127.0.0.1:0"
enrol_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
[rounds]
min_clients = 1
min_updates = 1
rounds = 1
retry_after_ms = 200
[task]
local_steps = 4
batch_size = 4
seq_len = 32
[adapter]
rank = 2
alpha = 4.0
targets = ["q", "v"]
TOML
"$coord_bin" init --dir "$state" --base-model "$root/assets/models/starling-tiny" \
  --config "$work/coordinator.toml" >/dev/null
# The image runs as an unprivileged user: the volume is theirs.
chown -R 65532:65532 "$state"

hard_files=$(ulimit -Hn)
podman "${runtime[@]}" run -d --name "$name" --network host \
  --ulimit "nofile=$hard_files:$hard_files" --ulimit nproc=4096:4096 \
  -v "$state:/var/lib/starling" "$tag" >/dev/null
for _ in $(seq 1 100); do
  [ -s "$state/serve.json" ] && break
  sleep 0.2
done
[ -s "$state/serve.json" ] || { podman logs "$name" >&2; echo "serve did not start" >&2; exit 1; }
field() { sed -E "s/.*\"$1\":\"?([^\",}]*)\"?.*/\1/" "$state/serve.json"; }
addr=$(field listening)
enrol_addr=$(field enrol)
http=$(field http)

# Liveness and readiness as a probe sees them (bash's /dev/tcp: no curl needed).
probe() {
  exec 3<>"/dev/tcp/${http%:*}/${http##*:}"
  printf 'GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' "$1" >&3
  head -1 <&3 | tr -d '\r'
  exec 3<&-
}
healthz=$(probe /healthz)
readyz=$(probe /readyz)
case "$healthz $readyz" in
  *"200 OK"*"200 OK"*) ;;
  *) echo "probes answered: $healthz / $readyz" >&2; exit 1 ;;
esac

# Enrolment through the running container's admin socket, then the device enrols over QUIC.
enrolment=$(podman exec "$name" /usr/local/bin/starling-coordinator enrol \
  --dir /var/lib/starling --name host-device --json)
get() { echo "$enrolment" | sed -E "s/.*\"$1\":\"([^\"]*)\".*/\1/"; }
"$client_bin" enrol --dir "$work/device" --coordinator "$addr" --enrol-address "$enrol_addr" \
  --token "$(get token)" --pin "$(get fingerprint)" --signing-key "$(get signing_key)" \
  --name host-device >/dev/null
mkdir -p "$work/data"
head -c 60000 "$root/assets/shakespeare/hamlet.txt" > "$work/data/hamlet.txt"
"$client_bin" run --dir "$work/device" --data "$work/data" --retry-ms 300 2>"$work/client.log" &
client_pid=$!

code=$(timeout 300 podman wait "$name" || echo timeout)
if [ "$code" != "0" ]; then
  podman logs "$name" >&2 || true
  cat "$work/client.log" >&2
  echo "the container exited with $code" >&2
  exit 1
fi
# The image logs JSON lines (--log-format json; stdout's one line is JSON too): every line is an object.
logs=$(podman logs "$name" 2>&1)
if [ -z "$logs" ] || echo "$logs" | grep -qv '^{'; then
  echo "the container's output is not JSON lines:" >&2
  echo "$logs" | grep -v '^{' | head -3 >&2
  exit 1
fi
kill "$client_pid" 2>/dev/null || true
wait "$client_pid" 2>/dev/null || true
client_pid=""
latest=$("$coord_bin" status --dir "$state" --json | sed -E 's/.*"latest_version":([0-9]+).*/\1/')
[ "$latest" = "1" ] || { echo "latest version $latest, expected 1" >&2; exit 1; }
size=$(podman image inspect "$tag" --format '{{.Size}}')
echo "{\"container_test\":\"passed\",\"image_bytes\":$size,\"latest_version\":$latest,\"seconds\":$(( $(date +%s) - started ))}"
