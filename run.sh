#!/usr/bin/env bash
# ipu-t5 launcher.
#   ./run.sh [flags]               fine-tune (default: the tiny offline demo); flags go to `ipu-t5 train`
#   ./run.sh train|evaluate|predict|export|plan|backend [flags]
#   ./run.sh test [pytest args]    every test, on today's stack and on the Poplar SDK's stack
# A layout of stages x replicas > 1 on the torch backend (`./run.sh --stages 2 --replicas 2`) runs as
# that many processes: `ipu-t5` starts them under torchrun's elastic agent itself (its flags
# --nnodes, --node-rank, --rdzv-endpoint, --master-addr pass through for clusters), so the exec
# below hands signals straight to the launcher, which forwards them to every rank. The IPU backend
# is always one process: poptorch drives every IPU.
# Creates .venv on first use (and .venv-sdk for the tests); later runs reuse them. With the Poplar
# SDK enabled (POPLAR_SDK_ENABLED), .venv also gets the SDK's poptorch wheel (and its torch 2.0.1).
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
venv_ready() { [ -f "$1/.ipu-t5-ready" ] && [ "$(cat "$1/.ipu-t5-ready")" = "$2" ]; }
new_venv() { [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"; }
pip_into() { local venv="$1"; shift; "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

# The SDK ships poptorch as a wheel beside its poplar directory, not on PyPI.
ensure_poptorch() {
  [ -n "${POPLAR_SDK_ENABLED:-}" ] || return 0
  if "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("poptorch") is None)'; then
    return 0
  fi
  local wheel
  wheel="$(ls "$POPLAR_SDK_ENABLED"/../poptorch-*.whl 2>/dev/null | head -n 1 || true)"
  if [ -z "$wheel" ]; then
    say "the Poplar SDK is enabled but no poptorch wheel is beside $POPLAR_SDK_ENABLED: pip install <sdk>/poptorch-*.whl into $VENV"
    return 0
  fi
  say "installing the SDK's poptorch into $VENV: $wheel"
  pip_into "$VENV" "$wheel"
}

ensure_venv() {
  local want; want="$(stamp)"
  new_venv "$VENV"
  ensure_poptorch
  venv_ready "$VENV" "$want" && return
  say "setting up $VENV (first run, or setup.py changed)"
  if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
    if has_gpu || [ -n "${POPLAR_SDK_ENABLED:-}" ]; then
      say "accelerator stack present: keeping the default torch resolution"
    else
      pip_into "$VENV" "$CPU_TORCH"
    fi
  fi
  # The test extra is small, so one install serves both the demo and the tests.
  pip_into "$VENV" -e ".[test]"
  echo "$want" > "$VENV/.ipu-t5-ready"
}

ensure_sdk_venv() {
  local want; want="$(stamp tests/sdk-stack.txt)"
  venv_ready "$SDK_VENV" "$want" && return
  say "setting up $SDK_VENV: the Poplar SDK's torch 2.0.1 and transformers 4.46.3 (a few GB, once)"
  new_venv "$SDK_VENV"
  pip_into "$SDK_VENV" -r tests/sdk-stack.txt
  pip_into "$SDK_VENV" --no-deps -e .
  echo "$want" > "$SDK_VENV/.ipu-t5-ready"
}

run_tests() {
  ensure_venv
  ensure_sdk_venv
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  # Each stack's tests reload exports in the other stack too.
  export IPU_T5_SDK_PYTHON="$PWD/$SDK_VENV/bin/python" IPU_T5_MAIN_PYTHON="$PWD/$VENV/bin/python"
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
  train|evaluate|predict|export|plan|backend)
    ensure_venv
    exec "$VENV/bin/python" -m ipu_t5 "$@"
    ;;
  *)
    ensure_venv
    exec "$VENV/bin/python" -m ipu_t5 train "$@"
    ;;
esac
