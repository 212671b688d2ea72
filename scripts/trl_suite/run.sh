#!/usr/bin/env bash
# TRL's own GRPO trainer tests, offline, against trl.GRPOTrainer (baseline) or the adapter (plugin,
# plugin_config). See README.md. Usage:
#   TRL_TESTS=/path/to/trl/tests bash scripts/trl_suite/run.sh baseline|plugin|plugin_config [pytest args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
PY=${PY:-$root/.venv/bin/python}
work=${WORK:-${TMPDIR:-/tmp}/grpo_plugins_trl_suite}
: "${TRL_TESTS:?set TRL_TESTS to the tests/ folder of a TRL checkout}"
mode=${1:-baseline}
shift || true

mkdir -p "$work/tests"
for name in __init__.py conftest.py testing_constants.py testing_utils.py test_grpo_trainer.py; do
  [ -f "$TRL_TESTS/$name" ] && cp "$TRL_TESTS/$name" "$work/tests/"
done
cp "$here/stand_ins.py" "$work/conftest.py"
cp "$here/zen.txt" "$work/"
export HF_HUB_CACHE=$work/hf_cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1 CUDA_VISIBLE_DEVICES=
[ -d "$HF_HUB_CACHE" ] || "$PY" "$here/build_hub.py" "$HF_HUB_CACHE"

cd "$work"
source=tests/test_grpo_trainer.py
case $mode in
  baseline) file=$source ;;
  plugin)
    file=tests/test_grpo_trainer_plugin.py
    sed 's/^from trl import GRPOConfig, GRPOTrainer$/from trl import GRPOConfig\nfrom grpo_plugins_trl import PluginGRPOTrainer as GRPOTrainer/' \
      "$source" > "$file" ;;
  plugin_config)
    file=tests/test_grpo_trainer_plugin_config.py
    sed 's/^from trl import GRPOConfig, GRPOTrainer$/from grpo_plugins_trl import PluginGRPOConfig as GRPOConfig, PluginGRPOTrainer as GRPOTrainer/' \
      "$source" > "$file" ;;
  *) echo "mode must be baseline, plugin or plugin_config" >&2; exit 2 ;;
esac
if [ "$mode" != baseline ] && ! grep -q "PluginGRPOTrainer as GRPOTrainer" "$file"; then
  echo "$source does not import 'from trl import GRPOConfig, GRPOTrainer': adjust the sed line of run.sh" >&2
  exit 2
fi
# VLM tests need processors that cannot be built offline; remote-code models need their code on disk.
exec timeout "${TIMEOUT:-2400}" "$PY" -m pytest -p no:cacheprovider -q -rfE "$file" \
  -k "not TestGRPOTrainerVLM and not test_trust_remote_code${K:+ and ($K)}" "$@"
