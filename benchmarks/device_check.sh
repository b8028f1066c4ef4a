#!/usr/bin/env bash
# One device check on an NVIDIA H100/H200, bf16, about 8 minutes, one results file: the SAM ViT-B
# encoder at 1024 px with each attention path (forward; forward + backward), the OpenCLIP ViT-L/14
# image tower, and the merge train step (ViT-B student, ViT-L/14 teacher).
#
#   bash benchmarks/device_check.sh --fetch-wheels   # here, once: what the GPU image lacks -> .whl/
#   bash benchmarks/device_check.sh [RESULTS_DIR]    # there; RESULTS_DIR defaults to $OUT, else
#                                                    # benchmarks/results
#   TINY=1 PYTHON=.ci-venv/bin/python bash benchmarks/device_check.sh /tmp/dc   # CPU dry run
#
# Through the device tool: run(command="bash benchmarks/device_check.sh", carry=[".whl"],
# timeout_s=540). Each step has its own time limit, so one that hangs or fails leaves the others
# their time; a path that does not compile (cuDNN outside NVIDIA GPUs) is reported and skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

# Imported by the benchmarks, absent from the GPU image (versions as in the CI environment).
WHEELS=(segment-anything==1.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
        ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0)
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  platforms=()
  for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014; do
    platforms+=(--platform "${p}_x86_64")
  done
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
fi

PY=${PYTHON:-python3}
RESULTS_DIR=${1:-${OUT:-benchmarks/results}}
mkdir -p "$RESULTS_DIR"
RESULTS="$RESULTS_DIR/device_check_$(date -u +%Y%m%d_%H%M%S).txt"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
if ! "$PY" -c "import segment_anything, open_clip, ml_collections, grain" 2>/dev/null \
    && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# Sizes: the real ones, or a CPU dry run of the plumbing (TINY=1).
if [[ -n "${TINY:-}" ]]; then
  SAM_FWD=(--size 64 --batch 1 --runs 1) SAM_BWD=(--size 64 --batch 1 --runs 1)
  CLIP=(--batch 1 --runs 1) TRAIN=(--model tiny --clip_batch 2 --sam_batch 1 --steps 1 --warmup 1)
  LIMITS=(300 300 300 300)
else
  SAM_FWD=(--size 1024 --batch 8 --runs 5) SAM_BWD=(--size 1024 --batch 4 --runs 5)
  CLIP=(--batch 8 --runs 3)
  TRAIN=(--model vit_b --clip_batch 64 --sam_batch 4 --masks_per_image 8 --steps 5 --warmup 2)
  LIMITS=(100 140 80 160)  # seconds; 480 in all
fi

step() {  # step LIMIT_S ARGS...: one benchmark under a time limit; its exit status and duration
  local limit=$1 t0=$SECONDS
  shift
  echo "=== $* (limit ${limit} s)"
  timeout -k 10 "$limit" "$PY" "$@" 2>&1
  local rc=$?
  local note=""
  [[ $rc == 124 || $rc == 137 ]] && note=": TIME LIMIT"
  echo "=== exit $rc after $((SECONDS - t0)) s$note"
  echo
}

{
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  echo "device check $(date -u +%FT%TZ); commit $commit"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
      || echo "nvidia-smi: none"
  "$PY" -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'torch', torch.__version__, jax.devices())" 2>&1
  echo
  # SAM encoder: explicit logits + bias ("reference") against the bias folded into q/k channels,
  # through XLA and through cuDNN's fused kernel. Torch's CPU encoder is not timed (GPU vs CPU).
  step "${LIMITS[0]}" benchmarks/sam_encoder.py --model vit_b --dtype bfloat16 --skip_torch \
      --attention reference,xla,cudnn "${SAM_FWD[@]}"
  step "${LIMITS[1]}" benchmarks/sam_encoder.py --model vit_b --dtype bfloat16 --backward \
      --attention reference,cudnn "${SAM_BWD[@]}"
  # CLIP tower (its attention is MultiheadAttention's default); open_clip runs on the CPU beside it.
  step "${LIMITS[2]}" benchmarks/clip_encoder.py --model ViT-L-14 --dtype bfloat16 "${CLIP[@]}"
  # The merge step; its SAM encoder takes Attention's default path (cuDNN on NVIDIA, bf16).
  step "${LIMITS[3]}" benchmarks/train_step.py --dtype bfloat16 --no_project "${TRAIN[@]}"
  echo "total $SECONDS s"
} 2>&1 | tee "$RESULTS"
echo "results: $RESULTS"
