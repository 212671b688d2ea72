"""One method, two trainers: the same generation batch through the TRL and the verl adapter gives the same
advantages, per-token loss and gradient, for every installed method and the round-1 stacks.

Each method is exercised with the data its :meth:`~grpo_plugins.Method.example` declares (named reward
components, dataset columns, completion texts, group sizes); the batch is built by the conformance
suite's :func:`~grpo_plugins.conformance.example_batch` and handed to
:func:`grpo_plugins_trl.testing.trl_loss_on_batch` and :func:`grpo_plugins_verl.testing.verl_loss_on_batch`.
A method that cannot run on one of the trainers fails here with its error (never a silent skip).

The loss aggregations are paired as the adapters map them: TRL ``dapo`` = verl ``token-mean``, TRL
``grpo`` = verl ``seq-mean-token-mean``, TRL ``dr_grpo`` = verl ``seq-mean-token-sum-norm`` (with
``max_completion_length`` = the batch's width). The built-in ``grpo`` runs with one epsilon on both (the
adapters default it to each trainer's own: 1e-4 on TRL, 1e-6 on verl). Tolerance: 1e-6 relative (the
trainers' own arithmetic for the plain group statistics differs in the last bits; everything else runs
the same core code).
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("verl")

import torch  # noqa: E402

import grpo_plugins_verl  # noqa: E402
from grpo_plugins import Composition, CompositionError  # noqa: E402
from grpo_plugins.conformance import Subject, example_batch, example_row, installed_methods, rows_of  # noqa: E402
from grpo_plugins.example import Example  # noqa: E402
from grpo_plugins_trl.testing import tiny_model, tiny_tokenizer, trl_loss_on_batch  # noqa: E402
from grpo_plugins_verl.testing import verl_loss_on_batch  # noqa: E402

AGGREGATIONS = {"dapo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm"}
"""TRL ``loss_type`` -> the verl ``loss_agg_mode`` that normalises the same way."""
GRPO = {"grpo": {"epsilon": 1e-4}}
"""The built-in estimator's config on both trainers."""
STACKS = {
    "vade+sapo": ["vade", "sapo"],
    "knapsack_rl+gdpo": ["knapsack_rl", "gdpo"],
    "unlikeliness+sapo": ["unlikeliness", "sapo"],
    "spo+knapsack_rl": [{"spo": {"use_advantage": False}}, "knapsack_rl"],
    "ngrpo+gtpo+llds": ["ngrpo", {"gtpo": {"own_advantages": False, "unclipped_loss": False, "entropy_threshold": 10.0,
                                           "entropy_scale": 0.01}}, {"llds": {"normaliser": "policy"}}],
}
"""Round 1's compositions (as ``tests/integration`` composes them)."""
TOLERANCE = dict(rtol=1e-6, atol=1e-6)
# One model gives both passes on TRL (its log-probs are fixed in the test), so the old policy's token
# entropies (GRPOBatch.old_entropies) are the entropies the loss sees; verl gets the same. The old policy's
# log-probs at other temperatures (GRPOBatch.old_log_probs_at) are the example batch's, on both. The old-policy
# probe (GRPOBatch.probes) runs TRL's tiny model on both: TRL's own, and on verl the same weights (tiny_model(0))
# through the actor workers' probe, on the same rows (TRL's one-token prompt, then each completion).


@pytest.fixture(autouse=True)
def clean_verl_runtime():
    yield
    grpo_plugins_verl.configure(None)


def with_grpo(methods: list) -> list:
    """``methods`` with the built-in ``grpo`` configured alike on both trainers (its own config wins)."""
    out = []
    for method in methods:
        if method == "grpo" or (isinstance(method, dict) and "grpo" in method):
            method = {"grpo": {**GRPO["grpo"], **(method["grpo"] if isinstance(method, dict) else {})}}
        out.append(method)
    return out if any(isinstance(m, dict) and "grpo" in m for m in out) else [GRPO, *out]


def example_dataset(example: Example):
    """The example's dataset for TRL's start-up check (its columns) and sampler."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"prompt {i}", "answer": "0", **example_row(example, i)}
                              for i in range(example.dataset_size)])


def generation_batch(example: Example, seed: int = 0, num_tokens: int = 6) -> dict:
    """The example's batch, grouped contiguously (as TRL generates it), with current log-probs near the old
    ones and token entropies, token ids within the tiny TRL vocabulary (16 tokens: a method may run the
    model on them): the keyword arguments both ``*_loss_on_batch`` helpers take."""
    size = max(example.rollouts_per_prompt, example.min_group_size)
    batch = example_batch(example, [size] * example.round_prompts, seed, num_tokens=num_tokens)
    batch = rows_of(batch, torch.sort(batch.prompt_ids, stable=True).indices)
    gen = torch.Generator().manual_seed(seed + 1)
    keep = batch.completion_mask > 0
    noise, entropies = torch.randn(keep.shape, generator=gen), torch.rand(keep.shape, generator=gen) * 3
    return dict(
        prompt_ids=batch.prompt_ids, rewards=batch.rewards,
        completion_ids=torch.where(keep, 3 + batch.completion_ids % 13, 0), completion_mask=keep.long(),
        old_log_probs=batch.old_log_probs, log_probs=torch.where(keep, batch.old_log_probs + 0.1 * noise, 0.0),
        entropies=torch.where(keep, entropies, 0.0),
        ref_log_probs=batch.ref_log_probs, reward_components=batch.reward_components, reward_names=batch.reward_names,
        prompts=batch.prompts, completions=batch.completions, rows=batch.rows,
        old_log_probs_at=batch.old_log_probs_at or None,  # the old policy's passes at other temperatures
    )


def refusal(run) -> tuple[object, CompositionError | None]:
    """``run()``'s result, or the start-up refusal (the capability check) it raised."""
    try:
        return run(), None
    except CompositionError as error:
        return None, error


def assert_same_on_both(methods: list, example: Example, loss_type: str = "dapo", seed: int = 0) -> tuple:
    """Both adapters on one batch: equal advantages, per-token loss, loss and gradient; or, where one trainer
    cannot provide what a method needs, its start-up refusal naming the method (the other still runs)."""
    data = generation_batch(example, seed)
    mask = data["completion_mask"].bool()
    methods = with_grpo(methods)
    total_steps = example.total_steps or 2
    trl, trl_refused = refusal(lambda: trl_loss_on_batch(methods, **data, loss_type=loss_type, max_steps=total_steps,
                                                         dataset=example_dataset(example)))
    verl, verl_refused = refusal(lambda: verl_loss_on_batch(
        methods, **data, old_entropies=data["entropies"], total_steps=total_steps, loss_agg_mode=AGGREGATIONS[loss_type],
        probe_model=tiny_model(), prompt_token=tiny_tokenizer().bos_token_id))
    names = [next(iter(m)) if isinstance(m, dict) else m for m in methods]
    assert not (trl_refused and verl_refused), \
        f"{names} run on neither trainer:\nTRL: {trl_refused}\nverl: {verl_refused}"
    for refused in (trl_refused, verl_refused):
        if refused is not None:
            assert any(f"method '{name}'" in str(refused) for name in names), refused
            return trl, verl
    # TRL folds token weights into the advantages when its own loss runs; the verl loss carries them
    folds = verl.token_weights is not None and not Composition(methods).has_loss_hooks
    expected = verl.advantages * verl.token_weights if folds else verl.advantages
    trl_advantages = trl.advantages if trl.advantages.dim() == 2 else trl.advantages[:, None].expand_as(mask)
    torch.testing.assert_close(torch.where(mask, trl_advantages, 0.0), expected, **TOLERANCE, msg="advantages differ")
    torch.testing.assert_close(trl.per_token_loss, verl.per_token_loss, **TOLERANCE, msg="per-token losses differ")
    torch.testing.assert_close(trl.loss, verl.loss, **TOLERANCE, msg="losses differ")
    torch.testing.assert_close(trl.grad, verl.grad, **TOLERANCE, msg="gradients differ")
    return trl, verl


@pytest.mark.parametrize("name", installed_methods())
def test_every_installed_method_is_the_same_on_trl_and_verl(name):
    subject = Subject.of(name)
    assert_same_on_both(subject.run_list(), subject.example)


@pytest.mark.parametrize("loss_type", sorted(AGGREGATIONS))
def test_plain_grpo_is_the_same_on_trl_and_verl_in_every_aggregation(loss_type):
    _, verl = assert_same_on_both([], Example(), loss_type)
    assert verl.grad.abs().sum() > 0  # the batch has signal: the comparison is not of zeros


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_round_one_stacks_are_the_same_on_trl_and_verl(stack):
    methods = STACKS[stack]
    missing = sorted({next(iter(m)) if isinstance(m, dict) else m for m in methods} - set(installed_methods()))
    assert not missing, f"round-1 method(s) {missing} are not installed"
    trl, verl = assert_same_on_both(methods, Example(), loss_type="grpo")
    assert trl is not None and verl is not None, f"{stack} must run on both trainers"
    assert verl.grad.abs().sum() > 0


LOSS_SIDE = ["rec", "copg", "disco", "reg_grpo", "rank_grpo"]
"""Methods that replace or extend the policy objective (loss terms with their own normaliser, whole groups)."""


@pytest.mark.parametrize("name", LOSS_SIDE)
def test_loss_side_objectives_agree_on_trl_and_verl(name):
    """Both adapters run them (neither refuses) with equal loss and gradient on one batch."""
    assert name in installed_methods(), f"{name} is not installed"
    subject = Subject.of(name)
    trl, verl = assert_same_on_both(subject.run_list(), subject.example)
    assert trl is not None and verl is not None, f"{name} must run on both trainers"
    assert verl.grad.abs().sum() > 0


def test_old_log_probs_at_other_temperatures_agree_on_trl_and_verl():
    """``dcpo`` reads the old policy's log-probs at 0.8, 1 and 1.2 (``GRPOBatch.old_log_probs_at``): both adapters
    provide them (neither refuses) and give equal advantages, loss and gradient on one batch."""
    assert "dcpo" in installed_methods(), "dcpo is not installed"
    subject = Subject.of("dcpo")
    trl, verl = assert_same_on_both(subject.run_list(), subject.example)
    assert trl is not None and verl is not None, "dcpo must run on both trainers"
    mask = generation_batch(subject.example)["completion_mask"].bool()
    spread = torch.where(mask, verl.advantages, -torch.inf).amax(1) - torch.where(mask, verl.advantages, torch.inf).amin(1)
    assert bool((spread > 0).any())  # the second ratio pi_old^tau / pi_old varies along a correct completion
    assert verl.grad.abs().sum() > 0


def test_old_policy_probe_agrees_on_trl_and_verl():
    """``tw_grpo`` weights tokens by the group's divergence of the old policy's full distributions
    (``GRPOBatch.probes``): both adapters run the probe (neither refuses) and give equal token weights,
    advantages, loss and gradient on one batch."""
    assert "tw_grpo" in installed_methods(), "tw_grpo is not installed"
    subject = Subject.of("tw_grpo")
    trl, verl = assert_same_on_both(subject.run_list(), subject.example)
    assert trl is not None and verl is not None, "tw_grpo must run on both trainers"
    mask = generation_batch(subject.example)["completion_mask"].bool()
    assert bool((verl.token_weights[mask] > 1).any())  # the probe's divergences give weights above 1
    assert verl.grad.abs().sum() > 0


def test_the_hook_table_names_the_adapters_that_run_each_hook_outside_the_standard_set(tmp_path):
    """``docs/hooks.md`` says which adapters run a hook outside the standard set (``Hook.runs_on``): exactly
    those adapters provide its feature at their default settings (verl: with the ``grpo_plugins`` trainer)."""
    from hydra import compose, initialize_config_module
    from trl import GRPOConfig

    from grpo_plugins.hooktable import TABLE
    from grpo_plugins_trl.trainer import trl_capabilities
    from grpo_plugins_verl.capabilities import verl_capabilities

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        verl_config = compose(config_name="ppo_trainer", overrides=["trainer.v1.trainer_mode=grpo_plugins"])
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, report_to=[], use_cpu=True,
                      bf16=False)
    features = {"TRL": trl_capabilities(args).features, "verl": verl_capabilities(verl_config).features}
    outside = [hook for hook in TABLE if not hook.provided]
    assert outside
    for hook in outside:
        assert {name for name, provided in features.items() if hook.feature in provided} == set(hook.runs_on), hook.name
