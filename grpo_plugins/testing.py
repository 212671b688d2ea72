"""The author kit: a pytest plugin (registered under ``pytest11``) for testing method plugins.

Fixtures:
    ``grpo_batch``: a tiny synthetic global batch with uneven groups (sizes 3, 1, 4, 2), masks and
        old/reference log-probs.
    ``enable_methods``: builds a :class:`Composition` from a method list through real discovery,
        for one test.
Helpers:
    :func:`make_batch`, :func:`run_advantage_stage`, :class:`BatchRecorder` (a method keeping every batch
    ``observe`` sees); for prompt samplers :func:`play_sampler_rounds` (plan rounds and observe their
    outcomes), :func:`resumed_sampler_rounds` (a run saved and resumed mid-way against a straight one) and
    :class:`FirstPrompts` (a second sampler, for conflict tests); for a method's speed notes :func:`best_of`
    and :func:`cpu_single_thread`.
Option:
    ``--grpo-plugins-conformance=NAME``: run the conformance suite (:mod:`grpo_plugins.conformance`)
    against the installed method ``NAME`` instead of the tests named on the command line
    (``grpo-plugins test NAME`` does the same).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
import torch

from grpo_plugins.batch import GRPOBatch, PromptRound
from grpo_plugins.composition import Composition
from grpo_plugins import hookimpl
from grpo_plugins.method import Method


def make_batch(
    group_sizes: Sequence[int] = (3, 1, 4, 2),
    num_tokens: int = 6,
    rewards: Sequence[float] | torch.Tensor | None = None,
    num_components: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    **fields: Any,
) -> GRPOBatch:
    """A synthetic ``GRPOBatch``: groups of the given sizes (prompt ids 10, 11, ...).

    With ``shuffle`` (the default) the completions are in random order, so a method cannot rely on
    groups being contiguous; ``rewards`` are then read in that batch order (see ``batch.prompt_ids``).
    With ``shuffle=False`` the groups are contiguous in the order of ``group_sizes``.
    Completion lengths vary in ``[1, num_tokens]``; rewards are 0/1 unless given; log-probs are
    random negatives. Extra keyword arguments override ``GRPOBatch`` fields.
    """
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(GRPOBatch)})
    if unknown:
        raise TypeError(f"make_batch: {unknown} are not GRPOBatch fields")
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.repeat_interleave(torch.arange(len(group_sizes)) + 10, torch.tensor(group_sizes))
    order = torch.randperm(prompt_ids.numel(), generator=gen)
    if shuffle:
        prompt_ids = prompt_ids[order]
    n = prompt_ids.numel()
    lengths = torch.randint(1, num_tokens + 1, (n,), generator=gen)
    mask = (torch.arange(num_tokens) < lengths[:, None]).float()
    components = torch.randint(0, 2, (n, num_components), generator=gen).float()
    reward_tensor = components.sum(1) if rewards is None else torch.as_tensor(rewards, dtype=torch.float32)
    batch = GRPOBatch(
        prompt_ids=prompt_ids,
        rewards=reward_tensor,
        reward_components=components,
        reward_names=tuple(f"reward_{k}" for k in range(num_components)),
        reward_weights=torch.ones(num_components),
        completion_ids=torch.randint(5, 50, (n, num_tokens), generator=gen) * mask.long(),
        completion_mask=mask,
        old_log_probs=-torch.rand(n, num_tokens, generator=gen) * 3 * mask,
        ref_log_probs=-torch.rand(n, num_tokens, generator=gen) * 3 * mask,
        rows=[{"prompt_id": int(i)} for i in prompt_ids],
    )
    for key, value in fields.items():
        setattr(batch, key, value)
    return batch


def method_with(name: str, needs: Any = None, requires: Any = None, **hooks: Callable) -> Method:
    """A ``Method`` instance called ``name`` whose hooks are the given functions, each taking any subset
    of its hook's keyword arguments (``method_with("double", shape_rewards=lambda rewards: 2 * rewards)``),
    with ``needs()`` returning ``needs`` and ``requires()`` returning ``requires`` when given: a stand-in
    for another method in composition tests."""
    attrs: dict[str, Any] = {"name": name, **{hook: staticmethod(hookimpl(f)) for hook, f in hooks.items()}}
    if needs is not None:
        attrs["needs"] = lambda self: needs
    if requires is not None:
        attrs["requires"] = lambda self: set(requires)
    return type(f"Method_{name}", (Method,), attrs)()


class BatchRecorder(Method):
    """A method that changes nothing and keeps every batch ``observe`` sees (``batches``) and its step
    (``steps``); ``needs``: batch fields it requires, so that the adapter fills them."""

    name = "recorder"

    def __init__(self, needs: Sequence[str] = ()):
        super().__init__()
        self.fields = set(needs)
        self.batches: list[GRPOBatch] = []
        self.steps: list[int] = []

    def requires(self) -> set[str]:
        return self.fields

    @hookimpl
    def observe(self, batch: GRPOBatch, step: int) -> None:
        self.batches.append(batch)
        self.steps.append(step)


class FirstPrompts(Method):
    """A prompt sampler that draws the first ``num_prompts`` prompts of the dataset (cycling): a second
    provider of ``sample_prompts``, for a sampler's conflict tests."""

    name = "first_prompts"

    @hookimpl
    def sample_prompts(self, round: PromptRound, generator: torch.Generator) -> torch.Tensor:
        return torch.arange(round.num_prompts) % round.dataset_size


def sampler_outcomes(prompt_ids: torch.Tensor, counts: torch.Tensor) -> GRPOBatch:
    """The scored batch of a planned round: ``counts[i]`` completions of prompt ``prompt_ids[i]`` with a
    deterministic 0/1 reward ``(5 p + row) mod 3 == 0`` and 5 completion tokens ``(p + k·row) mod 7``."""
    rows = torch.repeat_interleave(prompt_ids, counts)
    index = torch.arange(rows.numel())
    return GRPOBatch(prompt_ids=rows, rewards=((rows * 5 + index) % 3 == 0).float(),
                     completion_ids=(rows[:, None] + torch.arange(5) * index[:, None]) % 7,
                     completion_mask=torch.ones(rows.numel(), 5))


def play_sampler_rounds(composition: Composition, generator: torch.Generator, plan: Callable[[int], PromptRound],
                        rounds: int, start: int = 0,
                        outcomes: Callable[[torch.Tensor, torch.Tensor], GRPOBatch] = sampler_outcomes) -> list:
    """Rounds ``start .. start + rounds - 1``: plan each (``plan(r)``) with the composition's
    ``sample_prompts`` and ``rollout_counts``, then ``observe`` its ``outcomes`` at step ``r + 1``.
    Returns ``[(prompt ids, rollout counts)]`` per round, as lists."""
    out = []
    for r in range(start, start + rounds):
        round_ = plan(r)
        ids = composition.run_sample_prompts(round_, generator)
        counts = composition.rollout_counts(round_, ids)
        out.append((ids.tolist(), counts.tolist()))
        composition.run_observe(outcomes(ids, counts), r + 1)
    return out


def resumed_sampler_rounds(methods: Sequence[Any] | Callable[[], Sequence[Any]], directory: str | Path,
                           plan: Callable[[int], PromptRound], seed: int = 0, rounds: int = 9,
                           resume_at: int = 6) -> tuple[list, list]:
    """``(straight, resumed)``: the rounds of one uninterrupted run of ``methods``, and of a run saved after
    ``resume_at`` rounds (state in ``directory``), loaded into a new composition and continued with the
    generator's state; a sampler that checkpoints all it needs gives equal lists.

    ``methods``: names and configs (each run builds new method objects), or a function returning a new
    method list (for method objects, which a composition does not copy)."""
    build = methods if callable(methods) else (lambda: methods)
    straight = play_sampler_rounds(Composition(build()), torch.Generator().manual_seed(seed), plan, rounds)
    first, generator = Composition(build()), torch.Generator().manual_seed(seed)
    head = play_sampler_rounds(first, generator, plan, resume_at)
    path = Path(directory) / "state.pt"
    first.save(path)
    resumed = Composition(build())
    resumed.load(path)
    tail = play_sampler_rounds(resumed, torch.Generator().set_state(generator.get_state()), plan,
                               rounds - resume_at, start=resume_at)
    return straight, head + tail


def run_advantage_stage(methods: Sequence[Any], batch: GRPOBatch, **kwargs: Any) -> GRPOBatch:
    """Enable ``methods`` (names, ``{name: config}``) and run the advantage-stage hooks on ``batch``."""
    return Composition(methods, **kwargs).run_advantage_stage(batch)


def best_of(fn, repeats: int = 5, clock=time.perf_counter) -> float:
    """Best of ``repeats`` timings of ``fn()`` in seconds (``clock``: wall or process CPU time)."""
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def cpu_single_thread(fn, repeats: int = 5) -> float:
    """Best single-thread CPU time: stable on a shared machine where wall time depends on other load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best_of(fn, repeats, time.process_time)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def grpo_batch() -> GRPOBatch:
    """A tiny batch: groups of sizes 3, 1, 4, 2 in shuffled order, 6 tokens, 0/1 rewards."""
    return make_batch()


@pytest.fixture
def enable_methods():
    """``enable_methods(["spo", {"gtpo": {...}}])`` -> a Composition built through real discovery."""
    return lambda methods, **kwargs: Composition(methods, **kwargs)


def pytest_addoption(parser) -> None:
    group = parser.getgroup("grpo_plugins", "grpo-plugins author kit")
    group.addoption(
        "--grpo-plugins-conformance",
        dest="grpo_plugins_conformance",
        metavar="NAME",
        default=None,
        help="run the grpo-plugins conformance suite against the installed method NAME (and nothing else)",
    )


def pytest_configure(config) -> None:
    """With ``--grpo-plugins-conformance=NAME``, collect only the conformance suite's test class."""
    if config.getoption("grpo_plugins_conformance", None):
        from grpo_plugins import conformance

        config.args[:] = [conformance.__file__]
