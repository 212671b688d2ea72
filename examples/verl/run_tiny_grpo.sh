#!/usr/bin/env bash
# A short verl GRPO run (2 steps, 1 GPU) with two composed grpo-plugins methods on a tiny local model:
#   vade  - prompt sampling from a per-prompt difficulty posterior (sample_prompts + observe, stateful)
#   sapo  - soft-gated policy loss (policy_surrogate), aggregated with seq-mean-token-mean as in the
#           paper and verl's own loss_mode=sapo
# Needs a GPU machine with verl 0.9.1 and its rollout engine (vLLM), grpo-plugins, grpo-plugins-verl and
# the two plugins installed. Nothing is downloaded: the model, tokenizer and data are built locally.
#
# Usage: examples/verl/run_tiny_grpo.sh [extra Hydra overrides]
#   WORK=/tmp/dir    where the model, data and checkpoints go
#   METHODS='[vade,sapo]'   the method list (any grpo-plugins methods)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${WORK:-/tmp/grpo_plugins_verl_tiny}"
PYTHON="${PYTHON:-python}"
METHODS="${METHODS:-[vade,sapo]}"

"$PYTHON" "$HERE/make_tiny_assets.py" --out "$WORK"
STATE="$WORK/ckpt/global_step_2/grpo_plugins.pt"
rm -f "$STATE"  # a state file from an earlier run must not pass the check below

"$PYTHON" -m grpo_plugins_verl.main \
    +grpo_plugins="$METHODS" \
    data.train_files="$WORK/train.parquet" \
    data.val_files="$WORK/val.parquet" \
    data.train_batch_size=8 \
    data.max_prompt_length=32 \
    data.max_response_length=8 \
    data.dataloader_num_workers=0 \
    actor_rollout_ref.model.path="$WORK/model" \
    actor_rollout_ref.actor.optim.lr=1e-4 \
    actor_rollout_ref.actor.ppo_mini_batch_size=8 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=4 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.3 \
    actor_rollout_ref.rollout.enforce_eager=True \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.rollout.agent.num_workers=1 \
    reward.custom_reward_function.path="$HERE/reward.py" \
    reward.custom_reward_function.name=compute_score \
    reward.num_workers=1 \
    transfer_queue.backend.SimpleStorage.num_data_storage_units=1 \
    trainer.n_gpus_per_node=1 \
    trainer.nnodes=1 \
    trainer.total_epochs=1 \
    trainer.total_training_steps=2 \
    trainer.val_before_train=False \
    trainer.test_freq=-1 \
    trainer.save_freq=2 \
    trainer.logger='["console"]' \
    trainer.project_name=grpo_plugins \
    trainer.experiment_name=tiny_vade_sapo \
    trainer.default_local_dir="$WORK/ckpt" \
    trainer.resume_mode=disable \
    "$@"

# The plugin state (vade's posteriors, the sampling generator) is saved with verl's checkpoint.
# (resume_mode=disable: verl's default "auto" would resume a finished run in the same folder and train nothing.)
test -f "$STATE" && echo "OK: plugin state saved in $STATE"
