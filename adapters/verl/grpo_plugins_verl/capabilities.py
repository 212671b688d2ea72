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

from grpo_plugins import Composition, CompositionError
from grpo_plugins.needs import TrainerCapabilities

from grpo_plugins_verl.injection import injection_blockers, injection_problems
from grpo_plugins_verl.objectives import FEATURES, planning_problems, whole_group_blockers
from grpo_plugins_verl.probe import probe_blockers
from grpo_plugins_verl.settings import COLOCATED_REWARD_MODEL, NAME, REFERENCE_HINT, colocated_reward_model

TRAINER = "verl"
TRAINER_FEATURES = ("prompt_selection", "variable_budgets", "prompt_rewriting", "after_step", "method_state",
                    "method_setup", "step_generator", "whole_groups", "batch_editing", "row_injection", "old_policy_probe")
"""Features only the ``grpo_plugins`` trainer provides (round planning, ``observe``, state in checkpoints,
``setup`` and the run seed, whole groups in micro-batches: :mod:`grpo_plugins_verl.objectives`; ``keep_rows``
in verl's DAPO filter and refill: :mod:`grpo_plugins_verl.refill`; ``inject_rows``:
:mod:`grpo_plugins_verl.injection`; the old-policy probe: :mod:`grpo_plugins_verl.probe`)."""
FETCHED_FIELDS = ("completion_ids", "old_log_probs", "ref_log_probs", "reward_components", "reward_weights",
                  "prompts", "completions", "rows", "total_steps", "old_entropies", "old_log_probs_at", "steps",
                  "probes")
"""``GRPOBatch`` fields the trainer fetches for the estimator (verl hands it rewards, mask and uid only)."""
LOSS_FIELDS = ("row_data", "entropies", "ref_log_probs", "step", "group_index")
"""``LossInputs`` fields only the loss the trainer installs on the actor workers fills."""
NOT_IMPLEMENTED = {
    "update_control": "the verl adapter does not run scale_update yet",
    "update_preview": "the verl adapter does not preview the optimiser's LM-head update yet (the head's optimiser state "
                      "is sharded on the actor workers; adapters/verl/README.md)",
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
    caps = dataclasses.replace(caps.with_features(*FEATURES, "batch_editing", "row_injection", "old_policy_probe"),
                               batch_fields=caps.batch_fields | {"old_entropies", "old_log_probs_at", "steps", "probes"},
                               loss_fields=caps.loss_fields | {"group_index"})
    # old_entropies: verl's old-log-prob pass; old_log_probs_at: more passes of it (statistics.py);
    # steps: a row is one turn ({uid}_{session}_{index}, trainer.py); probes: the actor workers (probe.py)
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
        caps = caps.without("token_loss", "token_weights", "loss_normalisers", "whole_groups", *LOSS_FIELDS,
                            because=f"actor.policy_loss.loss_mode={loss_mode} (the methods' loss stage runs on verl's "
                            "vanilla PPO loss; use loss_mode=vanilla)")
    if (config.algorithm.get("rollout_correction", None) or {}).get("bypass_mode", False):
        caps = caps.without("old_entropies", "old_log_probs_at", because="algorithm.rollout_correction.bypass_mode=True "
                            "(verl skips its old-log-prob pass, which computes the token entropies and, at other "
                            "temperatures, the log-probs; old_log_probs are then the rollout's)")
    if not need_reference_policy(config):
        caps = caps.without("ref_log_probs", because=f"verl runs no reference model ({REFERENCE_HINT})")
    for blocker in whole_group_blockers(config):
        caps = caps.without("whole_groups", "group_index", because=blocker)
    for blocker in batch_editing_blockers(config):
        caps = caps.without("batch_editing", because=blocker)
    for blocker in injection_blockers(config):
        caps = caps.without("row_injection", because=blocker)
    for blocker in probe_blockers(config):
        caps = caps.without("old_policy_probe", "probes", because=blocker)
    return caps


def batch_editing_blockers(config: Any) -> list[str]:
    """verl settings under which the adapter cannot drop and refill groups (:mod:`grpo_plugins_verl.refill`
    runs inside verl's own sync ``ReplayBuffer``), as reasons."""
    reasons = []
    sampler = config.trainer.v1.get("sampler", None) or {}
    custom = sampler.get("custom_sampler", None) or {}
    if custom.get("path", None) and custom.get("name", None):
        reasons.append("trainer.v1.sampler.custom_sampler is set (the adapter drops and refills groups in verl's own "
                       "ReplayBuffer; remove the custom sampler)")
    if colocated_reward_model(config):
        reasons.append(f"{COLOCATED_REWARD_MODEL}: verl scores after sampling, too late to drop groups; set "
                       "reward.reward_model.enable_resource_pool=True")
    return reasons


def check_run(composition: Composition, config: Any = None, columns: Iterable[str] | None = None) -> None:
    """Refuse, with every problem at once, methods that need what :func:`verl_capabilities` lacks (and
    whole groups with rollout allocation, :func:`~grpo_plugins_verl.objectives.planning_problems`)."""
    problems = (composition.capability_problems(verl_capabilities(config, columns)) + planning_problems(composition)
                + injection_problems(composition))
    if len(problems) == 1:
        raise CompositionError(problems[0])
    if problems:
        raise CompositionError(f"the run cannot start on {TRAINER} ({len(problems)} problems):\n- " + "\n- ".join(problems))
