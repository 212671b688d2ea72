#!/usr/bin/env bash
# Installs everything into ./.venv: CPU torch (no CUDA download), the trainers, the core, both
# adapters, every method plugin under plugins/ and the third-party example plugin. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0            # the CPU build; installed first so nothing pulls a CUDA build
"${PIP[@]}" -r requirements.txt
targets=(-e . )
for d in adapters/*/ plugins/*/ examples/grpo-plugin-*/; do
  [ -f "$d/pyproject.toml" ] && targets+=(-e "$d")
done
"${PIP[@]}" "${targets[@]}"    # each distribution with its own dependencies
