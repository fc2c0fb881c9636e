#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install vlmkit with everything the tests need, at the
# exact versions of requirements/lock-cpu.txt (what CI last passed with; `make lock` moves it).
# torch comes first so that pip never swaps it: the CPU build where no NVIDIA GPU is present, pip's
# default (CUDA) build where one is; there the lock applies to everything but torch and its CUDA
# packages. Override with TORCH_SPEC / TORCH_INDEX_URL; LOCK=none installs pyproject's ranges instead.
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}
extras=${EXTRAS:-all,dev}
lock=${LOCK:-requirements/lock-cpu.txt}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
constraints=()
if [ "$lock" != none ]; then
  locked_python=3.11
  have_python=$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  if [ "$have_python" != "$locked_python" ]; then
    echo "note: $lock is for Python $locked_python, this is $have_python; installing pyproject's ranges" >&2
  else
    pinned="$venv/.vlmkit-constraints.txt"
    if [ "$gpu" = 1 ]; then
      grep -v -E '^(torch|triton|nvidia-[a-z0-9-]+)==' "$lock" >"$pinned"
    else
      cp "$lock" "$pinned"
    fi
    constraints=(-c "$pinned")
  fi
fi

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if [ "$gpu" = 1 ]; then
    spec=${TORCH_SPEC:-torch}
  else
    spec=${TORCH_SPEC:-$(grep -E '^torch==' requirements/cpu.in)}
  fi
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" install -q "$spec" --index-url "$TORCH_INDEX_URL"
  else
    "${pip[@]}" install -q "$spec"
  fi
fi
"${pip[@]}" install -q "${constraints[@]}" -e ".[${extras}]"
# lmms-eval without its ~60 dependencies (the `lmms` extra holds what vlmkit's use of it imports), so
# the lmms-eval CLI test runs in CI; LMMS_EVAL_SPEC=none skips it.
lmms_spec=${LMMS_EVAL_SPEC:-lmms-eval>=0.7.3,<0.8}
if [ "$lmms_spec" != none ] && [[ ",$extras," == *,dev,* || ",$extras," == *,lmms,* ]]; then
  "${pip[@]}" install -q --no-deps "$lmms_spec"
fi
