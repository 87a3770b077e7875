#!/usr/bin/env bash
# The GPU validation of the `cuda` device profile (issue 8), for a machine with an NVIDIA GPU, a
# CUDA driver and toolkit, and no Rust. Runs the binaries that scripts/gpu-prepare.sh staged in
# .gpu/ and writes everything under $OUT (default ./gpu-out):
#   gpu-check.log    the full log          results.jsonl  one JSON object per check
#   summary.md       verdicts and step times, ready for the README
#   reports.tar.gz   the signed audit reports and trainer summaries
#
# Usage: scripts/gpu-check.sh [PHASE...]   (default: env parity mlp here determinism floor gpt)
#   env     the GPU, driver and library paths; fails if the cuda device cannot start
#   parity  the kernels' unit tests (NVRTC on this machine) and the parity/bound-soundness suite,
#           which now includes the CPU-vs-CUDA pairs (TIEBREAK_REQUIRE_GPU=1 makes their absence
#           a failure), the launch-configuration test and the exact optimizer bits
#   mlp     MNIST MLP: train on cpu and audit on cuda, train on cuda and audit on cpu (verdicts
#           consistent, every step replayed, the trainer's root reproduced); perturb-weight@37 on
#           each side caught at step 37
#   here    the MNIST MLP records that gpu-prepare.sh trained on the preparing machine's cpu
#           (honest, and perturb-weight@37), audited on this GPU: consistent, and diverged at 37
#   determinism  the MLP and a short GPT trained on the GPU twice more: the same roots, log
#           sizes and losses every time (and as the mlp/gpt phases' runs, where they ran)
#   floor   cuBLAS FP32 and FP64 GEMM time of one MLP and one GPT step with operands resident
#           on the GPU (kernels' ignored test cuda_step_gemm_floor): the GEMM-bound floor of a
#           plain FP32 step, for comparison with the trainer's step times
#   gpt     the same for the Shakespeare GPT, $GPT_STEPS steps (default 200), with the fault at
#           step $GPT_FAULT_STEP (default 120) trained on the sides in $GPT_FAULT_SIDES (cpu
#           and/or gpu; default cpu, audited on the GPU)
# GPU_CHECK_DEVICE=cpu-seq runs the mlp and gpt phases without a GPU (a dry run of this script).
# Step times go to summary.md: training seconds per step on each device, replay seconds per step.
# Device tool (2,000 characters, 10 minutes a command): as run on the H200 (README), e.g.
#   bash scripts/gpu-check.sh env parity mlp here   then   bash scripts/gpu-check.sh determinism floor gpt graphs
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
tee_pid=$!
G="$PWD/.gpu"
BIN="$G/bin"
WORK="$(mktemp -d /tmp/tiebreak-gpu-check.XXXXXX)"
GPT_STEPS="${GPT_STEPS:-200}"
# The GPU's profile; a dry run on a machine without one can name a CPU profile (cpu-seq).
DEV="${GPU_CHECK_DEVICE:-cuda}"
phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(env parity mlp here determinism floor gpt)
failures=0

log() { printf '\n== %s  [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }
result() { echo "$1" >>"$OUT/results.jsonl"; echo "RESULT $1"; }
fail() { failures=$((failures + 1)); result "{\"check\": \"$1\", \"ok\": false, \"why\": \"$2\"}"; }

[ -x "$BIN/trainer-agent" ] || { echo "gpu-check: $BIN/trainer-agent is missing: run scripts/gpu-prepare.sh and carry .gpu"; exit 2; }
cat "$G/MANIFEST" 2>/dev/null

# cudarc loads libcuda, libnvrtc and libcublas by name (lib*.so, lib*.so.1, lib*.so.12, ...; not
# lib*.so.13): put the toolkit's folders (and any in $CUDA_LIB_DIRS) on the path and, for a
# CUDA 13 toolkit without the unversioned development links, link lib*.so to what is there.
setup_libraries() {
  local links="$WORK/libs" dirs=() d name found
  mkdir -p "$links"
  for d in ${CUDA_LIB_DIRS:-} /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    /usr/local/cuda-*/lib64 /usr/lib/x86_64-linux-gnu; do
    [ -d "$d" ] && dirs+=("$d")
  done
  while IFS= read -r d; do dirs+=("$d"); done < <(python3 - <<'PY' 2>/dev/null
import glob, site, os
for sp in site.getsitepackages():
    for d in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")) + glob.glob(os.path.join(sp, "nvidia", "cu*", "lib"))):
        print(d)
PY
  )
  for name in nvrtc cublas cublasLt; do
    found=""
    for d in "${dirs[@]}"; do
      for f in "$d/lib$name.so" "$d/lib$name.so.12" "$d"/lib$name.so.1[0-9]*; do
        [ -e "$f" ] && { found="$f"; break 2; }
      done
    done
    if [ -n "$found" ]; then
      echo "lib$name: $found"
      case "$found" in *.so | *.so.12) ;; *) ln -sf "$found" "$links/lib$name.so" ;; esac
    else
      echo "lib$name: NOT FOUND under ${dirs[*]}"
    fi
  done
  LD_LIBRARY_PATH="$links:$(IFS=:; echo "${dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
}

phase_env() {
  log "env"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | head -5
  command -v nvcc >/dev/null && nvcc --version | tail -2
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ldd "$BIN/trainer-agent" | grep -E "not found|libc.so" || true
  # The unit test prints the GPU it found ("skipped: a GPU is present (...)") or why there is none.
  if "$BIN/kernels-parity" --exact cuda_without_support_or_driver_is_a_clear_error --nocapture 2>&1 |
    tee "$WORK/env.txt" | grep -q "a GPU is present"; then
    result "{\"check\": \"env\", \"ok\": true, \"gpu\": $(grep -o 'a GPU is present (.*)' "$WORK/env.txt" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')}"
  else
    cat "$WORK/env.txt"
    fail env "the cuda device did not start (see the log)"
  fi
}

phase_parity() {
  log "kernels unit tests (NVRTC on this machine)"
  if TIEBREAK_REQUIRE_NVRTC=1 "$BIN/kernels-unit" --test-threads=1 --nocapture; then
    result '{"check": "kernels-unit", "ok": true}'
  else
    fail kernels-unit "unit tests failed"
  fi
  log "parity and bound soundness, CPU profiles vs cuda"
  local t0=$SECONDS
  if TIEBREAK_REQUIRE_GPU=1 "$BIN/kernels-parity" --test-threads=1 --nocapture; then
    result "{\"check\": \"kernels-parity\", \"ok\": true, \"seconds\": $((SECONDS - t0))}"
  else
    fail kernels-parity "parity tests failed"
  fi
}

# train NAME CONFIG DATA DEVICE STEPS [FAULT]: writes $WORK/NAME and $WORK/NAME.train.json
train() {
  local name=$1 config=$2 data=$3 device=$4 steps=$5 fault=${6:-}
  local args=(train --config "$config" --data "$data" --out "$WORK/$name" --device "$device" --json)
  [ -n "$steps" ] && args+=(--steps "$steps")
  [ -n "$fault" ] && args+=(--fault "$fault")
  echo "+ trainer-agent ${args[*]}"
  "$BIN/trainer-agent" "${args[@]}" >"$WORK/$name.train.json" || { fail "train-$name" "trainer-agent exited $?"; return 1; }
  cat "$WORK/$name.train.json"
}

# audit NAME DATA DEVICE MODE EXPECT [STEP]: audits $WORK/NAME; EXPECT consistent|diverged
audit() {
  local name=$1 data=$2 device=$3 mode=$4 expect=$5 step=${6:-}
  local report="$WORK/$name.audit-$device.json" code
  echo "+ auditor audit --record $WORK/$name --device $device --mode $mode"
  "$BIN/auditor" audit --record "$WORK/$name" --data "$data" --device "$device" --mode "$mode" \
    --key "$WORK/auditor.key" --report "$report" --evidence "$WORK/$name.tbev"
  code=$?
  [ -f "$report" ] || { fail "audit-$name-$device" "auditor exited $code without a report"; return 1; }
  python3 - "$WORK/$name.train.json" "$report" "$name" "$device" "$expect" "$step" <<'PY' >>"$OUT/results.jsonl"
import json, sys
train, rep = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
name, device, expect, step = sys.argv[3:7]
v = rep["verdict"]
n = train["n_steps"]
ok = v["kind"] == expect and rep["trainer_root"] == train["root"]
if expect == "consistent":
    ok = ok and rep["steps_replayed"] == n
else:
    ok = ok and str(v.get("step")) == step
print(json.dumps({
    "check": f"audit {name} on {device}", "ok": ok, "expected": expect if expect == "consistent" else f"{expect} at {step}",
    "verdict": v["kind"], "at_step": v.get("step"), "trainer_device": rep["trainer_device"],
    "trainer_root": train["root"], "report_root": rep["trainer_root"], "steps": n,
    "steps_replayed": rep["steps_replayed"], "train_s_per_step": train["seconds"] / n,
    "replay_s_per_step": rep["timings"]["replay_ms"] / 1000 / max(rep["steps_replayed"], 1),
}))
PY
  tail -1 "$OUT/results.jsonl" | sed 's/^/RESULT /'
  tail -1 "$OUT/results.jsonl" | grep -q '"ok": true' || failures=$((failures + 1))
}

# model NAME CONFIG DATA STEPS FAULT_STEP FAULT_SIDES: trained on cpu and audited on the GPU, and
# the reverse (verdicts consistent); then a perturb-weight fault trained on each side in
# FAULT_SIDES (cpu, gpu) and audited on the other (diverged at that step). Audits on the GPU
# replay in one job (`full`); audits on cpu use every core (`intervals`).
model() {
  local name=$1 config=$2 data=$3 steps=$4 at=$5 sides=$6 side dev other mode
  for side in cpu gpu; do
    [ "$side" = cpu ] && dev=cpu other=$DEV mode=full || dev=$DEV other=cpu mode=intervals
    log "$name: train on $dev, audit on $other"
    train "$name-$dev" "$config" "$data" "$dev" "$steps" && audit "$name-$dev" "$data" "$other" "$mode" consistent
  done
  for side in $sides; do
    [ "$side" = cpu ] && dev=cpu other=$DEV mode=full || dev=$DEV other=cpu mode=intervals
    log "$name: perturb-weight@$at trained on $dev, audited on $other"
    train "$name-$dev-fault" "$config" "$data" "$dev" "$steps" "perturb-weight@$at" &&
      audit "$name-$dev-fault" "$data" "$other" "$mode" diverged "$at"
  done
}

phase_here() {
  local rec
  for rec in mnist-cpu-here mnist-cpu-here-fault; do
    [ -d "$G/records/$rec" ] || { fail "here-$rec" "$G/records/$rec was not staged"; continue; }
    cp -r "$G/records/$rec" "$WORK/$rec"
    cp "$G/records/$rec.train.json" "$WORK/$rec.train.json"
  done
  log "MNIST MLP trained on the preparing machine's cpu, audited on $DEV"
  [ -d "$WORK/mnist-cpu-here" ] && audit mnist-cpu-here "$G/data/mnist" "$DEV" full consistent
  [ -d "$WORK/mnist-cpu-here-fault" ] && audit mnist-cpu-here-fault "$G/data/mnist" "$DEV" full diverged 37
}

# same NAME A.json B.json: the two trainings agree on everything but their timings.
same() {
  python3 - "$@" <<'PY' >>"$OUT/results.jsonl"
import json, sys
name, a, b = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
keys = ["root", "n_steps", "first_loss", "final_loss", "eval_loss", "eval_accuracy", "log_bytes_total"]
diff = [k for k in keys if a.get(k) != b.get(k)]
print(json.dumps({"check": f"determinism {name}", "ok": not diff, "root": a.get("root"), "differs": diff,
                  "log_bytes_total": a.get("log_bytes_total"), "train_s": [a.get("seconds"), b.get("seconds")]}))
PY
  tail -1 "$OUT/results.jsonl" | sed 's/^/RESULT /'
  tail -1 "$OUT/results.jsonl" | grep -q '"ok": true' || failures=$((failures + 1))
}

phase_determinism() {
  local n
  log "determinism: the MLP and a ${DET_GPT_STEPS:-30}-step GPT trained on $DEV twice"
  for n in 1 2; do
    train "det-mlp-$n" configs/mnist-mlp.toml "$G/data/mnist" "$DEV" "" || return
    train "det-gpt-$n" configs/shakespeare-gpt.toml "$G/data/shakespeare.txt" "$DEV" "${DET_GPT_STEPS:-30}" || return
  done
  same mlp-twice "$WORK/det-mlp-1.train.json" "$WORK/det-mlp-2.train.json"
  same gpt-twice "$WORK/det-gpt-1.train.json" "$WORK/det-gpt-2.train.json"
  # The mlp phase's GPU run, when it ran in this invocation, is a third.
  [ -f "$WORK/mnist-mlp-$DEV.train.json" ] && same mlp-thrice "$WORK/det-mlp-1.train.json" "$WORK/mnist-mlp-$DEV.train.json"
}

phase_floor() {
  log "GEMM-bound floor of an FP32 step on this GPU"
  "$BIN/kernels-parity" --ignored --exact cuda_step_gemm_floor --nocapture --test-threads=1 2>&1 | tee "$WORK/floor.txt"
  if grep -q 'GEMM_FLOOR ' "$WORK/floor.txt"; then
    grep -o 'GEMM_FLOOR {.*}' "$WORK/floor.txt" | sed 's/^GEMM_FLOOR //' | python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l); r["check"] = "gemm floor " + r["model"]; r["ok"] = True; print(json.dumps(r))' >>"$OUT/results.jsonl"
  else
    fail floor "cuda_step_gemm_floor printed no timings"
  fi
}

# The convolutional and graph-defined models, short runs: MNIST CNN, the residual CNN with batch
# norm (configs/mnist-resnet.toml) and the graph transformer (configs/shakespeare-graph.toml).
phase_graphs() {
  model mnist-cnn configs/mnist-cnn.toml "$G/data/mnist" 40 25 cpu
  model mnist-resnet configs/mnist-resnet.toml "$G/data/mnist" 20 12 cpu
  model graph-transformer configs/shakespeare-graph.toml "$G/data/shakespeare.txt" 20 12 cpu
}

phase_mlp() { model mnist-mlp configs/mnist-mlp.toml "$G/data/mnist" "" 37 "cpu gpu"; }
phase_gpt() {
  model gpt configs/shakespeare-gpt.toml "$G/data/shakespeare.txt" "$GPT_STEPS" "${GPT_FAULT_STEP:-120}" "${GPT_FAULT_SIDES:-cpu}"
}

summarise() {
  python3 - "$OUT/results.jsonl" <<'PY' >"$OUT/summary.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| check | ok | verdict | steps | trainer s/step (whole run) | replay s/step |")
print("| --- | --- | --- | --- | --- | --- |")
for r in rows:
    if "f32_s" in r:
        print(f"| {r['check']}: {r['gemms']} GEMMs, {r['gflop']} GFLOP | {r['ok']} | FP32 {r['f32_s']*1e3:.3f} ms, "
              f"FP64 {r['f64_s']*1e3:.3f} ms per step (operands on the GPU) | | | |")
    elif "differs" in r:
        print(f"| {r['check']} | {r['ok']} | root {str(r['root'])[:16]}…, differs in {r['differs'] or 'nothing'} | | | |")
    elif "verdict" in r:
        at = f" at {r['at_step']}" if r.get("at_step") is not None else ""
        print(f"| {r['check']} (trained on {r['trainer_device']}) | {r['ok']} | {r['verdict']}{at} | {r['steps']} "
              f"| {r['train_s_per_step']:.4f} | {r['replay_s_per_step']:.4f} |")
    else:
        print(f"| {r['check']} | {r['ok']} | {r.get('why', r.get('gpu', ''))} | | | |")
PY
  cat "$OUT/summary.md"
  tar -czf "$OUT/reports.tar.gz" -C "$WORK" $(cd "$WORK" && ls -- *.json 2>/dev/null) 2>/dev/null || true
}

setup_libraries
for p in "${phases[@]}"; do
  case "$p" in
    env | parity | mlp | here | determinism | floor | gpt | graphs) "phase_$p" ;;
    *) echo "gpu-check: unknown phase $p (env parity mlp here determinism floor gpt graphs)"; exit 2 ;;
  esac
done
summarise
log "done: $failures failed check(s)"
rm -rf "$WORK"
status=0
[ "$failures" -eq 0 ] || status=1
# Let tee write the last lines before the command returns.
exec 1>&- 2>&-
wait "$tee_pid" 2>/dev/null
exit "$status"
