"""Helpers for tests of the verl adapter: verl-shaped batches, actor configs, throw-away method distributions."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch


def verl_batch(
    group_sizes: Sequence[int] = (3, 5, 2, 4),
    num_tokens: int = 7,
    seed: int = 0,
    num_padding: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``(token_level_rewards (B, T), response_mask (B, T) int64, uid (B,) object)`` as verl builds them.

    Rows of a group are scattered through the batch (verl reorders rows by sequence length);
    responses have random lengths; the score sits on the last response token; ``num_padding``
    synthetic rows (uid ``pad<hex>``, empty mask, zero reward) are appended like
    ``upsample_batch_to_divisible_size`` does.
    """
    gen = torch.Generator().manual_seed(seed)
    uids = np.concatenate([[f"uid-{seed}-{g}"] * size for g, size in enumerate(group_sizes)])
    uids = uids[torch.randperm(len(uids), generator=gen).numpy()]
    n = len(uids)
    lengths = torch.randint(1, num_tokens + 1, (n,), generator=gen)
    mask = (torch.arange(num_tokens) < lengths[:, None]).long()
    scores = torch.randn(n, generator=gen) * 2 + torch.randint(0, 2, (n,), generator=gen).float()
    rewards = torch.zeros(n, num_tokens)
    rewards[torch.arange(n), lengths - 1] = scores
    if num_padding:
        rewards = torch.cat([rewards, torch.zeros(num_padding, num_tokens)])
        mask = torch.cat([mask, torch.zeros(num_padding, num_tokens, dtype=torch.long)])
        uids = np.concatenate([uids, ["pad0123abcd"] * num_padding])
    return rewards, mask, np.array(uids, dtype=object)


def actor_config(loss_mode: str = "vanilla", loss_agg_mode: str = "token-mean", **fields):
    """A real verl ``ActorConfig`` (fsdp strategy) for calling policy losses on CPU."""
    from verl.workers.config import ActorConfig, PolicyLossConfig

    values = dict(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=4, loss_agg_mode=loss_agg_mode)
    values.update(fields)
    return ActorConfig(policy_loss=PolicyLossConfig(loss_mode=loss_mode), **values)


def install_fake_methods(root: Path, module: str, source: str, entry_points: Mapping[str, str]) -> Path:
    """Write module ``module`` and a dist-info declaring ``grpo_plugins`` entry points under ``root``.

    Puts ``root`` on ``sys.path`` (remove it when done) so that ``importlib.metadata`` discovers the
    methods; pass ``root`` in ``PYTHONPATH`` to a subprocess for the same effect there.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist = root / f"{module.replace('_', '-')}-0.0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[grpo_plugins]\n{lines}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def isolate(monkeypatch) -> None:
    """Start a test with no method list in the environment and none configured; both are restored after.

    (``setenv`` first so that pytest records the variable's original absence and removes anything a
    test, e.g. ``prepare_config``, writes to it.)
    """
    from grpo_plugins_verl.runtime import configure
    from grpo_plugins_verl.settings import ENV_VAR

    monkeypatch.setenv(ENV_VAR, "")
    monkeypatch.delenv(ENV_VAR)
    configure(None)


def run_config(*overrides: str) -> Any:
    """verl's ``ppo_trainer`` config composed with ``overrides`` (as ``python -m grpo_plugins_verl.main`` does)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def probe_inputs(prompt: Sequence[int], completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> dict:
    """``{"row-<i>": {field: (j,) tensor}}``: each completion's real tokens after ``prompt``, the fields verl's
    agent loop writes to TransferQueue (:data:`grpo_plugins_verl.probe.INPUT_FIELDS`)."""
    rows = {}
    for i, (ids, mask) in enumerate(zip(completion_ids.long(), completion_mask.bool())):
        response = ids[mask]
        input_ids = torch.cat([torch.as_tensor(list(prompt), dtype=torch.long), response])
        rows[f"row-{i}"] = {"input_ids": input_ids, "position_ids": torch.arange(input_ids.numel()),
                            "responses": response, "response_mask": torch.ones_like(response)}
    return rows


def stand_in_model(vocab_size: int) -> torch.nn.Module:
    """A tiny random Qwen2 causal LM (hidden 32, 2 layers, seed 0) over ``vocab_size`` tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256, tie_word_embeddings=True)).eval()


def local_probe(model: torch.nn.Module, inputs: Mapping[str, Mapping[str, torch.Tensor]]):
    """The actor worker group's ``probe_old_policy`` in this process: one rank running
    :func:`~grpo_plugins_verl.probe.run_job` on ``model`` (the CPU engine stand-in), the job sent through
    cloudpickle as over Ray, the rows read from ``inputs`` (:func:`probe_inputs`) in place of TransferQueue."""
    from ray import cloudpickle

    from grpo_plugins_verl.cpu_fit import CPUEngine
    from grpo_plugins_verl.probe import INPUT_FIELDS, run_job

    engine = CPUEngine(model, trainable=False)

    def fetch(keys: list[str], partition_id: str) -> dict[str, torch.Tensor]:
        return {field: torch.nested.nested_tensor([inputs[key][field] for key in keys], layout=torch.jagged)
                for field in INPUT_FIELDS}

    return lambda job: [run_job(engine, cloudpickle.loads(cloudpickle.dumps(job)), fetch)]


@dataclass
class VerlLossOnBatch:
    """What :func:`verl_loss_on_batch` returns (the verl half of a cross-adapter check).

    Attributes:
        advantages: ``(N, T)`` the advantage stage's advantages as verl stores them (0 on padding).
        token_weights: ``(N, T)`` the ``mask_tokens`` weights, or None.
        per_token_loss: ``(N, T)`` policy loss x token weights + the methods' terms, 0 on padding.
        loss: the scalar the actor backpropagates.
        grad: ``(N, T)`` gradient of ``loss`` with respect to the current log-probs, 0 on padding.
    """

    advantages: torch.Tensor
    token_weights: torch.Tensor | None
    per_token_loss: torch.Tensor
    loss: torch.Tensor
    grad: torch.Tensor


def verl_loss_on_batch(
    plugins: Any,
    *,
    prompt_ids: torch.Tensor,
    rewards: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    entropies: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    reward_components: torch.Tensor | None = None,
    reward_names: Sequence[str] = (),
    prompts: list | None = None,
    completions: list | None = None,
    rows: list[dict] | None = None,
    old_entropies: torch.Tensor | None = None,
    old_log_probs_at: dict[float, torch.Tensor] | None = None,
    total_steps: int | None = None,
    loss_agg_mode: str = "token-mean",
    probe_model: torch.nn.Module | None = None,
    prompt_token: int = 1,
    **actor_fields: Any,
) -> VerlLossOnBatch:
    """One fixed generation batch through the verl adapter's estimator (as the ``grpo_plugins`` trainer
    runs it, with the fields it fetches) and the actor loss it installs (one micro-batch, in the
    engine's layout), with the model's log-probs replaced by ``log_probs``.

    Arguments as :func:`grpo_plugins_trl.testing.trl_loss_on_batch` (``completion_mask`` right-padded,
    every completion at least one token); ``old_entropies`` ``(N, T)`` are the old-log-prob pass's token
    entropies (``GRPOBatch.old_entropies``); ``old_log_probs_at`` ``{temperature: (N, T)}`` the actor's passes at
    other temperatures (``GRPOBatch.old_log_probs_at``); ``probe_model``: the old policy the actor workers'
    probe runs (:func:`local_probe`; rows are ``prompt_token`` + each completion) when a method reads a probe
    (None: :func:`stand_in_model` over the batch's token ids);
    ``loss_agg_mode`` and ``actor_fields`` configure verl's ``ActorConfig``.

    Raises:
        CompositionError: the trainer's start-up capability check refuses the methods for this run
            (``rollout.n`` = the largest group, the ``rows``' columns, a reference model when
            ``ref_log_probs`` is given).
    """
    from omegaconf import OmegaConf
    from verl.utils import tensordict_utils as tu

    import grpo_plugins_verl.loss as verl_loss
    from grpo_plugins_verl import objectives
    from grpo_plugins_verl.capabilities import verl_capabilities
    from grpo_plugins_verl.advantage import compute_grpo_plugins_advantage
    from grpo_plugins_verl.capabilities import check_run
    from grpo_plugins_verl.runtime import configure, get_runtime
    from grpo_plugins_verl.settings import NAME

    n, t = completion_mask.shape
    mask = completion_mask.bool()
    lengths = mask.sum(1)
    configure(plugins)
    runtime = get_runtime(OmegaConf.create({}))
    runtime.trainer_attached = runtime.loss_installed = True
    runtime.total_steps = total_steps
    uids = np.array([f"prompt-{int(i)}" for i in prompt_ids], dtype=object)
    runtime.prompt_ids.update({uid: int(i) for uid, i in zip(uids, prompt_ids)})
    runtime.dataset_index.update({uid: row for row, uid in enumerate(uids)})  # one dataset row per completion
    runtime.rows_for = lambda indices: [(rows or [{}] * n)[i] for i in indices]
    extras: dict[str, Any] = {"completion_ids": completion_ids, "old_log_probs": old_log_probs,
                              "prompts": prompts or [""] * n, "completions": completions or [""] * n}
    if ref_log_probs is not None:
        extras["ref_log_probs"] = ref_log_probs
    if old_entropies is not None:
        extras["old_entropies"] = old_entropies
    if old_log_probs_at:
        extras["old_log_probs_at"] = dict(old_log_probs_at)
    if reward_components is not None:
        extras.update(reward_components=reward_components.float(), reward_names=tuple(reward_names))
    if "steps" in runtime.composition.required_fields():  # as the trainer reads them: each row one turn-0 session
        from grpo_plugins_verl.extras import TURNS, turn_rows

        extras[TURNS] = turn_rows([f"{uid}_{row}_0" for row, uid in enumerate(uids)])
    runtime.extras = extras
    _, sizes = torch.unique(prompt_ids, return_counts=True)
    checked = run_config(f"actor_rollout_ref.actor.loss_agg_mode={loss_agg_mode}", f"actor_rollout_ref.rollout.n={int(sizes.max())}",
                         "trainer.n_gpus_per_node=1", f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={n}",
                         f"data.train_batch_size={sizes.numel()}", f"actor_rollout_ref.actor.ppo_mini_batch_size={sizes.numel()}",
                         *(("actor_rollout_ref.actor.use_kl_loss=True",) if ref_log_probs is not None else ()))
    check_run(runtime.composition, checked, columns=list(rows[0]) if rows else None)  # the trainer's start-up check
    from grpo_plugins_verl.probe import PENDING, PendingProbes, requests

    wanted = requests(runtime.composition)
    if wanted:  # the actor workers' probe, in this process (the trainer's pending probes)
        model = probe_model or stand_in_model(max(int(completion_ids.max()), prompt_token) + 1)
        inputs = probe_inputs([prompt_token], completion_ids, mask)
        extras[PENDING] = PendingProbes(local_probe(model, inputs), list(inputs), "train", wanted, 1.0, n)
    runtime.composition.run_setup(objectives.run_context(checked, None, n, total_steps, verl_capabilities(checked).settings))
    token_rewards = torch.zeros(n, t)
    token_rewards[torch.arange(n), lengths - 1] = rewards.float()  # verl's score on the last response token
    advantages, _ = compute_grpo_plugins_advantage(token_rewards, mask.long(), uids, OmegaConf.create({}))
    runtime.extras = None
    stage = runtime.last_batch

    prompt_len = 2
    fields = {
        "prompts": torch.ones(n, prompt_len, dtype=torch.long), "responses": completion_ids.long(),
        "attention_mask": torch.cat([torch.ones(n, prompt_len, dtype=torch.long), mask.long()], 1),
        "response_mask": mask.long(), "old_log_probs": old_log_probs, "advantages": advantages,
        **{verl_loss.ROW_PREFIX + key: value for key, value in stage.row_data.items()},
    }
    if stage.token_weights is not None:
        fields[verl_loss.TOKEN_WEIGHTS] = stage.token_weights
    if runtime.composition.implements("loss_objectives"):  # each row's group, as the trainer carries it
        fields.update(objectives.group_fields(stage.group_index, stage.group_sizes, runtime.last_rows, n))
    if ref_log_probs is not None:
        fields["ref_log_prob"] = ref_log_probs
    info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": n, verl_loss.STEP: stage.step}
    data = tu.get_tensordict(fields, non_tensor_dict=info)
    current = log_probs.detach().clone().requires_grad_(True)

    def flat(values: torch.Tensor) -> torch.Tensor:  # the engine's layout: the prompt's last token scores token 0
        pieces = []
        for i in range(n):
            pieces += [values.new_zeros(prompt_len - 1), values[i, : int(lengths[i])], values.new_zeros(1)]
        return torch.cat(pieces)

    model_output = {"log_probs": flat(current)}
    if entropies is not None:
        model_output["entropy"] = flat(entropies)
    config = actor_config(NAME, loss_agg_mode, **{"rollout_n": int(sizes.max()), **actor_fields})
    recorded: list[torch.Tensor] = []
    aggregate = verl_loss.agg_loss

    def recording_agg_loss(loss_mat, **kwargs):  # the policy loss first, then each term, entropy, KL
        recorded.append(loss_mat.detach())
        return aggregate(loss_mat=loss_mat, **kwargs)

    verl_loss.agg_loss = recording_agg_loss
    try:
        loss, _ = verl_loss.grpo_plugins_ppo_loss(config, model_output, data)
    finally:
        verl_loss.agg_loss = aggregate
    loss.backward()
    terms = len(recorded) - 1 - (entropies is not None) - bool(config.use_kl_loss)
    per_token = recorded[0] + sum(recorded[1 : 1 + terms], torch.zeros_like(recorded[0]))
    return VerlLossOnBatch(
        advantages=torch.where(mask, advantages, 0.0), token_weights=stage.token_weights,
        per_token_loss=torch.where(mask, per_token, 0.0), loss=loss.detach(), grad=torch.where(mask, current.grad, 0.0),
    )

