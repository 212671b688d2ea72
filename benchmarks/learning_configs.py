"""What the learning benchmark runs: every installed method (found through the ``grpo_plugins`` entry points)
with its defaults and, where they differ, its paper's settings; the composed stacks chosen from the
single-method results; the oracle (the sensitivity check); and the probe that counts rollouts and
zero-signal groups.

A method runs on the addition task as it is (columns ``prompt``, ``answer``, ``level``, ``prompt_id``; one
0/1 exact-answer reward). A method that needs more declares it the core's way (``Method.needs()``: its
``columns``); when the task lacks a declared column, the configuration is skipped and the reason is written
into the results. A method that fails on the plain task is retried once with the task's extras (two named
reward components: ``accuracy``, the exact answer, and ``format``, the completion is digits only; the
reward is their sum); if it still fails, the error is the skip reason. Nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from grpo_plugins import Method, hookimpl
from grpo_plugins.ops import segment_max

TASK_COLUMNS = frozenset({"prompt", "answer", "level", "prompt_id"})
BASELINE = "vanilla"
ORACLE = "oracle"
NOT_BENCHMARKED = {"grpo": "the built-in estimator is what vanilla runs"}

CATEGORIES = {
    "sampler": ("sample_prompts", "allocate_rollouts", "augment_prompts"),
    "estimator": ("compute_advantages",),
    "loss": ("policy_surrogate", "gate_loss", "loss_terms", "mask_tokens"),
    "shaper": ("shape_rewards", "adjust_advantages"),
}
"""A method's category (for choosing stacks) is the first whose hooks it implements."""


@dataclass(frozen=True)
class Configuration:
    """One row of the table: a name and the method list it enables (empty: vanilla)."""

    name: str
    plugins: tuple = ()
    kind: str = "single"  # "baseline", "oracle", "single", "paper", "stack"
    category: str = ""
    skip: str = ""  # a reason, when the configuration cannot run on this task
    methods: tuple[str, ...] = field(default=())

    def spec(self) -> list:
        """The ``plugins`` argument of ``PluginGRPOTrainer`` (method specs as JSON-able values)."""
        return [dict(p) if isinstance(p, dict) else p for p in self.plugins]


def digits_only_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """The task's extra reward component: 1.0 where the completion is a non-empty string of digits."""
    from grpo_plugins_trl.testing import completion_text

    return [float(completion_text(c).isdigit()) for c in completions]


def extra_reward_funcs() -> list:
    """The rewards of the retry with the task's extras: the exact answer named ``accuracy`` and the
    digits-only check named ``format`` (the names methods that read reward components look for)."""
    from grpo_plugins_trl.testing import exact_answer_reward

    def accuracy(completions, **kwargs):
        return exact_answer_reward(completions, **kwargs)

    def format(completions, **kwargs):  # noqa: A001 - the component's name is what methods read
        return digits_only_reward(completions, **kwargs)

    return [accuracy, format]


def category_of(hooks: Sequence[str]) -> str:
    for category, names in CATEGORIES.items():
        if any(hook in names for hook in hooks):
            return category
    return "other"


def paper_overrides(cls: type) -> dict[str, Any]:
    """The config fields whose paper value differs from the default, as ``{field: paper value}``; a paper
    value the config does not accept (a note such as ``"not given (inferred 0.5)"``) is left out."""
    from grpo_plugins.config import build_config, describe_config

    config = getattr(cls, "Config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return {}
    out = {}
    for row in describe_config(config):
        if row["paper"] == row["default"]:
            continue
        try:
            build_config(config, {row["name"]: row["paper"]}, getattr(cls, "name", ""), "")
        except Exception:  # noqa: BLE001 - not a value of the field: a note, not a setting
            continue
        out[row["name"]] = row["paper"]
    return out


def discover_configurations(only: Sequence[str] | None = None) -> list[Configuration]:
    """Vanilla, the oracle, and for every installed method its defaults and (where different) its paper
    settings. ``only``: restrict to these method names (vanilla is always included; the oracle when named)."""
    from grpo_plugins.build import hooks_of
    from grpo_plugins.needs import class_needs
    from grpo_plugins.registry import discover

    methods, conflicts = discover()
    out = [Configuration(BASELINE, (), kind="baseline")]
    if only is None or ORACLE in only:
        out.append(Configuration(ORACLE, (), kind="oracle"))
    for name in sorted(conflicts):
        if only is None or name in only:
            out.append(Configuration(name, skip=f"the name is registered by {len(conflicts[name])} distributions"))
    for name in sorted(methods):
        if (only is not None and name not in only) or name in NOT_BENCHMARKED:
            continue
        try:
            cls = methods[name].load()
        except Exception as error:  # an import failure is a row with its reason, never a crash
            out.append(Configuration(name, skip=str(error), methods=(name,)))
            continue
        category = category_of(hooks_of(cls))
        needs = class_needs(cls)
        missing = sorted(needs.columns - TASK_COLUMNS) if needs is not None else []
        skip = f"needs dataset column(s) {missing}, which the addition task lacks" if missing else ""
        if needs is None:
            skip = "cannot be built with its default config"
        out.append(Configuration(name, (name,), kind="single", category=category, skip=skip, methods=(name,)))
        paper = paper_overrides(cls)
        if paper:
            out.append(Configuration(f"{name}[paper]", ({name: paper},), kind="paper", category=category, skip=skip,
                                     methods=(name,)))
    return out


def stack_configuration(names: Sequence[str]) -> Configuration:
    """A composed stack of methods at their defaults, in the given (composition) order."""
    return Configuration("+".join(names), tuple(names), kind="stack", methods=tuple(names))


def composable(names: Sequence[str]) -> bool:
    """Whether the core accepts these methods in one run (no two claim a single-provider hook, no exclusion)."""
    from grpo_plugins import Composition

    try:
        Composition(list(names))
    except Exception:  # noqa: BLE001 - any refusal means: not this stack
        return False
    return True


def choose_stacks(records: dict[str, dict[str, Any]], configurations: Sequence[Configuration], count: int = 4) -> list[list[str]]:
    """At least ``count`` stacks from the single-method records of one regime. Within each category the
    methods are ranked (lowest median rollouts ratio to vanilla, then highest AUC; a method worse than vanilla
    or skipped is never chosen); recipes sampler + estimator, sampler + estimator + loss, estimator + loss,
    sampler + estimator + loss + shaper, then sampler + shaper, estimator + shaper, sampler + loss each take
    the best-ranked combination the core can compose."""
    import itertools

    def score(name: str) -> tuple[float, float]:
        record = records[name]
        ratio = record["rollouts_ratio"]["median"]
        ratio = ratio if isinstance(ratio, float) and ratio == ratio else float("inf")
        return (ratio, -record["auc"]["mean"])

    ranked: dict[str, list[str]] = {}
    for config in configurations:
        record = records.get(config.name)
        if config.kind != "single" or record is None or "skipped" in record or record.get("verdict") == "worse":
            continue
        ranked.setdefault(config.category, []).append(config.name)
    for names in ranked.values():
        names.sort(key=score)
    recipes = [
        ("sampler", "estimator"), ("sampler", "estimator", "loss"), ("estimator", "loss"),
        ("sampler", "estimator", "loss", "shaper"), ("sampler", "shaper"), ("estimator", "shaper"), ("sampler", "loss"),
    ]
    stacks: list[list[str]] = []
    for recipe in recipes:
        pools = [ranked[c][:3] for c in recipe if c in ranked]
        if len(pools) < 2:
            continue
        candidates = sorted(itertools.product(*pools), key=lambda combo: sum(p.index(n) for p, n in zip(pools, combo)))
        for combo in candidates:
            if list(combo) not in stacks and composable(combo):
                stacks.append(list(combo))
                break
        if len(stacks) == count:
            break
    return stacks


class SignalProbe(Method):
    """Counts the completions of every step (with batch editing, every refill round's too: read from the
    trainer's ``plugin_refill``, set by ``learning.run_one``) and the fraction of groups whose advantages are
    all zero (after every other method: it must be the last in the list); passes advantages through unchanged."""

    name = "benchmark_probe"

    def __init__(self):
        super().__init__()
        self.completions: list[int] = []
        self.zero_signal: list[float] = []

    @hookimpl
    def adjust_advantages(self, batch, advantages):
        magnitude = advantages.abs() if advantages.dim() == 1 else torch.where(batch.token_mask.bool(), advantages.abs(), 0).amax(1)
        group_signal = segment_max(magnitude, batch.group_index, batch.num_groups)
        self.zero_signal.append(float((group_signal == 0).float().mean()))
        refill = getattr(getattr(self, "trainer", None), "plugin_refill", None)  # batch editing: refill rounds count too
        generated = refill.last_plan.rollouts if refill is not None and refill.last_plan is not None else batch.prompt_ids.numel()
        self.completions.append(int(generated))
        return advantages


def oracle_order(pass_rate: torch.Tensor, greedy_wrong: torch.Tensor) -> torch.Tensor:
    """The oracle's preference over candidate prompts, as indices into them (ties keep the drawn order).

    ``pass_rate``: ``(n,)`` fraction of sampled completions that are correct; ``greedy_wrong``: ``(n,)`` bool.
    Ranks: 0 informative (``0 < pass_rate < 1``) with a wrong greedy answer, 1 other informative, 2 unsolved
    (``pass_rate == 0``), 3 solved (``pass_rate == 1``).
    """
    informative = (pass_rate > 0) & (pass_rate < 1)
    rank = torch.where(informative & greedy_wrong, 0, torch.where(informative, 1, torch.where(pass_rate == 0, 2, 3)))
    return torch.argsort(rank, stable=True)


class Oracle(Method):
    """The sensitivity check (not a method, and it cheats): each round it looks at ``candidates`` times the
    round's prompts, drawn from the pool, and with the current model decodes each greedily and samples
    ``samples`` completions of each (none of this is counted as rollouts). It drops the prompts the model
    already solves: it fills the round first with prompts whose greedy answer is wrong but which some sample
    solves (they carry signal and move the greedy accuracy), then with the other prompts whose samples
    disagree, then with prompts no sample solves, and only then with solved ones. A benchmark on which this
    does not clearly save rollouts cannot tell methods apart."""

    name = "oracle"
    version = "8x candidates, 8 samples + greedy; greedy-wrong informative first, solved last"  # in every oracle run's key

    def __init__(self, pool, tokenizer, candidates: int = 8, samples: int = 8):
        super().__init__()
        self.pool, self.tokenizer, self.candidates, self.samples = pool, tokenizer, candidates, samples
        self.model = None  # the trainer's model, set once the trainer is built

    @torch.no_grad()
    def _solved(self, problems, samples: int) -> torch.Tensor:
        """``(len(problems), samples)`` bool: completion equals the answer (``samples`` 0: one greedy completion;
        else ``samples`` completions at temperature 1)."""
        from grpo_plugins_trl.testing import completion_text
        from learning_task import MAX_COMPLETION_TOKENS

        was_training = self.model.training
        self.model.eval()
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
        sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=samples) if samples else {
            "do_sample": False}
        out = self.model.generate(**encoded, max_new_tokens=MAX_COMPLETION_TOKENS, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self.tokenizer.eos_token_id, **sampling)
        self.model.train(was_training)
        texts = self.tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        per_prompt = max(samples, 1)
        answers = [p.answer for p in problems for _ in range(per_prompt)]
        correct = torch.tensor([completion_text(t) == a for t, a in zip(texts, answers)])
        return correct.view(len(problems), per_prompt)

    @hookimpl
    def sample_prompts(self, round, generator):
        drawn = torch.randperm(round.dataset_size, generator=generator)[: self.candidates * round.num_prompts]
        problems = [self.pool[i] for i in drawn.tolist()]
        rate = self._solved(problems, self.samples).float().mean(1)
        greedy_wrong = ~self._solved(problems, 0)[:, 0]
        keep = drawn[oracle_order(rate, greedy_wrong)[: round.num_prompts]]
        self.log_metric("frac_solved_candidates", float((rate == 1).float().mean()))
        return keep
