"""The conformance suite: every guarantee the project makes about methods, checked against one method.

Run it against any installed method::

    pytest --grpo-plugins-conformance=NAME        # or: grpo-plugins test NAME

or from a distribution's own tests, by subclassing the test class::

    from grpo_plugins.conformance import MethodConformance

    class TestConformance(MethodConformance):
        method = "my_method"

What it checks (one test each, every check a plain function of this module raising
:class:`ConformanceError`):

- ``declaration``: the method is discovered, has a summary, an :class:`~grpo_plugins.example.Example`,
  and a plugin-API range (:mod:`grpo_plugins.api`) that admits this core and covers the hooks it uses;
- ``config``: every option has help, a paper value and a domain; out-of-domain values are refused;
- ``hook_contracts``: round planning, the advantage stage, the loss stage and ``observe`` on random
  batches with uneven groups, padding, several reward components, a one-token batch and an empty
  completion: every output meets its contract (the core checks each), losses, gradients and metrics
  are finite;
- ``small_groups``: a group of one runs where the method accepts it (``Example.min_group_size``) and is
  refused with an error where it does not;
- ``constant_groups``: a group whose rewards are all equal gets exactly zero advantage (estimators);
- ``nan_padding``: NaN in every padded float position, and a junk id in every padded position of the
  completion ids, change no output, loss, gradient or state;
- ``permutation``: permuting the rows of a batch permutes the outputs and changes nothing else;
- ``state``: ``state_dict`` holds tensors and plain values only and round-trips through a real
  checkpoint file; a resumed method produces what an uninterrupted one does on the next steps;
- ``data_parallel``: the same batch over 2 gloo ranks gives the 1-rank result (round planning,
  ``observe`` and state on the gathered batch; the advantage stage on group-aligned shards, where
  every batch-global statistic must be reduced across ranks; the loss stage on row shards);
- ``needs``: a batch or loss field an adapter may leave empty, and a dataset column, is read only if
  the method declares it (``Method.requires`` / ``Method.needs``).

A method is exercised with the data its :meth:`~grpo_plugins.Method.example` declares; a method the
suite cannot run fails with the error it raised (never a silent skip). A check that does not apply
(constant groups for a method that computes no advantages) is skipped with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import socket
import tempfile
import traceback
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

import pytest
import torch

from grpo_plugins.api import check_supported, method_range, range_problems
from grpo_plugins.batch import GRPOBatch, LossInputs, PromptRound, RunContext
from grpo_plugins.build import hooks_of
from grpo_plugins.composition import Composition
from grpo_plugins.config import Range, build_config, undeclared_domains
from grpo_plugins.errors import ConfigError, GRPOPluginsError
from grpo_plugins.example import Example
from grpo_plugins.injection import parse_rows
from grpo_plugins.method import Method
from grpo_plugins.parallel import ParallelContext
from grpo_plugins.probe import LinearProbe
from grpo_plugins.registry import discover, resolve
from grpo_plugins.steps import Steps
from grpo_plugins.surrogates import ppo_clip_loss

OPTIONAL_BATCH_FIELDS = ("completion_ids", "old_log_probs", "ref_log_probs", "prompts", "completions", "rows",
                         "old_entropies", "steps")
"""``GRPOBatch`` fields an adapter fills only when a method declares them (``Method.requires`` or
``needs().batch_fields``): verl fills none of them unasked, TRL no ``old_log_probs`` in on-policy runs."""
OPTIONAL_LOSS_FIELDS = ("ref_log_probs", "entropies", "row_data", "group_index")
"""``LossInputs`` fields an adapter may leave empty unless a method declares them (``needs().loss_fields``)."""
GROUP_KEY_COLUMN = "prompt_id"
"""A dataset column the adapters use as the group key instead of the row's index, when present."""
SETUP_FEATURES = frozenset(("method_setup", "step_generator"))
PROBE_POSITIONS = 512
"""Completion positions of the reference model behind the probes of the suite's batches."""
NON_DYADIC_REWARDS = (0.3, 7.782482, 123.4, 1e4)
"""Constant group rewards checked when a method accepts any reward: the float mean of none is exact."""


class ConformanceError(AssertionError):
    """A method breaks a guarantee of the conformance suite; the message names the method and the check."""


# ----------------------------------------------------------------------------- the method under test
@dataclass(frozen=True)
class Subject:
    """A method under test: an installed method by name, or a ``Method`` class (tests of the suite).

    Attributes:
        name: the method's name.
        cls: its class; None to load it through discovery (as a run does).
    """

    name: str
    cls: type | None = None

    @classmethod
    def of(cls, target: "str | type | Subject") -> "Subject":
        """A subject from a method name, a ``Method`` subclass or a subject."""
        if isinstance(target, Subject):
            return target
        if isinstance(target, type) and issubclass(target, Method):
            return cls(target.name, target)
        return cls(str(target))

    @property
    def method_class(self) -> type:
        if self.cls is not None:
            check_supported(self.cls, self.distribution)
            return self.cls
        return resolve(self.name).load()

    @property
    def distribution(self) -> str:
        return f"<class from {self.cls.__module__}>" if self.cls is not None else resolve(self.name).distribution

    @property
    def example(self) -> Example:
        example = self.method_class.example()
        if not isinstance(example, Example):
            raise ConformanceError(
                f"method '{self.name}': example() must return a grpo_plugins.example.Example, got {type(example).__name__}"
            )
        return example

    def run_list(self) -> list[Any]:
        """The run's method list: the example's companions, then the method with the example's config."""
        example = self.example
        if self.cls is None:
            own: Any = {self.name: dict(example.config)}
        else:
            own = self.cls(build_config(self.cls.Config, dict(example.config), self.name, self.distribution))
        return [*example.methods, own]

    def composition(self, context: bool = True) -> Composition:
        """A fresh composition of the example run (``setup`` run when the method needs it)."""
        try:
            composition = Composition(self.run_list())
        except GRPOPluginsError as error:
            raise ConformanceError(f"method '{self.name}': its example run cannot be built: {error}") from error
        needs = composition.needs()[self.name]
        if context and needs.features & SETUP_FEATURES:
            example = self.example
            composition.run_setup(RunContext(trainer="conformance suite", seed=1234, dataset_size=example.dataset_size,
                                             total_steps=example.total_steps))
        return composition


def installed_methods() -> list[str]:
    """Names of every installed method (the built-in ``grpo`` included), sorted."""
    return sorted(discover()[0])


# ----------------------------------------------------------------------------- example data
def group_sizes_for(example: Example, sizes: Sequence[int]) -> tuple[int, ...]:
    """``sizes`` raised to the example's smallest accepted group."""
    return tuple(max(size, example.min_group_size) for size in sizes)


def example_batch(
    example: Example,
    group_sizes: Sequence[int],
    seed: int,
    num_tokens: int = 7,
    step: int = 1,
    prompt_ids: Sequence[int] | None = None,
    group_rewards: Sequence[float] | None = None,
    empty_row: bool = False,
    padding: float = 0.0,
    parallel: ParallelContext | None = None,
) -> GRPOBatch:
    """A global batch as an adapter builds it, from the example's declaration.

    Groups of ``group_sizes`` completions (prompts ``prompt_ids``, or distinct random dataset indices)
    in shuffled order; completion lengths in ``[1, num_tokens]`` (one of full length; with ``empty_row``
    one completion keeps no token, as a masked truncated completion); every reward component drawn from
    ``example.reward_values`` (``{0, 1}`` when None), or, with ``group_rewards``, constant within each
    group (group ``g``'s value ``group_rewards[g]`` divided among the components); padded token
    positions of the float token tensors hold ``padding``.
    """
    gen = torch.Generator().manual_seed(seed)
    g = len(group_sizes)
    if prompt_ids is None:
        prompt_ids = torch.randperm(example.dataset_size, generator=gen)[:g].tolist()
    ids = torch.repeat_interleave(torch.as_tensor(list(prompt_ids), dtype=torch.long), torch.tensor(list(group_sizes)))
    group_of_row = torch.repeat_interleave(torch.arange(g), torch.tensor(list(group_sizes)))
    order = torch.randperm(ids.numel(), generator=gen)
    ids, group_of_row = ids[order], group_of_row[order]
    n, k = ids.numel(), len(example.reward_names)
    lengths = torch.randint(1, num_tokens + 1, (n,), generator=gen)
    lengths[int(torch.randint(0, n, (1,), generator=gen))] = num_tokens
    if empty_row and n > 1:
        lengths[int(lengths.argmin())] = 0
    keep = torch.arange(num_tokens) < lengths[:, None]
    mask = keep.float()
    values = torch.tensor([0.0, 1.0] if example.reward_values is None else list(example.reward_values))
    if group_rewards is None:
        components = values[torch.randint(0, values.numel(), (n, k), generator=gen)]
    else:
        per_group = torch.as_tensor(list(group_rewards), dtype=torch.float32)
        share = per_group if example.reward_values is not None else per_group / k
        components = share[group_of_row][:, None].expand(n, k).clone()
    completion_ids = torch.randint(5, 60, (n, num_tokens), generator=gen) * keep.long()
    real_ids = completion_ids
    if padding != 0.0:  # the padded run: junk ids (not the pad id 0) where the mask is 0
        completion_ids = torch.where(keep, completion_ids, torch.full_like(completion_ids, JUNK_ID))

    def log_probs() -> torch.Tensor:
        values = -torch.rand(n, num_tokens, generator=gen) * 3
        return torch.where(keep, values, torch.full_like(values, padding))

    texts = list(example.completions)
    pick = torch.randint(0, max(len(texts), 1), (n,), generator=gen).tolist()
    completions = [texts[i] for i in pick] if texts else [" ".join(f"t{t}" for t in row[row > 0].tolist()) for row in real_ids]
    prompt_texts = list(example.prompts)
    rows = [example_row(example, i) for i in ids.tolist()]
    # a dataset column 'prompt_id' is the group key the adapters use (several rows may share a group)
    group_ids = torch.tensor([int(row["prompt_id"]) for row in rows]) if GROUP_KEY_COLUMN in example.columns else ids
    return GRPOBatch(
        prompt_ids=group_ids,
        rewards=components.sum(1),
        reward_components=components,
        reward_names=tuple(example.reward_names),
        reward_weights=torch.ones(k),
        completion_ids=completion_ids,
        completion_mask=mask,
        old_log_probs=log_probs(),
        ref_log_probs=log_probs(),
        prompts=[prompt_texts[i % len(prompt_texts)] if prompt_texts else f"prompt {i}" for i in ids.tolist()],
        completions=completions,
        rows=rows,
        step=step,
        total_steps=example.total_steps,
        parallel=parallel or ParallelContext(),
        old_entropies=torch.where(keep, torch.rand(n, num_tokens, generator=gen), torch.full((n, num_tokens), padding)),
        old_log_probs_at={float(tau): log_probs() for tau in example.temperatures},
        steps=two_turn_steps(lengths, ids, components.sum(1)),
    )


def two_turn_steps(lengths: torch.Tensor, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> Steps:
    """Multi-turn records for an example batch: each row one trajectory, split into two turns (one when it
    holds a single token, none when empty); every trajectory of a prompt starts from the same state (the
    first turns share a key), the second turn's state is one of two per prompt; the outcome reward is the
    last turn's step reward, the first turn has none (NaN)."""
    rows = torch.arange(lengths.numel())
    first_end = (lengths + 1) // 2
    second = lengths >= 2
    row = torch.cat([rows[lengths >= 1], rows[second]])
    start = torch.cat([torch.zeros_like(first_end)[lengths >= 1], first_end[second]])
    end = torch.cat([first_end[lengths >= 1], lengths[second]])
    turn = torch.cat([torch.zeros_like(rows)[lengths >= 1], torch.ones_like(rows)[second]])
    key = prompt_ids[row] * 4 + turn * (1 + row % 2)
    last = (turn == 1) | ~second[row]
    reward = torch.where(last, rewards[row].float(), torch.full_like(rewards[row].float(), float("nan")))
    return Steps(row=row, start=start, end=end, trajectory=row, turn=turn, reward=reward, key=key)


def example_row(example: Example, prompt_id: int) -> dict[str, Any]:
    """The dataset row of ``prompt_id``: every column of the example."""
    return {name: value(prompt_id) for name, value in example.columns.items()}


def rows_of(batch: GRPOBatch, index: torch.Tensor) -> GRPOBatch:
    """The batch restricted to the rows ``index`` (in that order)."""
    changes: dict[str, Any] = {}
    n = batch.num_completions
    for f in dataclasses.fields(GRPOBatch):
        value = getattr(batch, f.name)
        if f.name in ("reward_weights", "reward_names", "parallel", "step", "total_steps", "old_log_probs_at", "row_data"):
            continue
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
            changes[f.name] = value[index]
        elif isinstance(value, list) and len(value) == n:
            changes[f.name] = [value[i] for i in index.tolist()]
    if batch.steps is not None:
        changes["steps"] = batch.steps.rows_of(index, n)
    if batch.old_log_probs_at:  # {temperature: (N, T)}
        changes["old_log_probs_at"] = {tau: value[index] for tau, value in batch.old_log_probs_at.items()}
    return dataclasses.replace(batch, **changes)


def without_fields(batch: GRPOBatch, fields: Iterable[str]) -> GRPOBatch:
    """The batch with the named optional fields left empty, as an adapter that does not fill them."""
    return dataclasses.replace(batch, **{name: None for name in fields})


# ----------------------------------------------------------------------------- one step of a run
def trainer_surrogate(inputs: LossInputs) -> torch.Tensor:
    """The trainer's PPO-clip per-token loss ``-min(rho A, clip(rho) A)`` ``(B, T)``."""
    ratio = torch.exp(inputs.log_probs - inputs.old_log_probs)
    clipped = ratio.clamp(1 - inputs.clip_low, 1 + inputs.clip_high)
    return ppo_clip_loss(ratio, inputs.advantages, inputs.clip_low, inputs.clip_high)


def plan_round(composition: Composition, example: Example, step: int, seed: int) -> dict[str, Any]:
    """Round planning as an adapter runs it: ``sample_prompts`` (or the trainer's draw), the rollout
    counts, ``augment_prompts``. Returns the prompt ids, counts and prompts."""
    round = PromptRound(
        num_prompts=example.round_prompts,
        budget=example.round_prompts * example.rollouts_per_prompt,
        dataset_size=example.dataset_size,
        step=step,
        default_rollouts=example.rollouts_per_prompt,
        total_steps=example.total_steps,
    )
    gen = torch.Generator().manual_seed(seed)
    chosen = composition.run_sample_prompts(round, gen)
    if chosen is None:
        chosen = torch.randperm(example.dataset_size, generator=gen)[: round.num_prompts]
    counts = composition.rollout_counts(round, chosen)
    texts = list(example.prompts)
    prompts = [texts[i % len(texts)] if texts else f"prompt {i}" for i in chosen.tolist()]
    augmented = composition.run_augment_prompts(round, chosen, prompts, [example_row(example, i) for i in chosen.tolist()])
    return {"prompt_ids": chosen, "counts": counts, "prompts": augmented}


def round_batch(example: Example, planned: Mapping[str, Any], seed: int, step: int, **kwargs: Any) -> GRPOBatch:
    """The generation batch of a planned round: one group per chosen prompt with its count of completions."""
    counts: dict[int, int] = {}
    for pid, count in zip(planned["prompt_ids"].tolist(), planned["counts"].tolist()):
        if count > 0:
            counts[pid] = counts.get(pid, 0) + count
    return example_batch(example, list(counts.values()), seed, step=step, prompt_ids=list(counts), **kwargs)


def loss_inputs(
    batch: GRPOBatch, seed: int, padding: float = 0.0, empty: Iterable[str] = (), row_order: torch.Tensor | None = None
) -> LossInputs:
    """One loss micro-batch holding the whole batch after the advantage stage; current log-probs near
    the old ones (with gradient); padded positions hold ``padding``; fields in ``empty`` left empty.
    ``row_order``: the batch is a permutation of another one; row ``j`` gets the random draws of that
    batch's row ``row_order[j]``."""
    mask = batch.completion_mask
    keep = mask > 0
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randn(mask.shape, generator=gen), torch.rand(mask.shape, generator=gen), torch.rand(mask.shape, generator=gen)
    noise, entropies, fallback_old = (d[row_order] for d in draws) if row_order is not None else draws
    advantages = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None].expand_as(mask)
    old = batch.old_log_probs if batch.old_log_probs is not None else -fallback_old

    def pad(values: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, values, torch.full_like(values, padding))

    log_probs = pad(old + 0.1 * noise).requires_grad_(True)
    reference = batch.ref_log_probs if batch.ref_log_probs is not None else old - 0.2
    fields = dict(
        log_probs=log_probs,
        old_log_probs=pad(old),
        advantages=pad(advantages.float()),
        mask=mask,
        ref_log_probs=pad(reference),
        entropies=pad(entropies),
        row_data=dict(batch.row_data),
        step=batch.step,
        group_index=batch.group_index,
    )
    for name in empty:
        fields[name] = {} if name == "row_data" else None
    return LossInputs(**fields)


def run_step(
    composition: Composition,
    batch: GRPOBatch,
    seed: int = 0,
    padding: float = 0.0,
    empty_loss: Iterable[str] = (),
    row_order: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The advantage stage, the loss stage on the whole batch (one micro-batch, token-mean loss with the
    token weights) and ``observe``: every output, the loss, its gradient, the state and the metrics."""
    attach_probes(composition, batch)
    composition.run_keep_rows(batch)  # batch editing (the trainer's refill is not simulated): its output contract
    # injected rows: the output contract and the rows' checks (the adapter's appending is not simulated here;
    # grpo_plugins.injection.append_rows builds such a batch for a method's own tests)
    parse_rows(composition.run_inject_rows(batch), batch.prompt_ids, composition.providers("inject_rows"))
    batch = composition.run_advantage_stage(batch)
    mask = batch.completion_mask
    weights = torch.ones_like(mask) if batch.token_weights is None else batch.token_weights
    inputs = loss_inputs(batch, seed, padding, empty_loss, row_order)
    parts = composition.run_loss_stage(inputs, trainer_surrogate)
    keep = mask > 0
    per_token = parts.policy * weights + sum(parts.terms.values(), torch.zeros_like(parts.policy))
    loss = torch.where(keep, per_token, 0.0).sum() / mask.sum().clamp(min=1)
    objectives = {key: term.values for key, term in parts.objectives.items()}
    loss.backward()
    advantages = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None].expand_as(mask)
    metrics = composition.pop_metrics()
    composition.run_observe(copy.copy(batch), step=batch.step)
    metrics.update(composition.pop_metrics())
    return {
        "rewards": batch.rewards.detach().clone(),
        "advantages": advantages.detach().clone(),
        "weights": weights.detach().clone(),
        "row_data": {k: v.detach().clone() for k, v in batch.row_data.items()},
        "policy": parts.policy.detach(),
        "terms": {k: v.detach() for k, v in parts.terms.items()},
        "objectives": {k: v.detach() for k, v in objectives.items()},
        "loss": loss.detach(),
        "grad": log_probs_grad(inputs),
        "state": composition.state_dict(),
        "metrics": metrics,
        "mask": mask,
    }


def attach_probes(composition: Composition, batch: GRPOBatch) -> None:
    """The old-policy probes the methods request (and the update preview), on the core's reference model
    (:class:`grpo_plugins.probe.LinearProbe`), as an adapter attaches them before the advantage stage."""
    requests = {name: request for needs in composition.needs().values() for name, request in needs.probes.items()}
    if requests:
        batch.probes, batch.update_preview = {}, None  # the batch's own (rows_of shares the dict of its source)
        LinearProbe(max_positions=PROBE_POSITIONS).attach(batch, requests, default_rows=4)


def log_probs_grad(inputs: LossInputs) -> torch.Tensor:
    grad = inputs.log_probs.grad
    return torch.zeros_like(inputs.log_probs) if grad is None else grad.detach().clone()


# ----------------------------------------------------------------------------- comparing outputs
def differences(a: Any, b: Any, path: str = "", atol: float = 1e-6, rtol: float = 1e-5) -> list[str]:
    """Where two nested outputs (tensors, dicts, lists, numbers) differ, as readable paths."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return [f"{path}: {_shape(a)} vs {_shape(b)}"]
        if a.dtype == torch.bool or not (a.dtype.is_floating_point or b.dtype.is_floating_point):
            return [] if torch.equal(a, b) else [f"{path}: values differ"]
        x, y = a.double(), b.double()
        if torch.allclose(x, y, atol=atol, rtol=rtol, equal_nan=True):
            return []
        gap = (x - y).abs().nan_to_num(nan=float("inf")).max().item()
        return [f"{path}: values differ (largest difference {gap:.3g})"]
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for key in a for d in differences(a[key], b[key], f"{path}/{key}", atol, rtol)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]", atol, rtol)]
    if isinstance(a, float) and isinstance(b, float):
        same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
        return [] if same else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def raise_(error: Exception) -> typing.NoReturn:
    raise error


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def fail(subject: Subject, check: str, message: str) -> typing.NoReturn:
    raise ConformanceError(f"method '{subject.name}' fails conformance check '{check}': {message}")


def expect_same(subject: Subject, check: str, what: str, a: Any, b: Any, **tolerance: float) -> None:
    diffs = differences(a, b, **tolerance)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        fail(subject, check, f"{what}: {shown}")


def exercised(subject: Subject, check: str, run: Callable[[], Any]) -> Any:
    """``run()``, turning an error into a failure that says the method could not be exercised."""
    try:
        return run()
    except ConformanceError:
        raise
    except Exception as error:  # noqa: BLE001 - any error is the method's failure to run the example
        fail(
            subject, check,
            f"the method cannot be exercised on its example data: {type(error).__name__}: {error}\n"
            "If it needs other data (named rewards, dataset columns, completion texts, larger groups), declare it "
            "in its example() classmethod (grpo_plugins.example.Example).",
        )


# ----------------------------------------------------------------------------- the checks
def check_declaration(subject: Subject) -> None:
    """Discovered with a summary, an ``Example``, and a plugin-API range that admits this core and covers
    every hook the method implements."""
    try:
        cls = subject.method_class
    except GRPOPluginsError as error:
        fail(subject, "declaration", str(error))
    if not cls.summary():
        fail(subject, "declaration", "the class has no docstring (its first line is the summary `grpo-plugins list` shows)")
    hooks = hooks_of(cls)
    if not hooks:
        fail(subject, "declaration", "implements no hook")
    subject.example  # noqa: B018 - raises when example() returns something else
    problems = range_problems(cls, hooks)
    if problems:
        fail(subject, "declaration", f"plugin_api {method_range(cls)!r}: " + "; ".join(problems))


def out_of_domain_values(annotation: Any, domain: Range | None, default: Any) -> list[Any]:
    """Values a config field must refuse: beyond each bound of its domain, NaN and inf for a numeric
    field; a value of another type for a bool, ``Literal`` or ``str`` field."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return ["<not one of the choices>"]
    if annotation is bool:
        return ["yes"]
    if annotation is str:
        return [1]
    if typing.get_origin(annotation) is tuple:
        if not isinstance(default, tuple) or not default:
            return []
        return [(bad, *default[1:]) for bad in out_of_domain_values(args[0], domain, default[0])]
    if domain is None:
        return []
    is_int = annotation is int or (int in args and float not in args)
    bad: list[Any] = []
    if domain.low is not None:
        low = domain.low if domain.low_open else domain.low - 1
        bad.append(math.floor(low) if is_int else float(low))
    if domain.high is not None:
        high = domain.high if domain.high_open else domain.high + 1
        bad.append(math.ceil(high) if is_int else float(high))
    if not is_int:
        bad.append(float("nan"))
        if not domain.allow_inf:
            bad.append(float("inf"))
    return bad


def check_config(subject: Subject) -> None:
    """Every option has help, a paper value and a domain; out-of-domain values are refused; the default
    and the example's config build."""
    cls = subject.method_class
    config_cls = cls.Config
    fields = dataclasses.fields(config_cls)
    missing = [f.name for f in fields if not f.metadata.get("help") or "paper" not in f.metadata]
    if missing:
        fail(subject, "config", f"option(s) {missing} are not declared with option(default, help, paper=...)")
    undeclared = undeclared_domains(config_cls)
    if undeclared:
        fail(subject, "config", f"numeric option(s) {undeclared} declare no domain (option(..., domain=Range(...)))")
    for label, values in (("its default config", {}), ("its example's config", dict(subject.example.config))):
        try:
            build_config(config_cls, values, subject.name, "conformance")
        except ConfigError as error:
            fail(subject, "config", f"{label} is refused: {error}")
    hints = typing.get_type_hints(config_cls)
    accepted = []
    for f in fields:
        for value in out_of_domain_values(hints[f.name], f.metadata.get("domain"), f.default):
            try:
                build_config(config_cls, {f.name: value}, subject.name, "conformance")
            except ConfigError:
                continue
            accepted.append(f"{f.name}={value!r}")
    if accepted:
        fail(subject, "config", f"out-of-domain value(s) accepted: {', '.join(accepted)}")


BATCH_SHAPES: tuple[tuple[tuple[int, ...], int, bool], ...] = (
    ((3, 5, 2, 4, 8), 7, False),   # uneven groups
    ((2, 2, 2, 3), 1, False),      # one-token completions
    ((4, 3, 6), 9, True),          # an empty (fully masked) completion
)
"""``(group sizes, tokens, one empty completion)`` of the random batches (sizes raised to the method's
smallest accepted group)."""


def check_hook_contracts(subject: Subject, seeds: Sequence[int] = (0, 1)) -> None:
    """Every hook on random batches: round planning over three steps, then the advantage stage, the loss
    stage and ``observe`` on batches with uneven groups, one-token completions and an empty completion.
    The core checks each output against its contract; here losses, gradients and metrics must be finite."""
    example = subject.example
    composition = subject.composition()
    for step in range(3):
        exercised(subject, "hook_contracts", lambda: plan_round(composition, example, step, seed=100 + step))
    for seed in seeds:
        for i, (sizes, tokens, empty) in enumerate(BATCH_SHAPES):
            batch = example_batch(example, group_sizes_for(example, sizes), seed=10 * seed + i, num_tokens=tokens,
                                  step=seed * len(BATCH_SHAPES) + i + 1, empty_row=empty)
            out = exercised(subject, "hook_contracts", lambda: run_step(composition, batch, seed))
            where = f"batch of groups {sizes}, {tokens} tokens" + (", an empty completion" if empty else "")
            for key in ("loss", "grad"):
                if not bool(torch.isfinite(out[key]).all()):
                    fail(subject, "hook_contracts", f"{where}: the {key} is not finite")
            bad = sorted(k for k, v in out["metrics"].items() if not math.isfinite(v))
            if bad:
                fail(subject, "hook_contracts", f"{where}: metric(s) {bad} are not finite")


def check_small_groups(subject: Subject) -> None:
    """A batch holding a group smaller than ``Example.min_group_size`` is refused with an error (never
    trained on silently); where the method accepts groups of one, a batch of them runs."""
    example = subject.example
    if example.min_group_size == 1:
        batch = example_batch(example, (1, 3, 1, 2), seed=5)
        exercised(subject, "small_groups", lambda: run_step(subject.composition(), batch))
        return
    sizes = (example.min_group_size - 1, example.min_group_size, example.min_group_size + 1)
    batch = example_batch(example, sizes, seed=5)
    try:
        subject.composition().run_advantage_stage(batch)
    except GRPOPluginsError:
        return
    fail(subject, "small_groups",
         f"a group of {sizes[0]} completion(s) was accepted although Example.min_group_size is {example.min_group_size}: "
         "refuse it with a clear error, or lower min_group_size if the method handles it")


def check_constant_groups(subject: Subject) -> None:
    """A group whose rewards are all equal gets advantage exactly 0 (estimators: methods that implement
    ``compute_advantages``), at reward scales up to 1e4 where the method accepts any reward."""
    example = subject.example
    composition = subject.composition()
    if subject.name not in composition.providers("compute_advantages"):
        pytest.skip(f"not applicable: '{subject.name}' does not compute advantages")
    if example.nonzero_constant_groups:
        pytest.skip(f"'{subject.name}' gives constant groups non-zero advantages: {example.nonzero_constant_groups}")
    values = list(NON_DYADIC_REWARDS) if example.reward_values is None else list(example.reward_values)
    m = example.min_group_size
    sizes = group_sizes_for(example, (2, 3, 7, 12, 64))[: max(len(values), 2)]
    group_rewards = [values[g % len(values)] for g in range(len(sizes))]
    batch = example_batch(example, sizes, seed=3, group_rewards=group_rewards)
    out = exercised(subject, "constant_groups", lambda: composition.run_advantage_stage(batch))
    advantages = out.advantages
    if not bool((advantages == 0).all()):
        worst = advantages.abs().max().item()
        fail(subject, "constant_groups",
             f"groups of sizes {sizes} (min {m}) with constant rewards {group_rewards} got advantages up to {worst:.3g} "
             "instead of exactly 0 (guard the group std: torch.where(max == min, 0, ...)); if the method means it, "
             "say why in Example.nonzero_constant_groups")


JUNK_ID = 4
"""The token id the padded run of ``nan_padding`` puts in padded positions (a real id, not the pad id)."""


def check_nan_padding(subject: Subject) -> None:
    """NaN in every padded float position of every input, and a junk id in every padded position of the
    completion ids, change no output, loss, gradient or state."""
    example = subject.example
    sizes = group_sizes_for(example, (3, 2, 4, 2, 3))
    results = []
    for padding in (0.0, float("nan")):
        batch = example_batch(example, sizes, seed=3, padding=padding)
        results.append(exercised(subject, "nan_padding", lambda: run_step(subject.composition(), batch, 7, padding)))
    clean, padded = results
    keep = clean["mask"] > 0
    changed = "padding (NaN floats, junk ids) in padded positions changed"
    for key in ("advantages", "weights", "policy", "grad"):
        expect_same(subject, "nan_padding", f"{changed} {key} (real positions)",
                    padded[key][keep], clean[key][keep])
    for key in ("rewards", "loss", "row_data", "state", "metrics"):
        expect_same(subject, "nan_padding", f"{changed} {key}", padded[key], clean[key])
    for key in ("terms", "objectives"):
        expect_same(subject, "nan_padding", f"{changed} the loss {key}",
                    {k: v[keep] if v.shape == keep.shape else v for k, v in padded[key].items()},
                    {k: v[keep] if v.shape == keep.shape else v for k, v in clean[key].items()})
    if not bool(torch.isfinite(padded["grad"]).all()):
        fail(subject, "nan_padding", "NaN in padded positions reached the gradient")


def check_permutation(subject: Subject) -> None:
    """Permuting the rows of a batch permutes every per-row output and changes nothing else."""
    example = subject.example
    if example.order_dependent:
        pytest.skip(f"'{subject.name}' depends on row order: {example.order_dependent}")
    batch = example_batch(example, group_sizes_for(example, (3, 5, 2, 4)), seed=11)
    perm = torch.randperm(batch.num_completions, generator=torch.Generator().manual_seed(1))
    permuted_batch = rows_of(batch, perm)  # before the stage replaces the batch's rewards
    straight = exercised(subject, "permutation", lambda: run_step(subject.composition(), batch, 3))
    permuted = exercised(subject, "permutation", lambda: run_step(subject.composition(), permuted_batch, 3, row_order=perm))
    for key in ("rewards", "advantages", "weights", "policy", "grad"):
        expect_same(subject, "permutation", f"permuting the rows changed {key} beyond its order", permuted[key], straight[key][perm])
    for key in ("row_data", "terms", "objectives"):
        expect_same(subject, "permutation", f"permuting the rows changed {key} beyond its order", permuted[key],
                    {k: v[perm] for k, v in straight[key].items()})
    for key in ("loss", "state", "metrics"):
        expect_same(subject, "permutation", f"permuting the rows changed {key}", permuted[key], straight[key], atol=1e-5)


def run_steps(composition: Composition, example: Example, steps: Iterable[int]) -> list[dict[str, Any]]:
    """Whole steps of a run: plan the round, build its batch, run the step (stages and ``observe``)."""
    outputs = []
    for step in steps:
        planned = plan_round(composition, example, step, seed=500 + step)
        batch = round_batch(example, planned, seed=600 + step, step=step)
        outputs.append({"round": planned, **run_step(composition, batch, seed=step)})
    return outputs


def check_state(subject: Subject, directory: str | os.PathLike | None = None) -> None:
    """``state_dict`` holds tensors and plain values only (the core refuses anything else), round-trips
    through a real checkpoint file, and a resumed method continues exactly as an uninterrupted one."""
    example = subject.example
    with tempfile.TemporaryDirectory(dir=directory) as folder:
        path = os.path.join(folder, "grpo_plugins_state.pt")
        uninterrupted = exercised(subject, "state", lambda: run_steps(subject.composition(), example, (1, 2, 3, 4)))
        first = subject.composition()
        exercised(subject, "state", lambda: run_steps(first, example, (1, 2)))
        exercised(subject, "state", lambda: first.save(path))
        saved = torch.load(path, map_location="cpu", weights_only=True)
        expect_same(subject, "state", "the checkpoint file differs from state_dict()", saved, first.state_dict(), atol=0, rtol=0)
        resumed = subject.composition()
        exercised(subject, "state", lambda: resumed.load(path))
        expect_same(subject, "state", "the state after loading the checkpoint differs from the saved state",
                    resumed.state_dict(), first.state_dict(), atol=0, rtol=0)
        after = exercised(subject, "state", lambda: run_steps(resumed, example, (3, 4)))
    for i, (a, b) in enumerate(zip(after, uninterrupted[2:])):
        for part in (a, b):
            part.pop("mask")
        expect_same(subject, "state", f"step {i + 3} of the resumed run differs from the uninterrupted run", a, b, atol=0, rtol=0)


def check_needs(subject: Subject) -> None:
    """The method reads a batch field an adapter may leave empty, a loss field or a dataset column only
    if it declares it (``Method.requires``, ``needs().batch_fields / loss_fields / columns``)."""
    example = subject.example
    composition = subject.composition()
    needs = composition.needs()[subject.name]
    others = set().union(*(n.batch_fields for name, n in composition.needs().items() if name != subject.name))
    columns = set(example.columns)
    if columns - set(needs.columns):
        fail(subject, "needs", f"its example gives dataset column(s) {sorted(columns - set(needs.columns))} that "
             "needs().columns does not declare: an adapter could not check them at start-up")
    if set(needs.columns) - columns:
        fail(subject, "needs", f"it declares dataset column(s) {sorted(set(needs.columns) - columns)} that its example "
             "does not give (Example.columns)")
    batch_empty = [f for f in OPTIONAL_BATCH_FIELDS if f not in needs.batch_fields and f not in others]
    loss_empty = [f for f in OPTIONAL_LOSS_FIELDS if f not in needs.loss_fields]
    sizes = group_sizes_for(example, (3, 5, 2, 4))

    def attempt(batch_fields: Sequence[str], loss_fields: Sequence[str]) -> Exception | None:
        batch = without_fields(example_batch(example, sizes, seed=21), batch_fields)
        try:
            run_step(subject.composition(), batch, 2, empty_loss=loss_fields)
        except Exception as error:  # noqa: BLE001
            return error
        return None

    if attempt(batch_empty, loss_empty) is None:
        return
    error = attempt((), ())
    if error is not None:
        exercised(subject, "needs", lambda: raise_(error))
    culprits = [f"batch field '{f}'" for f in batch_empty if attempt([f], ()) is not None]
    culprits += [f"loss field '{f}'" for f in loss_empty if attempt((), [f]) is not None]
    error = attempt(batch_empty, loss_empty)
    fail(subject, "needs",
         f"it reads {', '.join(culprits) or 'several optional fields'} without declaring it: an adapter leaves such a "
         "field empty unless a method declares it (batch fields: Method.requires() or needs().batch_fields; loss "
         f"fields: needs().loss_fields). With it left empty: {type(error).__name__}: {error}")


# ----------------------------------------------------------------------------- data parallel (2 gloo ranks)
DP_SIZES = (3, 5, 2, 4, 6, 3)
DP_WORLD = 2


def data_parallel_outputs(subject: Subject, parallel: ParallelContext, rank: int = 0) -> dict[str, Any]:
    """What one rank computes for the data-parallel check.

    ``gathered``: two whole steps (round planning, stages, ``observe``, state) on the global batch, as
    every rank sees it. ``shard``: the advantage stage on this rank's group-aligned shard with
    ``gathered=False`` (batch-global statistics reduced across ranks), and the loss stage on this rank's
    row shard of the gathered step's batch.
    """
    example = subject.example
    world = parallel.world_size
    gathered_parallel = ParallelContext(rank=parallel.rank, world_size=world, gathered=True)
    composition = subject.composition()
    out: dict[str, Any] = {"gathered": []}
    for step in (1, 2):
        planned = plan_round(composition, example, step, seed=700 + step)
        batch = round_batch(example, planned, seed=800 + step, step=step, parallel=gathered_parallel)
        result = run_step(composition, batch, seed=step)
        result.pop("metrics")
        out["gathered"].append({"round": planned, **result})
    batch = example_batch(example, group_sizes_for(example, DP_SIZES), seed=31, parallel=gathered_parallel)
    groups = batch.group_index
    cut = batch.num_groups * 2 // 5 if world > 1 else batch.num_groups
    shard_rows = (groups < cut) if rank == 0 else (groups >= cut)
    if world == 1:
        shard_rows = torch.ones_like(groups, dtype=torch.bool)
    index = shard_rows.nonzero().flatten()
    shard = rows_of(batch, index)
    shard.parallel = ParallelContext(rank=parallel.rank, world_size=world, gathered=world == 1)
    staged_composition = subject.composition()
    attach_probes(staged_composition, shard)
    staged = staged_composition.run_advantage_stage(shard)
    out["shard_index"] = index
    out["shard"] = {
        "rewards": staged.rewards,
        "advantages": staged.advantages,
        "weights": staged.token_weights,
        "row_data": dict(staged.row_data),
    }
    # the loss stage on row shards of the whole batch after its (gathered) advantage stage
    full_composition = subject.composition()
    full_batch = example_batch(example, group_sizes_for(example, DP_SIZES), seed=32, parallel=gathered_parallel)
    attach_probes(full_composition, full_batch)
    full = full_composition.run_advantage_stage(full_batch)
    n = full.num_completions
    rows = torch.arange(n)[: n * 2 // 5] if (world > 1 and rank == 0) else torch.arange(n)[n * 2 // 5:] if world > 1 else torch.arange(n)
    inputs = loss_inputs(full, seed=9)
    local = dataclasses.replace(
        inputs,
        log_probs=inputs.log_probs.detach()[rows].requires_grad_(True),
        old_log_probs=inputs.old_log_probs[rows],
        advantages=inputs.advantages[rows],
        mask=inputs.mask[rows],
        ref_log_probs=inputs.ref_log_probs[rows],
        entropies=inputs.entropies[rows],
        row_data={k: v[rows] for k, v in inputs.row_data.items()},
        group_index=inputs.group_index[rows],
    )
    parts = subject.composition().run_loss_stage(local, trainer_surrogate)
    total = parts.policy.sum() + sum((t.sum() for t in parts.terms.values()), torch.zeros(()))
    total.backward()
    out["loss_rows"] = rows
    out["loss"] = {"policy": parts.policy.detach(), "terms": {k: v.detach() for k, v in parts.terms.items()},
                   "grad": log_probs_grad(local)}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, subjects: Sequence[Subject], out_dir: str) -> None:
    """One gloo rank: :func:`data_parallel_outputs` for every subject, saved (or the error's text)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for i, subject in enumerate(subjects):
            try:
                result = {"ok": data_parallel_outputs(subject, ParallelContext(rank=rank, world_size=world), rank)}
            except Exception:  # noqa: BLE001 - reported by the parent, per method
                result = {"error": traceback.format_exc()}
            dist.barrier()
            torch.save(_plain(result), os.path.join(out_dir, f"rank{rank}_{i}.pt"))
    finally:
        dist.destroy_process_group()


def _plain(value: Any) -> Any:
    """``value`` with prompts (which may be chat lists) and other objects kept as plain containers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_data_parallel(subjects: Sequence[Subject], world: int = DP_WORLD) -> list[list[dict[str, Any]]]:
    """Every subject's :func:`data_parallel_outputs` on each of ``world`` real gloo processes (one
    spawn for all subjects): ``[subject][rank]`` -> ``{"ok": outputs}`` or ``{"error": text}``."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world, _free_port(), list(subjects), folder), nprocs=world, join=True)
        return [
            [torch.load(os.path.join(folder, f"rank{rank}_{i}.pt"), weights_only=False) for rank in range(world)]
            for i in range(len(subjects))
        ]


def check_data_parallel(subject: Subject, ranks: Sequence[Mapping[str, Any]] | None = None) -> None:
    """The same batch over 2 gloo ranks gives the 1-rank result: identical round planning, outputs and
    state on the gathered batch on every rank; the group-aligned shards' advantage-stage outputs and the
    row shards' loss-stage outputs and gradients concatenate to the 1-rank ones."""
    ranks = run_data_parallel([subject])[0] if ranks is None else ranks
    for rank, result in enumerate(ranks):
        if "error" in result:
            fail(subject, "data_parallel", f"rank {rank} of {len(ranks)} raised:\n{result['error']}")
    single = exercised(subject, "data_parallel", lambda: data_parallel_outputs(subject, ParallelContext(), 0))
    single = _plain(single)
    for rank, result in enumerate(ranks):
        got = result["ok"]
        for step, (a, b) in enumerate(zip(got["gathered"], single["gathered"])):
            a, b = dict(a), dict(b)
            expect_same(subject, "data_parallel", f"rank {rank}, step {step + 1} on the gathered batch differs from one process",
                        a, b, atol=1e-6)
    order = torch.cat([r["ok"]["shard_index"] for r in ranks])
    for key in ("rewards", "advantages", "weights"):
        parts = [r["ok"]["shard"][key] for r in ranks]
        if any(p is None for p in parts) or single["shard"][key] is None:
            expect_same(subject, "data_parallel", f"{key} of the shards", [p is None for p in parts], [single["shard"][key] is None] * len(parts))
            continue
        expect_same(subject, "data_parallel",
                    f"the advantage stage on group-aligned shards (gathered=False) gives other {key} than one process: a "
                    "batch-global statistic is not reduced across ranks (use grpo_plugins.ops.global_* with batch.parallel)",
                    torch.cat(parts), single["shard"][key][order], atol=1e-5)
    expect_same(subject, "data_parallel", "row_data of the shards",
                {k: torch.cat([r["ok"]["shard"]["row_data"][k] for r in ranks]) for k in single["shard"]["row_data"]},
                {k: v[order] for k, v in single["shard"]["row_data"].items()}, atol=1e-5)
    rows = torch.cat([r["ok"]["loss_rows"] for r in ranks])
    merged = {
        "policy": torch.cat([r["ok"]["loss"]["policy"] for r in ranks]),
        "terms": {k: torch.cat([r["ok"]["loss"]["terms"][k] for r in ranks]) for k in single["loss"]["terms"]},
        "grad": torch.cat([r["ok"]["loss"]["grad"] for r in ranks]),
    }
    expected = {"policy": single["loss"]["policy"][rows], "terms": {k: v[rows] for k, v in single["loss"]["terms"].items()},
                "grad": single["loss"]["grad"][rows]}
    expect_same(subject, "data_parallel", "the loss stage on row shards gives other per-token losses or gradients than "
                "one process", merged, expected, atol=1e-5)


CHECKS: Mapping[str, Callable[..., None]] = {
    "declaration": check_declaration,
    "config": check_config,
    "hook_contracts": check_hook_contracts,
    "small_groups": check_small_groups,
    "constant_groups": check_constant_groups,
    "nan_padding": check_nan_padding,
    "permutation": check_permutation,
    "state": check_state,
    "needs": check_needs,
    "data_parallel": check_data_parallel,
}
"""Every check of the suite, by name, in the order the test class runs them."""


# ----------------------------------------------------------------------------- the pytest test class
class MethodConformance:
    """The suite as a pytest test class: subclass it and set ``method`` (a name, or a ``Method`` class),
    or override the ``conformance_subject`` fixture (e.g. parametrised over every installed method).

    ``data_parallel_cohort`` names the subjects whose 2-rank runs share one pair of gloo processes (a
    spawn costs seconds; the repository's suite over every method spawns once).
    """

    method: ClassVar[str | type | None] = None

    @pytest.fixture
    def conformance_subject(self, request) -> Subject:
        target = self.method or request.config.getoption("grpo_plugins_conformance", None)
        if not target:
            pytest.fail("no method to test: set `method` on the conformance test class or pass --grpo-plugins-conformance=NAME")
        return Subject.of(target)

    @pytest.fixture
    def data_parallel_cohort(self, conformance_subject) -> Sequence[Subject]:
        return [conformance_subject]

    def test_declaration(self, conformance_subject):
        check_declaration(conformance_subject)

    def test_config(self, conformance_subject):
        check_config(conformance_subject)

    def test_hook_contracts(self, conformance_subject):
        check_hook_contracts(conformance_subject)

    def test_small_groups(self, conformance_subject):
        check_small_groups(conformance_subject)

    def test_constant_groups(self, conformance_subject):
        check_constant_groups(conformance_subject)

    def test_nan_padding(self, conformance_subject):
        check_nan_padding(conformance_subject)

    def test_permutation(self, conformance_subject):
        check_permutation(conformance_subject)

    def test_state(self, conformance_subject, tmp_path):
        check_state(conformance_subject, tmp_path)

    def test_needs(self, conformance_subject):
        check_needs(conformance_subject)

    def test_data_parallel(self, conformance_subject, data_parallel_cohort):
        cohort = list(data_parallel_cohort)
        results = _cohort_results(tuple(cohort))
        check_data_parallel(conformance_subject, results[cohort.index(conformance_subject)])


_COHORTS: dict[tuple[Subject, ...], list[list[dict[str, Any]]]] = {}


def _cohort_results(cohort: tuple[Subject, ...]) -> list[list[dict[str, Any]]]:
    """The 2-rank outputs of every subject of ``cohort``, computed once per test session."""
    if cohort not in _COHORTS:
        _COHORTS[cohort] = run_data_parallel(cohort)
    return _COHORTS[cohort]


class TestConformance(MethodConformance):
    """Collected when pytest runs this module (``pytest --grpo-plugins-conformance=NAME``)."""
