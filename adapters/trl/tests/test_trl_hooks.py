"""Every hook runs inside the real TRL GRPOTrainer, and its output reaches the sampler, the batch,
the loss or the gradient as intended."""

from __future__ import annotations

import statistics

import pytest
import torch
from trl import GRPOTrainer

from grpo_plugins.testing import BatchRecorder
from grpo_plugins import CompositionError, LossInputs, Method, PluginError, PromptRound, hookimpl
from grpo_plugins_trl import PluginGRPOTrainer
from grpo_plugins_trl.testing import (
    GradientRecorder, arithmetic_dataset, digit_overlap_reward, exact_answer_reward, tiny_grpo_run,
)


def losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row and "train_runtime" not in row]


def hand_group_normalize(ids: list[int], rewards: list[float], epsilon: float = 1e-4) -> list[float]:
    """GRPO advantages by prompt id, with Python's statistics module."""
    groups = {pid: [r for p, r in zip(ids, rewards) if p == pid] for pid in set(ids)}
    return [
        (r - statistics.fmean(groups[p])) / (statistics.stdev(groups[p]) + epsilon) for p, r in zip(ids, rewards)
    ]


# --------------------------------------------------------------------------- prompt ids
def test_prompt_ids_without_a_prompt_id_column_hash_the_prompt_text():
    from grpo_plugins_trl.testing import arithmetic_dataset
    from grpo_plugins_trl.trainer import stable_prompt_id

    recorder = BatchRecorder()
    dataset = arithmetic_dataset(32).remove_columns("prompt_id")
    tiny_grpo_run([recorder], max_steps=1, dataset=dataset)
    batch = recorder.batches[0]
    assert batch.prompt_ids.tolist() == [stable_prompt_id(row["prompt"]) for row in batch.rows]
    assert batch.group_sizes.tolist() == [4, 4]
    assert stable_prompt_id([{"role": "user", "content": "1 + 2 ="}]) == stable_prompt_id([{"content": "1 + 2 =", "role": "user"}])


# --------------------------------------------------------------------------- sample_prompts
class EvenPrompts(Method):
    name = "even_prompts"

    def __init__(self, config=None):
        super().__init__(config)
        self.rounds: list[PromptRound] = []

    @hookimpl
    def sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor:
        self.rounds.append(round)
        return torch.randperm(round.dataset_size // 2, generator=generator)[: round.num_prompts] * 2


def test_sample_prompts_drives_the_sampler():
    runs = []
    for _ in range(2):
        sampler, recorder = EvenPrompts(), BatchRecorder()
        trainer = tiny_grpo_run([sampler, recorder], max_steps=3)
        runs.append((sampler, recorder, trainer))
    (sampler, recorder, trainer), (_, _, again) = runs
    assert isinstance(trainer.get_train_dataloader().sampler, torch.utils.data.Sampler)
    rounds = trainer._plugin_rounds
    assert all(torch.equal(a, b) for a, b in zip(rounds, again._plugin_rounds))  # seeded generator
    assert [r.step for r in sampler.rounds[:3]] == [0, 1, 2]
    assert all(r.num_prompts == 2 and r.budget == 8 and r.dataset_size == 32 for r in sampler.rounds)
    for planned, batch in zip(rounds, recorder.batches):
        assert torch.equal(batch.prompt_ids, planned)  # the prompts generated are the ones sampled
        assert bool((batch.prompt_ids % 2 == 0).all())
        assert batch.rows[0]["prompt"] == trainer.train_dataset[int(planned[0])]["prompt"]


# --------------------------------------------------------------------------- allocate_rollouts
class UnevenBudget(Method):
    name = "uneven_budget"

    @hookimpl
    def allocate_rollouts(self, round: PromptRound, prompt_ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([2, 6, 4, 4])


def test_allocate_rollouts_variable_groups_use_true_groups():
    recorder = BatchRecorder()
    tiny_grpo_run(
        [UnevenBudget(), recorder], max_steps=2, per_device_train_batch_size=8, reward_funcs=digit_overlap_reward
    )
    for batch in recorder.batches:
        assert batch.num_completions == 16
        assert batch.group_sizes.sort().values.tolist() == [2, 4, 4, 6]
        ids = batch.prompt_ids.tolist()
        firsts = [ids[0], ids[2], ids[8], ids[12]]
        assert ids == [firsts[0]] * 2 + [firsts[1]] * 6 + [firsts[2]] * 4 + [firsts[3]] * 4  # grouped by prompt
        expected = hand_group_normalize(ids, batch.rewards.tolist())
        assert batch.advantages.tolist() == pytest.approx(expected, abs=1e-5)


def test_allocate_rollouts_rejects_vllm_server_mode():
    with pytest.raises(CompositionError, match="'uneven_budget' needs trainer feature 'variable_budgets'.*vllm_mode='server'"):
        tiny_grpo_run([UnevenBudget()], train=False, use_vllm=True, vllm_mode="server")


# --------------------------------------------------------------------------- augment_prompts
class Rewrite(Method):
    name = "rewrite"

    @hookimpl
    def augment_prompts(self, round, prompt_ids, prompts, rows):
        assert len(prompts) == round.num_prompts == 2 and round.budget == 8
        assert [row["prompt_id"] for row in rows] == prompt_ids.tolist()
        return [f"{p} 0 +" for p in prompts]


def test_augment_prompts_rewrites_before_generation():
    seen = []

    def reward(completions, prompts, **kwargs):
        seen.extend(prompts)
        return [0.0] * len(completions)

    recorder = BatchRecorder()
    trainer = tiny_grpo_run([Rewrite(), recorder], max_steps=1, reward_funcs=reward)
    batch = recorder.batches[0]
    assert all(p.endswith(" = 0 +") for p in seen) and len(seen) == 8
    assert batch.prompts == seen
    assert [row["prompt"] + " 0 +" for row in batch.rows] == seen  # rows keep the dataset's prompt
    # the rewritten prompt is what the model was given (3 more prompt tokens than the dataset prompt)
    dataset_tokens = len(trainer.processing_class(batch.rows[0]["prompt"])["input_ids"])
    assert int(trainer._buffered_inputs[0]["prompt_mask"].sum(1).max()) == dataset_tokens + 2


# --------------------------------------------------------------------------- shape_rewards
class RankReward(Method):
    name = "rank_reward"

    @hookimpl
    def shape_rewards(self, batch, rewards):
        return rewards + (torch.arange(batch.num_completions) % 3).float()


def test_shape_rewards_reach_the_advantages_and_loss():
    recorder = BatchRecorder()
    trainer = tiny_grpo_run([RankReward(), recorder], max_steps=2, reward_funcs=exact_answer_reward)
    plain = tiny_grpo_run(None, max_steps=2, trainer_cls=GRPOTrainer, reward_funcs=exact_answer_reward)
    batch = recorder.batches[0]
    assert batch.rewards.tolist() == (torch.arange(8) % 3).float().tolist()  # exact_answer_reward is 0 here
    assert batch.advantages.tolist() == pytest.approx(hand_group_normalize(batch.prompt_ids.tolist(), batch.rewards.tolist()), abs=1e-5)
    assert all(loss == 0 for loss in losses(plain)) and any(loss != 0 for loss in losses(trainer))


# --------------------------------------------------------------------------- compute / adjust advantages
class OnesAdvantage(Method):
    name = "ones_advantage"

    @hookimpl
    def compute_advantages(self, batch):
        return torch.ones(batch.num_completions)


class PlusOne(Method):
    name = "plus_one"

    @hookimpl
    def adjust_advantages(self, batch, advantages):
        return advantages + 1.0


def test_compute_advantages_reaches_the_loss():
    # dapo, on-policy: loss = -sum_t A / tokens = -1 per optimiser step when every A = 1
    trainer = tiny_grpo_run([OnesAdvantage()], max_steps=2, loss_type="dapo")
    assert losses(trainer) == pytest.approx([-1.0, -1.0], abs=1e-6)
    assert list(trainer._logs["advantages"])[-8:] == [1.0] * 8


def test_adjust_advantages_chains_after_the_estimator():
    trainer = tiny_grpo_run([OnesAdvantage(), PlusOne()], max_steps=2, loss_type="dapo")
    assert losses(trainer) == pytest.approx([-2.0, -2.0], abs=1e-6)


# --------------------------------------------------------------------------- mask_tokens
class FirstTokenOnly(Method):
    name = "first_token_only"

    @hookimpl
    def mask_tokens(self, batch):
        weights = torch.zeros_like(batch.token_mask)
        weights[:, 0] = 1.0
        return weights


class HalfWeight(Method):
    name = "half_weight"

    @hookimpl
    def mask_tokens(self, batch):
        return 0.5 * torch.ones_like(batch.token_mask)


def test_zero_weights_keep_the_normaliser_and_the_attention_mask():
    """mask_tokens weights multiply the policy loss; the token count (TRL's num_items_in_batch) and the
    attention mask stay the completion mask's (weight 0 is not a keep-mask)."""
    trainer = tiny_grpo_run([OnesAdvantage(), FirstTokenOnly()], max_steps=2, loss_type="dapo")
    for micro in trainer._buffered_inputs:
        assert "tool_mask" not in micro
        assert int(micro["num_items_in_batch"]) == int(trainer.last_plugin_batch.completion_mask.sum())
        kept = micro["advantages"] * micro["completion_mask"]
        assert kept[:, 0].tolist() == [1.0] * kept.shape[0] and not bool(kept[:, 1:].any())
    # dapo, on-policy, A = 1: loss = -(kept tokens) / (all tokens) of the generation batch
    batch = trainer.last_plugin_batch
    expected = -batch.completion_mask[:, 0].sum() / batch.completion_mask.sum()
    assert losses(trainer)[-1] == pytest.approx(float(expected), abs=1e-6)
    assert losses(trainer)[-1] > -1.0


def test_weighted_mask_folds_into_token_advantages():
    trainer = tiny_grpo_run([OnesAdvantage(), HalfWeight()], max_steps=2, loss_type="dapo")
    assert losses(trainer) == pytest.approx([-0.5, -0.5], abs=1e-6)
    micro = trainer._buffered_inputs[0]
    assert micro["advantages"].shape == micro["completion_ids"].shape
    assert bool((micro["advantages"] == 0.5).all())
    # with a loss hook, the weights multiply the policy loss instead of the advantages
    gated = tiny_grpo_run([OnesAdvantage(), HalfWeight(), UnitGate()], max_steps=2, loss_type="dapo")
    assert losses(gated) == pytest.approx([-0.5, -0.5], abs=1e-6)
    assert bool((gated._buffered_inputs[0]["advantages"] == 1.0).all())


class UnitGate(Method):
    name = "unit_gate"

    @hookimpl
    def gate_loss(self, inputs: LossInputs):
        return torch.ones_like(inputs.log_probs)


# --------------------------------------------------------------------------- loss hooks
class ScaledClip(Method):
    """TRL's clipped surrogate times 4, written from LossInputs."""

    name = "scaled_clip"

    @hookimpl
    def policy_surrogate(self, inputs: LossInputs):
        ratio, adv = inputs.ratio, inputs.advantages
        clipped = torch.clamp(ratio, 1 - inputs.clip_low, 1 + inputs.clip_high)
        return -4.0 * torch.min(ratio * adv, clipped * adv)


class HalveRows(Method):
    name = "halve_rows"

    @hookimpl
    def gate_loss(self, inputs: LossInputs):
        return torch.full((inputs.log_probs.shape[0], 1), 0.5)


class ConstantTerm(Method):
    name = "constant_term"

    @hookimpl
    def loss_terms(self, inputs: LossInputs):
        return {"quarter": torch.full_like(inputs.log_probs, 0.25)}


def one_step(plugins, trainer_cls=None, **kw):
    recorder = GradientRecorder()
    trainer = tiny_grpo_run(
        plugins, trainer_cls=trainer_cls, max_steps=1, callbacks=[recorder], reward_funcs=digit_overlap_reward,
        max_grad_norm=0.0, **kw,  # no clipping: gradients compare before the optimiser step
    )
    return trainer, recorder.gradients[0]


@pytest.mark.parametrize("plugin,factor", [(ScaledClip(), 4.0), (HalveRows(), 0.5)], ids=["surrogate", "gate"])
def test_surrogate_and_gate_scale_loss_and_gradient(plugin, factor):
    base, base_grads = one_step(None, trainer_cls=GRPOTrainer, loss_type="grpo")
    trainer, grads = one_step([plugin], loss_type="grpo")
    assert losses(base)[0] != 0
    assert losses(trainer)[0] == pytest.approx(factor * losses(base)[0], rel=1e-6)
    for g, b in zip(grads, base_grads, strict=True):
        torch.testing.assert_close(g, factor * b, rtol=1e-5, atol=1e-8)


def test_loss_terms_are_added_and_logged():
    base, _ = one_step(None, trainer_cls=GRPOTrainer, loss_type="bnpo")
    trainer, _ = one_step([ConstantTerm()], loss_type="bnpo")
    assert losses(trainer)[0] == pytest.approx(losses(base)[0] + 0.25, abs=1e-6)
    row = trainer.state.log_history[0]
    assert row["plugins/constant_term/quarter"] == pytest.approx(0.25)


# --------------------------------------------------------------------------- row_data
class CarryRows(Method):
    """Attaches per-row and per-token data at the advantage stage and checks it at the loss stage."""

    name = "carry_rows"

    def __init__(self, config=None):
        super().__init__(config)
        self.checked = 0

    @hookimpl
    def adjust_advantages(self, batch, advantages):
        batch.row_data["advantage"] = advantages.clone()
        batch.row_data["length"] = batch.token_mask.sum(1)
        batch.row_data["tokens"] = batch.token_mask.clone()
        return advantages

    @hookimpl
    def gate_loss(self, inputs: LossInputs):
        data = inputs.row_data
        assert torch.equal(data["advantage"], inputs.advantages[:, 0])
        assert torch.equal(data["length"], inputs.mask.sum(1))
        assert torch.equal(data["tokens"], inputs.mask)  # token data trimmed to this batch's width
        self.checked += 1
        return torch.ones_like(inputs.log_probs)


def test_row_data_follows_rows_through_shuffle_and_split():
    plugin = CarryRows()
    tiny_grpo_run([plugin], max_steps=2, reward_funcs=digit_overlap_reward)
    assert plugin.checked == 4  # 2 steps x 2 micro-batches


# --------------------------------------------------------------------------- observe and metrics
class Metric(Method):
    name = "metric"

    @hookimpl
    def observe(self, batch, step):
        self.log_metric("step_seen", step)


@pytest.mark.parametrize("num_iterations,expected", [(1, [1, 2, 3]), (2, [2])])
def test_observe_after_the_step_that_consumed_the_batch(num_iterations, expected):
    recorder = BatchRecorder()
    trainer = tiny_grpo_run([recorder, Metric()], max_steps=3, num_iterations=num_iterations)
    assert recorder.steps == expected
    assert all(b.advantages is not None and b.rewards.shape == (8,) for b in recorder.batches)
    logged = [row.get("plugins/metric/step_seen") for row in trainer.state.log_history[:-1]]
    assert [v for v in logged if v is not None] == [float(s) for s in expected]
    assert "plugins/grpo/frac_zero_advantage" in trainer.state.log_history[0]  # a generation step


# --------------------------------------------------------------------------- errors
class BadShape(Method):
    name = "bad_shape"

    @hookimpl
    def compute_advantages(self, batch):
        return torch.ones(batch.num_completions + 1)


class NaNRewards(Method):
    name = "nan_rewards"

    @hookimpl
    def shape_rewards(self, batch, rewards):
        return rewards * float("nan")


class NegativeMask(Method):
    name = "negative_mask"

    @hookimpl
    def mask_tokens(self, batch):
        return -torch.ones_like(batch.token_mask)


@pytest.mark.parametrize(
    "plugin,hook,problem",
    [(BadShape(), "compute_advantages", "shape"), (NaNRewards(), "shape_rewards", "NaN"), (NegativeMask(), "mask_tokens", "below 0")],
)
def test_bad_plugin_output_stops_the_step(plugin, hook, problem):
    with pytest.raises(PluginError, match=f"method '{plugin.name}'.*hook '{hook}'.*{problem}"):
        tiny_grpo_run([plugin], max_steps=1)


def test_startup_errors():
    # every problem of the trainer settings at once, each naming the method, the need and the setting
    with pytest.raises(CompositionError, match="2 problems") as caught:
        tiny_grpo_run(["ngrpo", UnevenBudget()], train=False, use_vllm=True, vllm_mode="server",
                      multi_objective_aggregation="normalize_then_sum")
    assert "'ngrpo' needs trainer feature 'advantage_hooks'" in str(caught.value)
    assert "'uneven_budget' needs trainer feature 'variable_budgets'" in str(caught.value)
    with pytest.raises(CompositionError, match="'ngrpo' needs trainer feature 'advantage_hooks'.*normalize_then_sum"):
        tiny_grpo_run(["ngrpo"], train=False, multi_objective_aggregation="normalize_then_sum")
    streamed = arithmetic_dataset(32).to_iterable_dataset()
    with pytest.raises(CompositionError, match="'uneven_budget' needs trainer feature 'variable_budgets'.*IterableDataset"):
        tiny_grpo_run([UnevenBudget()], train=False, dataset=streamed)
    with pytest.raises(CompositionError, match="no_such_method"):
        tiny_grpo_run(["no_such_method"], train=False)
    with pytest.raises(CompositionError, match="not both"):
        tiny_grpo_run(["grpo"], train=False, grpo_plugins=["grpo"])


def test_trl_parser_reads_grpo_plugins_from_yaml(tmp_path):
    from trl import TrlParser

    from grpo_plugins_trl import PluginGRPOConfig
    from grpo_plugins_trl.testing import arithmetic_dataset, tiny_model, tiny_tokenizer

    config = tmp_path / "run.yaml"
    config.write_text(
        f"output_dir: {tmp_path}\nuse_cpu: true\nbf16: false\nper_device_train_batch_size: 4\nnum_generations: 4\n"
        "report_to: none\ngrpo_plugins:\n  - grpo: {scale: none}\n"
    )
    (args,) = TrlParser((PluginGRPOConfig,)).parse_args_and_config(args=["--config", str(config)])
    assert args.grpo_plugins == [{"grpo": {"scale": "none"}}]
    trainer = PluginGRPOTrainer(
        model=tiny_model(), reward_funcs=exact_answer_reward, args=args, train_dataset=arithmetic_dataset(8),
        processing_class=tiny_tokenizer(),
    )
    assert trainer.composition.names == ["grpo"]
    assert trainer.composition.method("grpo").config.scale == "none"


def test_batch_carries_old_and_reference_log_probs():
    recorder = BatchRecorder()
    tiny_grpo_run([recorder], max_steps=2, beta=0.05, num_iterations=2)
    batch = recorder.batches[0]
    mask = batch.token_mask
    assert batch.old_log_probs.shape == batch.ref_log_probs.shape == batch.completion_ids.shape == mask.shape
    assert bool((batch.old_log_probs * mask < 0).any())
    # first generation: the policy is still the reference model
    torch.testing.assert_close(batch.old_log_probs * mask, batch.ref_log_probs * mask, rtol=0, atol=1e-6)
