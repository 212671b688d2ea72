#!/usr/bin/env bash
# Each method plugin's unit tests in an environment with only torch, pluggy, PyYAML, pytest, the core and
# that one plugin (+ its `test` extra): no trainer, no transformers, no other plugin. Installs into
# ./.venv-core (created once, reused) and prints one line per plugin, then a closing count.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-core
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "${PIP[@]}" --upgrade pip setuptools
  "${PIP[@]}" torch==2.13.0 "pluggy>=1.5" "pyyaml>=6" "pytest>=8"
fi
"${PIP[@]}" --no-deps --no-build-isolation -e .
passed=0; failed=0; failures=()
for dir in plugins/*/; do
  name=$(basename "$dir")
  [ -d "$dir/tests" ] || continue
  dist=$("$VENV/bin/python" -c "import tomllib,sys; print(tomllib.load(open('$dir/pyproject.toml','rb'))['project']['name'])")
  "${PIP[@]}" --no-deps --no-build-isolation -e "$dir"
  if OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider --import-mode=importlib \
       -c /dev/null --rootdir "$dir" "$dir/tests" > "/tmp/plugins-alone-$name.log" 2>&1; then
    passed=$((passed + 1)); echo "plugin $name alone: $(tail -1 "/tmp/plugins-alone-$name.log")"
  else
    failed=$((failed + 1)); failures+=("$name"); echo "plugin $name alone: FAILED"; tail -30 "/tmp/plugins-alone-$name.log"
  fi
  "$VENV/bin/python" -m pip uninstall --quiet --yes "$dist"
done
echo "plugins alone: $passed passed, $failed failed"
[ "$failed" -eq 0 ] || { echo "failing plugins: ${failures[*]}"; exit 1; }
