#!/usr/bin/env bash
# Installs everything into ./.venv: CPU torch (no CUDA download), the trainers, the core, both
# adapters, every method plugin under plugins/ and the third-party example plugin.
#
# Quiet and idempotent: a hash of this script, requirements.txt and every pyproject.toml is kept in
# .venv/.installed, and nothing is installed when it has not changed (FORCE=1 reinstalls). pip's output
# goes to .venv/install.log and is shown only when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.installed
LOG=.venv/install.log

targets=(-e .)
for d in adapters/*/ plugins/*/ examples/grpo-plugin-*/; do
  [ -f "$d/pyproject.toml" ] && targets+=(-e "${d%/}")
done
inputs=(scripts/install.sh requirements.txt pyproject.toml)
for ((i = 1; i < ${#targets[@]}; i += 2)); do
  [ "${targets[i]}" = . ] || inputs+=("${targets[i]}/pyproject.toml")
done
hash=$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$hash" ] && [ -z "${FORCE:-}" ]; then
  echo "install: up to date (.venv matches every pyproject.toml and requirements.txt; FORCE=1 reinstalls)"
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
: > "$LOG"
step() {  # step DESCRIPTION PIP-ARGS...: run pip quietly, show its output only on failure
  local what=$1
  shift
  echo "install: $what"
  if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-input "$@" >> "$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "install: failed while installing $what (full output above and in $LOG)" >&2
    exit 1
  fi
}
step "pip" --upgrade pip
step "torch 2.13.0 (CPU build)" torch==2.13.0  # first, so that nothing pulls a CUDA build
step "requirements.txt" -r requirements.txt
step "$(( ${#targets[@]} / 2 )) local distributions (editable)" "${targets[@]}"
rm -f "$STAMP"
echo "$hash" > "$STAMP"
echo "install: done"
