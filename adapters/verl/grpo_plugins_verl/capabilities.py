"""What the verl adapter provides for a run, for the core's capability check (:mod:`grpo_plugins.needs`).

:func:`verl_capabilities` describes a run from its composed verl config; every start-up check of the
adapter compares the enabled methods' needs with it (``Composition.check_capabilities``), so a method
that needs what the run's verl settings take away is refused before the first step, naming the
method, the need and the verl setting:

- ``python -m grpo_plugins_verl.main`` (``prepare_config``), before Ray starts;
- the ``grpo_plugins`` trainer, once its dataset is loaded (with the dataset's columns);
- the estimator when verl runs it without the ``grpo_plugins`` trainer (``verl_capabilities(None)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from grpo_plugins import Composition
from grpo_plugins.needs import TrainerCapabilities

from grpo_plugins_verl.settings import NAME, REFERENCE_HINT

TRAINER = "verl"
TRAINER_FEATURES = ("prompt_selection", "variable_budgets", "prompt_rewriting", "after_step", "method_state")
"""Features only the ``grpo_plugins`` trainer provides (round planning, ``observe``, state in checkpoints)."""
FETCHED_FIELDS = ("completion_ids", "old_log_probs", "ref_log_probs", "reward_components", "reward_weights",
                  "prompts", "completions", "rows", "total_steps", "old_entropies")
"""``GRPOBatch`` fields the trainer fetches for the estimator (verl hands it rewards, mask and uid only)."""
LOSS_FIELDS = ("row_data", "entropies", "ref_log_probs", "step")
"""``LossInputs`` fields only the loss the trainer installs on the actor workers fills."""
NOT_IMPLEMENTED = {
    "method_setup": "the verl adapter does not run the setup hook yet",
    "step_generator": "the verl adapter gives methods no run seed yet (it needs the setup hook)",
    "batch_editing": "the verl adapter does not run keep_rows (dropping and refilling rows) yet",
    "row_injection": "the verl adapter does not run inject_rows yet",
    "loss_normalisers": "the verl adapter's loss does not reduce loss_objectives (LossTerm normalisers) yet",
    "whole_groups": "verl splits micro-batches by rows, not by groups (LossInputs.group_index is empty)",
    "update_control": "the verl adapter does not run scale_update yet",
}
"""Designed features (``docs/design.md``) the verl adapter does not implement, with the reason."""
AGGREGATION = {"token-mean": "token_mean", "seq-mean-token-mean": "sequence_mean",
               "seq-mean-token-sum-norm": "sequence_sum"}
"""verl's ``loss_agg_mode`` -> the neutral ``loss_aggregation`` (other modes are reported as verl spells them)."""
SETTING_NAMES = {
    "loss_aggregation": "actor_rollout_ref.actor.loss_agg_mode",
    "importance_sampling": "actor_rollout_ref.actor.policy_loss.loss_mode",
    "on_policy": "actor_rollout_ref.actor.ppo_epochs / ppo_mini_batch_size",
    "group_size": "actor_rollout_ref.rollout.n",
    "reference_model": "actor_rollout_ref.actor.use_kl_loss / algorithm.use_kl_in_reward",
}
NO_TRAINER = ("the grpo_plugins trainer is not running (set trainer.v1.trainer_mode=grpo_plugins; "
              "python -m grpo_plugins_verl.main does)")


def verl_capabilities(config: Any = None, columns: Iterable[str] | None = None) -> TrainerCapabilities:
    """What the adapter provides for a run with ``config`` (verl's composed ``ppo_trainer`` config, before
    or after ``prepare_config``), with the training dataset's ``columns`` when known.

    ``config=None``: verl's estimator and policy loss registered by hand, without the ``grpo_plugins``
    trainer (only rewards, the response mask and the uid reach the methods).
    """
    caps = TrainerCapabilities.standard(TRAINER, setting_names=SETTING_NAMES).with_columns(columns)
    caps = dataclasses.replace(caps, batch_fields=caps.batch_fields | {"old_entropies"})  # verl's old-log-prob pass
    for feature, reason in NOT_IMPLEMENTED.items():
        caps = caps.without(feature, because=reason)
    if config is None:
        return caps.without(*TRAINER_FEATURES, *FETCHED_FIELDS, *LOSS_FIELDS, because=NO_TRAINER)
    from verl.trainer.ppo.utils import need_reference_policy

    actor = config.actor_rollout_ref.actor
    loss_mode = str(actor.policy_loss.get("loss_mode", "vanilla"))
    aggregation = str(actor.get("loss_agg_mode", "token-mean"))
    caps = caps.with_settings(
        loss_aggregation=AGGREGATION.get(aggregation, aggregation),
        importance_sampling="sequence" if loss_mode == "gspo" else "token",
        on_policy=int(actor.get("ppo_epochs", 1)) == 1
        and actor.get("ppo_mini_batch_size") == config.data.train_batch_size,
        group_size=int(config.actor_rollout_ref.rollout.n),
        reference_model=bool(need_reference_policy(config)),
    )
    mode = str(config.trainer.v1.get("trainer_mode", "sync"))
    if mode not in ("sync", NAME):
        caps = caps.without(*TRAINER_FEATURES, *FETCHED_FIELDS, *LOSS_FIELDS,
                            because=f"trainer.v1.trainer_mode={mode} (the grpo_plugins trainer is verl's sync trainer; "
                            "use trainer.v1.trainer_mode=sync)")
    if loss_mode not in ("vanilla", NAME):
        caps = caps.without("token_loss", "token_weights", *LOSS_FIELDS,
                            because=f"actor.policy_loss.loss_mode={loss_mode} (the methods' loss stage runs on verl's "
                            "vanilla PPO loss; use loss_mode=vanilla)")
    if (config.algorithm.get("rollout_correction", None) or {}).get("bypass_mode", False):
        caps = caps.without("old_entropies", because="algorithm.rollout_correction.bypass_mode=True (verl skips its "
                            "old-log-prob pass, which computes the token entropies)")
    if not need_reference_policy(config):
        caps = caps.without("ref_log_probs", because=f"verl runs no reference model ({REFERENCE_HINT})")
    return caps


def check_run(composition: Composition, config: Any = None, columns: Iterable[str] | None = None) -> None:
    """Refuse, with every problem at once, methods that need what :func:`verl_capabilities` lacks."""
    composition.check_capabilities(verl_capabilities(config, columns))
