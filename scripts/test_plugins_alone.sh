#!/usr/bin/env bash
# Each method plugin's unit tests in an environment with only torch, pluggy, PyYAML, pytest, the core and
# that one plugin (+ its `test` extra): no trainer, no transformers, no numpy, no other plugin.
#
# Uses ./.venv-core (created once, reused). The core is installed once; then for each plugin: install it
# editable with its `test` extra (from what is already installed; the package index is asked only when
# the extra needs something new), run plugins/<name>/tests, and uninstall every distribution that
# install added, so the next plugin starts from the same environment. Prints one line per plugin, then a
# closing count and the time taken; full logs in /tmp/plugins-alone-<name>.log.
#
#   bash scripts/test_plugins_alone.sh              # every plugin
#   ONLY="gdpo spo" bash scripts/test_plugins_alone.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-core
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation)
start=$SECONDS
if [ ! -x "$PY" ]; then
  "$PYTHON" -m venv "$VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools
  "$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0 "pluggy>=1.5" "pyyaml>=6" "pytest>=8"
fi
core=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)  # reinstall the core only when its pyproject changed
if [ "$(cat "$VENV/.core-installed" 2>/dev/null)" != "$core" ]; then
  "${PIP[@]}" --no-deps -e . > /tmp/plugins-alone-core.log 2>&1 || { cat /tmp/plugins-alone-core.log; exit 1; }
  echo "$core" > "$VENV/.core-installed"
fi

installed() {  # the installed distributions, one normalised name a line, sorted
  "$PY" -c 'import importlib.metadata as m, re
print("\n".join(sorted({re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in m.distributions()})))'
}
leftovers=$(installed | grep '^grpo-plugin-' || true)  # from an interrupted run
[ -z "$leftovers" ] || "$PY" -m pip uninstall --quiet --yes $leftovers
baseline=$(installed)

passed=0; failed=0; failures=()
for dir in plugins/*/; do
  dir=${dir%/}
  name=$(basename "$dir")
  [ -d "$dir/tests" ] || continue
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  log=/tmp/plugins-alone-$name.log
  ok=1
  if ! "${PIP[@]}" --no-index -e "$dir[test]" > "$log" 2>&1; then
    "${PIP[@]}" -e "$dir[test]" >> "$log" 2>&1 || ok=0
  fi
  rc=1
  if [ "$ok" = 1 ]; then
    OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider --import-mode=importlib \
      -c /dev/null --rootdir "$dir" "$dir/tests" >> "$log" 2>&1 && rc=0 || rc=$?
  fi
  if [ "$rc" = 0 ]; then
    passed=$((passed + 1)); echo "plugin $name alone: $(tail -1 "$log")"
  elif [ "$rc" = 5 ]; then  # a method plugin without unit tests fails too
    failed=$((failed + 1)); failures+=("$name"); echo "plugin $name alone: FAILED (no tests collected in $dir/tests)"
  else
    failed=$((failed + 1)); failures+=("$name"); echo "plugin $name alone: FAILED"; tail -30 "$log"
  fi
  added=$(comm -13 <(echo "$baseline") <(installed))
  [ -z "$added" ] || "$PY" -m pip uninstall --quiet --yes $added
done
echo "plugins alone: $passed passed, $failed failed in $((SECONDS - start)) s"
[ "$failed" -eq 0 ] || { echo "failing plugins: ${failures[*]}"; exit 1; }
