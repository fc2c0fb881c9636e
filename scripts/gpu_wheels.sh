#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks into .whl/ (ignored by git), for benchmarks/gpu_suite.sh.
# That machine (docs/performance.md, "Taking the GPU figures") has Python 3.12, torch, transformers,
# peft, accelerate and triton but no internet: vlmkit's other needs travel as wheels (~51 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
wheels=(
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  easy-vqa==1.0                # the shared-prefix benchmark's questions
  liger-kernel==0.8.5          # model.speed.fused_cross_entropy (needs triton, which is there)
  bitsandbytes==0.50.2         # the QLoRA case and optim: adamw_bnb_8bit
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${wheels[@]}"
du -sh "$dest"
