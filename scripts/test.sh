#!/usr/bin/env bash
# The whole test suite, as CI runs it (`make test` = install, then this), in four timed parts:
#   unit         core, method and adapter tests in ./.venv (fast; real TRL/verl pieces, tiny models)
#   alone        each method plugin's unit tests with only torch + pluggy + the core + that plugin
#   integration  tests/integration: real TRL runs of every method, alone and composed; examples
#   e2e          verl's own PPOTrainer.fit() on CPU for every installed method (Ray, tiny model)
# PARTS="unit integration" runs a subset. Every part runs even if an earlier one fails; the exit status
# is non-zero when any failed, and the closing line counts the parts.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-"unit alone integration e2e"}
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
declare -A TIMES STATUS
run_part() {
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@"; local rc=$?
  [ "$rc" -eq 5 ] && rc=0  # pytest: no test collected in this part
  TIMES[$name]=$((SECONDS - start)); STATUS[$name]=$rc
  echo "=== $name: exit $rc in ${TIMES[$name]} s"
}
for part in $PARTS; do
  case $part in
    unit) run_part unit "$PY" -m pytest -q -m "not e2e" --ignore=tests/integration ;;
    alone) run_part alone bash scripts/test_plugins_alone.sh ;;
    integration) run_part integration "$PY" -m pytest -q tests/integration ;;
    e2e) run_part e2e "$PY" -m pytest -q -m e2e adapters/verl/tests/e2e ;;
    *) echo "unknown part '$part'"; exit 2 ;;
  esac
done
passed=0; failed=0
echo "=== summary"
for part in $PARTS; do
  printf '%-12s %5s s  %s\n' "$part" "${TIMES[$part]}" "$([ "${STATUS[$part]}" -eq 0 ] && echo ok || echo FAILED)"
  if [ "${STATUS[$part]}" -eq 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
echo "parts: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
