#!/usr/bin/env bash
# ipu-t5 launcher.
#   ./run.sh [flags]               fine-tune (default: the tiny offline demo); flags go to `ipu-t5 train`
#   ./run.sh train|evaluate|export [flags]
#   ./run.sh test [pytest args]    every test, on today's stack and on the Poplar SDK's stack
# A layout of stages x replicas > 1 (`./run.sh --stages 2 --replicas 2`) runs as that many
# processes: `ipu-t5` starts them under torchrun's elastic agent itself (its flags --nnodes,
# --node-rank, --rdzv-endpoint, --master-addr pass through for clusters), so the exec below
# hands signals straight to the launcher, which forwards them to every rank.
# Creates .venv on first use (and .venv-sdk for the tests); later runs reuse them.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${IPU_T5_VENV:-.venv}"
SDK_VENV="${IPU_T5_SDK_VENV:-.venv-sdk}"
PYTHON="${PYTHON:-python3}"
# The CPU build of torch; an unpinned torch would pull several GB of CUDA libraries.
CPU_TORCH="torch==2.13.0"

say() { printf 'run.sh: %s\n' "$*" >&2; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# A venv is ready once its marker holds the hash of what it was built from.
stamp() { cat setup.py "$@" 2>/dev/null | sha256sum | cut -c1-16; }

ensure_venv() {
  local marker="$VENV/.ipu-t5-ready" want
  want="$(stamp)"
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then return; fi
  say "setting up $VENV (first run, or setup.py changed)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
    if has_gpu || [ -n "${POPLAR_SDK_ENABLED:-}" ]; then
      say "accelerator stack present: keeping the default torch resolution"
    else
      "${pip[@]}" "$CPU_TORCH"
    fi
  fi
  # The test extra is small, so one install serves both the demo and the tests.
  "${pip[@]}" -e ".[test]"
  echo "$want" > "$marker"
}

ensure_sdk_venv() {
  local marker="$SDK_VENV/.ipu-t5-ready" want
  want="$(stamp tests/sdk-stack.txt)"
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then return; fi
  say "setting up $SDK_VENV: the Poplar SDK's torch 2.0.1 and transformers 4.46.3 (a few GB, once)"
  [ -x "$SDK_VENV/bin/python" ] || "$PYTHON" -m venv "$SDK_VENV"
  "$SDK_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/sdk-stack.txt
  "$SDK_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$want" > "$marker"
}

run_tests() {
  ensure_venv
  ensure_sdk_venv
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export IPU_T5_SDK_PYTHON="$PWD/$SDK_VENV/bin/python"
  say "today's stack: $("$VENV/bin/python" -c 'import sys, torch, transformers; print("Python %d.%d, torch %s, transformers %s" % (sys.version_info[:2] + (torch.__version__, transformers.__version__)))')"
  "$VENV/bin/python" -m pytest tests "$@"
  say "the Poplar SDK's stack: $("$SDK_VENV/bin/python" -c 'import sys, torch, transformers; print("Python %d.%d, torch %s, transformers %s" % (sys.version_info[:2] + (torch.__version__, transformers.__version__)))')"
  local rc=0
  "$SDK_VENV/bin/python" -m pytest -m core tests "$@" || rc=$?
  # pytest's 5 means a filter given on the command line matched no core test.
  if [ "$rc" -eq 5 ] && [ "$#" -gt 0 ]; then rc=0; fi
  return "$rc"
}

case "${1:-}" in
  test)
    shift
    run_tests "$@"
    ;;
  train|evaluate|export)
    ensure_venv
    exec "$VENV/bin/python" -m ipu_t5 "$@"
    ;;
  *)
    ensure_venv
    exec "$VENV/bin/python" -m ipu_t5 train "$@"
    ;;
esac
