#!/usr/bin/env bash
# Builds and stages everything scripts/gpu-check.sh needs on a GPU machine that has a CUDA driver
# and toolkit but no Rust, into .gpu/ (git-ignored; the device tool carries it):
#   .gpu/bin/trainer-agent, .gpu/bin/auditor      release builds with `--features cuda`, stripped
#   .gpu/bin/kernels-unit, .gpu/bin/kernels-parity the kernels' test binaries (release, cuda)
#   .gpu/data/mnist/, .gpu/data/shakespeare.txt    the datasets (../shared/data does not travel)
#   .gpu/records/mnist-cpu-here{,-fault}/          MNIST MLP records trained here on `cpu`
#                                                  (honest, and perturb-weight@37), with their
#                                                  trainer summaries, for the GPU to audit
#   .gpu/MANIFEST                                  commit, build flags and sizes
# The carried folder plus the tracked files must stay under the device tool's 64 MiB.
#
# Usage: scripts/gpu-prepare.sh [DATA_DIR]   (DATA_DIR default: ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."

data="${1:-../shared/data}"
stage=.gpu
limit_bytes=$((60 * 1024 * 1024))
for f in "$data/mnist/t10k-images-idx3-ubyte.gz" "$data/mnist/t10k-labels-idx1-ubyte.gz" "$data/shakespeare.txt"; do
  [ -f "$f" ] || { echo "gpu-prepare: missing $f (give the data folder as the first argument)" >&2; exit 1; }
done

echo "== release binaries with the cuda feature"
cargo build --release --locked --features cuda -p tiebreak-trainer-agent -p tiebreak-auditor

echo "== the kernels' test binaries with the cuda feature"
artifacts="$(mktemp)"
trap 'rm -f "$artifacts"' EXIT
cargo test --release --locked --features cuda -p tiebreak-kernels --no-run --message-format=json >"$artifacts"
# One executable per test target: the library's unit tests and tests/parity.rs.
tests="$(python3 - "$artifacts" <<'PY'
import json, sys
found = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        t = m["target"]
        if t["name"] == "kernels" and "lib" in t["kind"]:
            found["kernels-unit"] = m["executable"]
        elif t["name"] == "parity" and "test" in t["kind"]:
            found["kernels-parity"] = m["executable"]
if sorted(found) != ["kernels-parity", "kernels-unit"]:
    sys.exit(f"gpu-prepare: test executables not found in cargo's output: {found}")
for name, path in sorted(found.items()):
    print(name, path)
PY
)"

echo "== staging into $stage/"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/data/mnist"
release="${CARGO_TARGET_DIR:-target}/release"
strip -o "$stage/bin/trainer-agent" "$release/trainer-agent"
strip -o "$stage/bin/auditor" "$release/auditor"
while read -r name path; do
  strip -o "$stage/bin/$name" "$path"
done <<<"$tests"
cp "$data/mnist/t10k-images-idx3-ubyte.gz" "$data/mnist/t10k-labels-idx1-ubyte.gz" "$stage/data/mnist/"
cp "$data/shakespeare.txt" "$stage/data/"

echo "== MNIST MLP records trained here on cpu, for the GPU to audit"
mkdir -p "$stage/records"
for fault in "" perturb-weight@37; do
  name=mnist-cpu-here${fault:+-fault}
  "$release/trainer-agent" train --config configs/mnist-mlp.toml --data "$stage/data/mnist" --device cpu --json \
    --out "$stage/records/$name" ${fault:+--fault "$fault"} >"$stage/records/$name.train.json"
  cat "$stage/records/$name.train.json"
done

staged=$(du -sb "$stage" | cut -f1)
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
{
  echo "commit   $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
  echo "built    $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(ldd --version | head -1)"
  echo "features cuda (cudarc 0.19.10, cuda-12060 bindings, dynamic loading)"
  echo "staged   $staged bytes; tracked files $tracked bytes"
  (cd "$stage" && find . -path ./records -prune -o -type f -printf '%10s %p\n' | sort -k2)
  (cd "$stage" && du -sb records/* | sort -k2)
} >"$stage/MANIFEST"
cat "$stage/MANIFEST"
if [ $((staged + tracked)) -gt "$limit_bytes" ]; then
  echo "gpu-prepare: $((staged + tracked)) bytes exceed the ${limit_bytes}-byte budget for the device tool" >&2
  exit 1
fi
echo "gpu-prepare: ready; on the GPU machine run scripts/gpu-check.sh (carry .gpu)"
