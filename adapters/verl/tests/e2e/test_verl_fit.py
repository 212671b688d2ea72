"""Every installed method through verl's own training loop (``PPOTrainer.fit``) on CPU.

See :mod:`grpo_plugins_verl.cpu_fit` for what is verl's code and what stands in for the GPU parts.
A method installed later is picked up from the ``grpo_plugins`` entry points and runs here with the
config, companion methods, reward components and dataset columns its
:meth:`~grpo_plugins.Method.example` declares. A method verl cannot serve (a trainer feature the
adapter lacks) must be refused by ``prepare_config`` before Ray starts, naming the method.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

import grpo_plugins_verl
from grpo_plugins import Composition, CompositionError, Method, PromptRound, hookimpl
from grpo_plugins.conformance import Subject, example_row, installed_methods
from grpo_plugins_verl.cpu_fit import compose_config, run_fit
from grpo_plugins_verl.settings import REFERENCE_HINT

pytestmark = pytest.mark.e2e

REWARD = Path(__file__).with_name("reward.py")
METHODS = [name for name in installed_methods() if name != "grpo"]
REWARD_COMPONENTS = "GRPO_PLUGINS_E2E_REWARDS"
"""``reward.py``'s ``COMPONENTS_VAR``: the reward components of a method's example."""
REFERENCE = ("actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_coef=0.0")
"""verl's reference model (``ref_log_probs``) without changing the loss: see ``REFERENCE_HINT``."""


def example_run(name: str, assets: Path, work: Path, monkeypatch) -> tuple[list, list[str]]:
    """The method's example run list and verl overrides: the tiny training set in ``work`` resized to the
    example's dataset (rows repeated) with its columns, the model and validation set linked from
    ``assets``, its reward components set for ``reward.py``, its round shape where it declares one."""
    import pandas as pd

    subject = Subject.of(name)
    example = subject.example
    train = pd.read_parquet(assets / "train.parquet")
    train = train.iloc[[i % len(train) for i in range(example.dataset_size)]].reset_index(drop=True)
    for column, value_of in example.columns.items():
        train[column] = [value_of(i) for i in range(len(train))]
    work.mkdir(parents=True, exist_ok=True)
    train.to_parquet(work / "train.parquet")
    for linked in ("model", "val.parquet"):
        (work / linked).symlink_to(assets / linked)
    names = tuple(example.reward_names)
    if names != ("reward_0", "reward_1") or any(value in names for value in example.config.values()):
        # the example names its components, or its config reads one (e.g. dagrpo's score)
        values = None if example.reward_values is None else list(example.reward_values)
        monkeypatch.setenv(REWARD_COMPONENTS, json.dumps({"names": list(example.reward_names), "values": values}))
    assert all(example_row(example, 0)[c] is not None for c in example.columns)
    shape = (example.round_prompts, example.rollouts_per_prompt)
    overrides = [] if shape == (4, 4) else [  # the tiny run's 2 x 4 unless the example needs its own
        f"data.train_batch_size={shape[0]}", f"actor_rollout_ref.actor.ppo_mini_batch_size={shape[0]}",
        f"actor_rollout_ref.rollout.n={shape[1]}", f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={shape[1]}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={shape[0] * shape[1]}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={shape[0] * shape[1]}"]
    return subject.run_list(), overrides


def overrides_for(methods: list, steps: int = 2, save_freq: int = -1, resume: str = "disable") -> list[str]:
    """verl overrides of a ``steps``-step run of ``methods``, with the reference model when one needs it."""
    base = [f"trainer.total_training_steps={steps}", f"trainer.save_freq={save_freq}", f"trainer.resume_mode={resume}"]
    composition = Composition(methods)
    if composition.requirers("ref_log_probs") or composition.needers("loss_fields", "ref_log_probs"):
        assert "use_kl_loss=True" in REFERENCE_HINT
        base.extend(REFERENCE)
    return base


def initial_parameters(work: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(work / "model").state_dict().items()}


def check_trained(result, methods: list, work: Path, steps: int = 2) -> None:
    """``steps`` steps of real updates: finite losses, the methods ran, weights moved when there was signal."""
    assert len(result.metrics) == steps
    names = [next(iter(m)) if isinstance(m, dict) else getattr(m, "name", m) for m in methods]
    assert set(names) <= set(result.trainer.grpo_plugins.composition.names)
    for step in result.metrics:
        assert math.isfinite(step["actor/pg_loss"]) and math.isfinite(step["actor/grad_norm"])
        assert step["critic/score/max"] >= step["critic/score/min"]
    composition = result.trainer.grpo_plugins.composition
    for name in composition.providers("loss_objectives"):  # each term logged as plugins/<method>/<term>
        assert all(any(f"plugins/{name}/" in key and math.isfinite(value) for key, value in step.items())
                   for step in result.metrics), (name, sorted(result.metrics[0]))
    engine = result.trainer.actor_rollout_wg.worker.actor.engine
    actor = result.trainer.config.actor_rollout_ref
    mini = actor.actor.ppo_mini_batch_size * actor.rollout.n  # verl's mini-batch rows
    injected = sum(math.ceil(step.get("injection/rows", 0) / mini) for step in result.metrics)
    assert engine.optimizer_steps == steps + injected  # one mini-batch per step (and one per overflow of injected rows)
    if any(step["actor/grad_norm"] > 0 for step in result.metrics):
        before = initial_parameters(work)
        after = result.model.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", METHODS)
def test_method_alone_runs_verl_fit(method, tiny_assets, ray_cluster, tmp_path, monkeypatch):
    work = tmp_path / "work"
    methods, shape = example_run(method, tiny_assets, work, monkeypatch)
    try:
        config = compose_config(methods, work, REWARD, [*overrides_for(methods), *shape])
    except CompositionError as refused:  # a trainer feature the adapter lacks: refused before Ray starts
        assert f"method '{method}'" in str(refused) and "verl lacks it" in str(refused), refused
        print(f"[e2e] {method}: refused by prepare_config: {refused}")
        return
    start = time.perf_counter()
    result = run_fit(config)
    print(f"[e2e] {method}: 2 steps of verl's fit() in {time.perf_counter() - start:.1f} s")
    check_trained(result, methods, tiny_assets)


@pytest.mark.parametrize("methods", [["vade", "sapo"], ["knapsack_rl", "gdpo"]], ids=["vade+sapo", "knapsack_rl+gdpo"])
def test_round_one_stack_runs_verl_fit(methods, tiny_assets, ray_cluster):
    missing = sorted(set(methods) - set(METHODS))
    if missing:
        pytest.skip(f"not installed: {missing}")
    config = compose_config(methods, tiny_assets, REWARD, overrides_for(methods))
    result = run_fit(config)
    check_trained(result, methods, tiny_assets)


def test_whole_groups_stay_together_when_verl_shuffles_and_splits_mini_batches(tiny_assets, ray_cluster):
    """``reg_grpo`` (a whole-group objective) with ``actor.shuffle=True``, two mini-batches of one prompt
    and micro-batches of one group: the adapter orders the actor batch by groups (the installed loss
    refuses any micro-batch holding part of a group) and the objective is logged per optimiser step."""
    if "reg_grpo" not in METHODS:
        pytest.skip("reg_grpo is not installed")
    methods = ["reg_grpo"]
    shape = ["actor_rollout_ref.actor.shuffle=True", "actor_rollout_ref.actor.ppo_mini_batch_size=1"]
    config = compose_config(methods, tiny_assets, REWARD, [*overrides_for(methods), *shape])
    orders: list[list[str]] = []

    def record(trainer):
        order = trainer._order_whole_groups

        def recording(batch, *args):
            order(batch, *args)
            orders.append([str(key).rsplit("_", 2)[0] for key in batch.keys])

        trainer._order_whole_groups = recording

    result = run_fit(config, before_fit=record)
    assert len(orders) == 2 and all(len(set(o[:4])) == 1 and len(set(o[4:])) == 1 for o in orders)  # uid blocks
    assert result.trainer.actor_rollout_wg.worker.actor.engine.optimizer_steps == 4  # 2 mini-batches per step
    assert all(math.isfinite(step["actor/plugins/reg_grpo/regression"]) for step in result.metrics)
    assert result.trainer.config.actor_rollout_ref.actor.shuffle is True  # restored after each update


def test_seeded_step_generator_and_setup_run_in_verl_fit(tiny_assets, ray_cluster):
    """``rec``'s balance drop draws from ``Method.step_generator`` (feature ``step_generator``): the trainer
    gives every method the run's context (seed ``data.seed``) once the dataset is loaded."""
    if "rec" not in METHODS:
        pytest.skip("rec is not installed")
    methods = [{"rec": {"drop": "balance"}}]
    config = compose_config(methods, tiny_assets, REWARD, [*overrides_for(methods), "data.seed=5"])
    result = run_fit(config)
    check_trained(result, methods, tiny_assets)
    rec = result.trainer.grpo_plugins.composition.method("rec")
    assert rec.context.seed == 5 and rec.context.tokenizer is result.trainer.tokenizer
    assert rec.context.dataset_size == 32 and rec.context.settings["group_size"] == 4


class UnevenAllocator(Method):
    """Gives the first prompt of each round 6 completions and the second 2 (a budget of 2 x 4)."""

    name = "uneven_allocator"

    @hookimpl
    def allocate_rollouts(self, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor:
        counts = torch.full_like(prompt_ids, round.budget // prompt_ids.numel())
        counts[0] += 2
        counts[-1] -= 2
        return counts


def test_uneven_allocation_reaches_verl_agent_loop(tiny_assets, ray_cluster):
    grpo_plugins_verl.configure([UnevenAllocator(), "sapo"])
    config = compose_config([], tiny_assets, REWARD, overrides_for([]))
    result = run_fit(config)
    assert result.rollout_counts == [[2, 6], [2, 6]]  # verl's _run_prompt generated what was allocated
    check_trained(result, [UnevenAllocator()], tiny_assets)


def test_stateful_stack_resumes_with_identical_state(tiny_assets, ray_cluster, tmp_path):
    methods = ["vade", "sapo"]
    if not set(methods) <= set(METHODS):
        pytest.skip(f"needs {methods}")
    def config(steps: int, save_freq: int):
        overrides = overrides_for(methods, steps=steps, save_freq=save_freq, resume="auto")
        return compose_config(methods, tiny_assets, REWARD, overrides, checkpoint_dir=tmp_path / "ckpt")

    first = run_fit(config(steps=2, save_freq=2))
    saved_state = first.trainer.grpo_plugins.composition.state_dict()
    assert saved_state and (tmp_path / "ckpt" / "global_step_2" / "grpo_plugins.pt").exists()
    next_round = PromptRound(num_prompts=2, budget=8, dataset_size=32, step=2, default_rollouts=4, total_steps=4)
    expected_prompts = first.trainer.grpo_plugins.composition.run_sample_prompts(
        next_round, _clone(first.trainer.prompt_generator)
    )
    seen = {}

    def capture(trainer):
        seen["step"] = trainer.global_steps
        seen["state"] = trainer.grpo_plugins.composition.state_dict()
        seen["params"] = {k: v.clone() for k, v in trainer.actor_rollout_wg.worker.actor.engine.module.state_dict().items()}
        seen["prompts"] = trainer.grpo_plugins.composition.run_sample_prompts(next_round, _clone(trainer.prompt_generator))

    second = run_fit(config(steps=4, save_freq=-1), before_fit=capture)
    assert seen["step"] == 2
    assert_same_state(seen["state"], saved_state)
    final_params = first.model.state_dict()
    assert all(torch.equal(seen["params"][k], final_params[k]) for k in final_params)
    assert torch.equal(seen["prompts"], expected_prompts)  # the resumed run draws what the first would have
    assert len(second.metrics) == 2  # steps 3 and 4 trained


def _clone(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    return copy


def assert_same_state(left, right) -> None:
    if isinstance(left, torch.Tensor):
        assert torch.equal(left, right)
    elif isinstance(left, dict):
        assert left.keys() == right.keys()
        for key in left:
            assert_same_state(left[key], right[key])
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right)
        for a, b in zip(left, right):
            assert_same_state(a, b)
    else:
        assert left == right


def test_a_prompt_id_column_that_is_not_the_row_index_is_refused_with_a_round_planner(tiny_assets, ray_cluster,
                                                                                      tmp_path):
    """``allocate_rollouts`` speaks of dataset indices; the groups are keyed by the ``prompt_id`` column."""
    import pandas as pd

    train = pd.read_parquet(tiny_assets / "train.parquet")
    train["prompt_id"] = list(range(100, 100 + len(train)))
    train.to_parquet(tmp_path / "train.parquet")
    for linked in ("model", "val.parquet"):
        (tmp_path / linked).symlink_to(tiny_assets / linked)
    grpo_plugins_verl.configure([UnevenAllocator()])
    config = compose_config([], tmp_path, REWARD, overrides_for([]))
    with pytest.raises(CompositionError, match=r"\['uneven_allocator'\] plan the rounds by dataset row index.*"
                                               r"\(row 0 has prompt_id=100\)"):
        run_fit(config)
