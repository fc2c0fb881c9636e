#!/usr/bin/env bash
# Issue 8's GPU figures, grouped so that each stage fits one device call (<= 10 min on an H100).
#   here:        bash scripts/gpu_wheels.sh          # once: the wheels that machine lacks, into .whl/
#   device run:  bash benchmarks/gpu_suite.sh train   (carry: [".whl"]; JSONs land in $OUT)
# Stages, in order of what the issue needs most:
#   train   every seed case against the transformers reference (samples/s, MFU, peak memory, loss check)
#   gen     generation at batch 1 and 16: static cache + compiled decoding, then the dynamic cache
#   compile every case again with torch.compile of vlmkit's step
#   levers  flex attention for Gemma 2 (compiled step); liger's fused cross-entropy; 8-bit AdamW (the
#           seed 000 recipe's optimiser, the memory lever for the <= 0.7x peak goal)
#   mfu     seed 000 full fine-tune alone at batch 12 and 24, and 32 with 8-bit AdamW (MFU >= 45% goal)
#   prefix  seed 000 with merged questions (turns_per_image) vs one question per row
#   goals   the issue's goals against the JSONs of this call's $OUT (goals.py -> goals.json); across
#           calls, run `python benchmarks/goals.py FOLDER` here on the fetched files
# Stages write 1 (train, compile), 2 (gen, prefix) or 3 (levers, mfu) JSONs; a device call brings
# back at most 8 files, so group stages within that.
# TINY=1 runs every command with --tiny on the CPU (a check of the command lines, not a measurement).
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1 && [ -z "${TINY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
out=${OUT:-benchmarks/results}
if [ -n "${TINY:-}" ]; then
  common=(--tiny) compile=() flex=eager short=(--steps 1 --warmup 1 --memory-steps 1) gen=(--reps 1 --warmup 1)
  prefix=(--rounds 1 --steps 2)
else
  common=() compile=(--compile) flex=flex_attention short=() gen=() prefix=(--rounds 3 --steps 10)
fi
failed=0

bench() {  # bench NAME SCRIPT ARGS...: one JSON per command, named NAME.json
  local name=$1 script=$2
  shift 2
  echo "== $name: $script $*"
  "$py" "benchmarks/$script" "${common[@]}" "$@" --out "$out/$name.json" 2>&1 | grep -v -i warn | tail -n 12
  [ "${PIPESTATUS[0]}" = 0 ] || failed=1
}

nvidia-smi -L 2>/dev/null
for stage in "$@"; do
  case $stage in
  train) bench train_speed_h100 train_speed.py "${short[@]}" ;;
  gen)
    bench gen_speed_h100 gen_speed.py "${gen[@]}"
    bench gen_speed_h100_dynamic gen_speed.py --cache dynamic "${gen[@]}"
    ;;
  compile) bench train_speed_h100_compile train_speed.py "${compile[@]}" "${short[@]}" ;;
  levers)
    bench train_speed_h100_seed000_flex train_speed.py --cases seed000_full,seed000_projector \
      --attention "$flex" "${compile[@]}" "${short[@]}"
    bench train_speed_h100_fused_ce train_speed.py --cases seed000_full,seed002_lora --fused-ce "${short[@]}"
    bench train_speed_h100_seed000_8bit train_speed.py --cases seed000_full --optim adamw_bnb_8bit "${short[@]}"
    ;;
  mfu)
    for b in 12 24; do
      bench "train_speed_h100_seed000_b$b" train_speed.py --cases seed000_full --vlmkit-only --batch "$b" \
        --attention "$flex" "${compile[@]}" "${short[@]}"
    done
    bench train_speed_h100_seed000_b32_8bit train_speed.py --cases seed000_full --vlmkit-only --batch 32 \
      --attention "$flex" --optim adamw_bnb_8bit "${compile[@]}" "${short[@]}"
    ;;
  prefix)
    bench shared_prefix_h100_seed000 shared_prefix_speed.py --cases seed000 --questions 16 "${prefix[@]}"
    bench shared_prefix_h100_seed000_flex shared_prefix_speed.py --cases seed000 --questions 16 \
      --attention "$flex" "${prefix[@]}"
    ;;
  goals) "$py" benchmarks/goals.py "$out" || failed=1 ;;
  *)
    echo "unknown stage $stage (train, gen, compile, levers, mfu, prefix, goals)" >&2
    exit 2
    ;;
  esac
done
exit $failed
