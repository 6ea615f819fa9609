#!/usr/bin/env bash
# The GPU measurements of issue 5 (and the study's `paper` schedule of issue 4)
# as one prepared script, in phases that each fit one call of the device tool
# (/work/.library/device: 64 MiB carried per call, $OUT brought back).
#
#   benchmarks/gpu_study.sh setup   # carry .whl: installs what the image lacks
#   benchmarks/gpu_study.sh speed   # images/s, train and eval, several batch sizes
#   benchmarks/gpu_study.sh fer     # carry .gpu/shared/fer2013.zip: 50 FER epochs
#   benchmarks/gpu_study.sh age     # carry .gpu/tfds/utk_face: the age stages
#
# Phases after `setup` reuse what earlier ones left on the same (warm) machine:
# /tmp/site (the wheels) and runs/gpu/fer (the FER checkpoint). Staging on the
# CPU machine, and the exact device calls: docs/PERFORMANCE.md, "GPU runs".
# Outputs go to $OUT (default outputs/gpu): logs, timings as JSON, and the
# run directories without checkpoints and compiled programs as runs.tar.gz for
# experiments.report.
set -euo pipefail

phase=${1:?usage: benchmarks/gpu_study.sh setup|speed|fer|age}
out=${OUT:-outputs/gpu}
root=${AGEJAX_GPU_ROOT:-runs/gpu}
# The age runs that fit a 15-minute device budget (each is its own process:
# ~1 min of start-up, data and compilation on top of its training).
protocols=${AGEJAX_GPU_PROTOCOLS:-dedup,leaky}
experiments=${AGEJAX_GPU_EXPERIMENTS:-fc1,scratch}
# FER stages (default: fer.cfg's 50 epochs, 40 at Adam 1e-3 and 10 at 1e-4).
fer_stages=${AGEJAX_GPU_FER_STAGES:-}
# Extra run flags, comma-separated, e.g. for a CPU dry run of the phases:
# AGEJAX_GPU_FLAGS=--max_train_examples=256,--stop_after_epoch=1
extra=${AGEJAX_GPU_FLAGS:+,$AGEJAX_GPU_FLAGS}
site=/tmp/site
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Several JAX processes share the GPU (the benchmark's workers): no process
# may take 75 % of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

needs_site() {
  if [[ ! -d $site/tensorflow_datasets ]]; then
    echo "No $site/tensorflow_datasets: this is a fresh machine; run the setup phase first (carry .whl)." >&2
    exit 2
  fi
}

# Runs "$@", appends {"name": ..., "seconds": ...} to $out/timings.jsonl.
timed() {
  local name=$1; shift
  local start=$SECONDS
  "$@"
  printf '{"phase": "%s", "name": "%s", "seconds": %d}\n' "$phase" "$name" $((SECONDS - start)) >>"$out/timings.jsonl"
}

case $phase in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
      python3 -c 'import jax; print(jax.__version__, jax.devices())'; } | tee "$out/device.txt"
    ;;
  speed)
    needs_site
    timed speed python3 -m benchmarks.frameworks \
      --frameworks=agejax-auto,agejax-scan,agejax-bf16,torch \
      --batch_sizes=64,256,1024 --eval_batch_size=1024 \
      --repeats=5 --steps=20 --warmup=3 --scan_batches=32 2>&1 | tee "$out/speed.txt"
    ;;
  fer)
    needs_site
    timed fer python3 -m experiments.run_study --root="$root" --schedule=paper --protocols= \
      --fer_stages="$fer_stages" \
      --extra_flags=--manual_dir=.gpu/shared,--tfds_data_dir=/tmp/tfds$extra 2>&1 | tee "$out/fer.log"
    ;;
  age)
    needs_site
    [[ -d $root/fer/checkpoints ]] || { echo "No $root/fer: run the fer phase on this machine first." >&2; exit 2; }
    timed age python3 -m experiments.run_study --root="$root" --schedule=paper --skip_fer \
      --fer_stages="$fer_stages" \
      --protocols="$protocols" --experiments="$experiments" --leaky_experiments="$experiments" \
      --extra_flags=--tfds_data_dir=.gpu/tfds$extra 2>&1 | tee "$out/age.log"
    tar --exclude=checkpoints --exclude=compilation_cache -czf "$out/runs.tar.gz" "$root"
    ;;
  *)
    echo "Unknown phase $phase; expected setup, speed, fer or age." >&2
    exit 2
    ;;
esac
