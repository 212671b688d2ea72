"""The bad-input suite: mistakes a user or a method author makes, each caught with an error that names
its culprit, at start-up wherever it can be caught there.

Each :class:`Mistake` says what was done wrong, the error type expected, the words the message must
contain (the method, hook, setting or file to blame) and when it is caught. ``docs/errors.md`` is
generated from this table and the messages the code really produces:

    .venv/bin/python tests/test_bad_inputs.py --write   # rewrite docs/errors.md

and ``test_errors_doc_is_current`` fails when the page and the code disagree.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from grpo_plugins import (
    BatchError,
    Composition,
    CompositionError,
    ConfigError,
    GRPOPluginsError,
    Method,
    PluginError,
    PromptRound,
    hookimpl,
)
from grpo_plugins.testing import make_batch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
START_UP = "start-up"  # building the run (Composition / trainer construction), before any step
FIRST_BATCH = "first batch"  # needs the data itself; caught when it first arrives, before any update
CHECKPOINT = "checkpoint"  # saving or resuming


@dataclass(frozen=True)
class Mistake:
    """One mistake: ``trigger()`` must raise ``error`` with every string of ``culprit`` in its message."""

    id: str
    what: str
    error: type
    culprit: tuple[str, ...]
    when: str
    trigger: Callable[[], Any]


def _run(methods, batch=None, **kwargs):
    """Build the run and, when a batch is given, run its advantage stage."""
    composition = Composition(methods, **kwargs)
    if batch is not None:
        composition.run_advantage_stage(batch)
    return composition


def _round(budget: int = 16, prompts: int = 4) -> PromptRound:
    return PromptRound(num_prompts=prompts, budget=budget, dataset_size=10, step=0, default_rollouts=budget // prompts)


def _batch(**fields):
    """A valid batch: groups of 3, 2, 4 and 2 completions."""
    return make_batch(group_sizes=(3, 2, 4, 2), **fields)


def _edited(edit: Callable[[Any], None]):
    batch = _batch()
    edit(batch)
    return batch


# ------------------------------------------------------------------ methods that break their contract
class _Returns(Method):
    """A method whose hook returns a fixed bad value; ``name``/hook set per subclass."""

    value: Callable[[Any], Any] = staticmethod(lambda batch: None)


def _method(hook: str, result: Callable[..., Any], name: str | None = None, **attributes) -> Method:
    """An instance of a one-hook method returning ``result(**kwargs)`` from ``hook``."""
    args = {
        "shape_rewards": "batch, rewards",
        "compute_advantages": "batch",
        "adjust_advantages": "batch, advantages",
        "mask_tokens": "batch",
        "sample_prompts": "round, generator",
        "allocate_rollouts": "round, prompt_ids",
        "loss_terms": "inputs",
        "observe": "batch, step",
    }[hook]
    namespace: dict[str, Any] = {}
    exec(f"def {hook}(self, {args}):\n    return self._result({args})", namespace)  # noqa: S102 - fixed test source
    function = hookimpl(namespace[hook])
    cls = type(f"Bad_{hook}", (Method,), {"name": name or f"bad_{hook}", hook: function, **attributes})
    instance = cls()
    instance._result = result
    return instance


class _NoName(Method):
    @hookimpl
    def shape_rewards(self, rewards):
        return rewards


class _FirstHook(Method):
    name = "first_hook"

    @hookimpl(tryfirst=True)
    def shape_rewards(self, rewards):
        return rewards


class _Misspelt(Method):
    name = "misspelt"

    @hookimpl
    def shape_reward(self, rewards):
        return rewards


class _UnknownField(Method):
    name = "unknown_field"

    def requires(self):
        return {"old_logprobs"}


class _Unpicklable(Method):
    name = "unpicklable"

    def state_dict(self):
        return {"tracker": object()}


def _load_state(text: bytes, suffix: str = ".pt"):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"grpo_plugins_state{suffix}"
        path.write_bytes(text)
        Composition(["spo"]).load(path)


def _state_of_other_method():
    source = Composition(["spo"])
    source.run_observe(source.run_advantage_stage(_batch()), step=1)
    Composition(["vade"]).load_state_dict(source.state_dict())


def _disabled(names: str, methods):
    old = os.environ.get("GRPO_PLUGINS_DISABLED")
    os.environ["GRPO_PLUGINS_DISABLED"] = names
    try:
        Composition(methods)
    finally:
        if old is None:
            os.environ.pop("GRPO_PLUGINS_DISABLED")
        else:
            os.environ["GRPO_PLUGINS_DISABLED"] = old


def _n(batch) -> int:
    return batch.num_completions


# ------------------------------------------------------------------ through the real TRL adapter and the CLI
class CommandFailed(Exception):
    """``grpo-plugins`` exited with an error; the message is what it printed to stderr."""


def _cli(*argv: str, config: str | None = None) -> None:
    """Run ``grpo-plugins ARGV`` (with ``config`` written to a file appended); raise what it printed on failure."""
    import contextlib
    import io

    from grpo_plugins.cli import main

    with tempfile.TemporaryDirectory() as folder:
        args = list(argv)
        if config is not None:
            path = Path(folder) / "run.yaml"
            path.write_text(config)
            args.append(str(path))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
        if code:
            raise CommandFailed(err.getvalue().strip().replace(folder, "<tmp>"))


def _trl_trainer(methods=None, trainer: str = "plugin", dataset=None, **settings):
    """Build (not train) a TRL trainer on the tiny local model: the start-up checks run here."""
    from trl import GRPOTrainer

    from grpo_plugins_trl import PluginGRPOConfig, PluginGRPOTrainer
    from grpo_plugins_trl.testing import arithmetic_dataset, exact_answer_reward, tiny_model, tiny_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        args = PluginGRPOConfig(output_dir=folder, use_cpu=True, bf16=False, per_device_train_batch_size=4,
                                num_generations=4, report_to="none", grpo_plugins=methods, **settings)
        cls = PluginGRPOTrainer if trainer == "plugin" else GRPOTrainer
        return cls(model=tiny_model(), reward_funcs=exact_answer_reward, args=args,
                   train_dataset=dataset if dataset is not None else arithmetic_dataset(8),
                   processing_class=tiny_tokenizer())


def _refill_exhausted():
    """filter_groups with a constant reward: every group is dropped, the bounded rounds run out."""
    from grpo_plugins_trl.testing import tiny_grpo_run

    with tempfile.TemporaryDirectory() as folder:
        tiny_grpo_run(None, max_steps=1, reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
                      filter_groups=True, max_num_gen_batches=2, output_dir=folder)


def _resume(methods, damage: str):
    """Train 2 steps with a checkpoint, damage its plugin state file, resume: the resume must refuse."""
    from grpo_plugins_trl.testing import tiny_grpo_run

    with tempfile.TemporaryDirectory() as folder:
        tiny_grpo_run(methods, max_steps=2, save_strategy="steps", save_steps=2, output_dir=f"{folder}/first")
        state = Path(folder) / "first" / "checkpoint-2" / "grpo_plugins_state.pt"
        if damage == "delete":
            state.unlink()
        else:
            state.write_bytes(state.read_bytes()[:40])
        try:
            tiny_grpo_run(methods, max_steps=3, output_dir=f"{folder}/second",
                          resume_from_checkpoint=str(state.parent))
        except GRPOPluginsError as error:
            raise type(error)(str(error).replace(folder, "<tmp>")) from None


def _without_hints():
    from grpo_plugins_trl.testing import arithmetic_dataset

    return _trl_trainer(["scaf_grpo"], dataset=arithmetic_dataset(8))


def _with_prompt_ids_missing():
    from grpo_plugins_trl.testing import arithmetic_dataset

    return _trl_trainer(["info_consistent"], dataset=arithmetic_dataset(8).remove_columns("prompt_id"))



MISTAKES: list[Mistake] = [
    # --------------------------------------------------------------- naming and listing methods
    Mistake("unknown-method", "a misspelt method name", CompositionError,
            ("unknown method 'knapsack'", "did you mean 'knapsack_rl'"), START_UP, lambda: _run(["knapsack"])),
    Mistake("comma-string", "several names in one string", CompositionError,
            ("unknown method 'spo,vade'",), START_UP, lambda: _run("spo,vade")),
    Mistake("enabled-twice", "the same method listed twice", CompositionError,
            ("['spo'] are enabled more than once",), START_UP, lambda: _run(["spo", "spo"])),
    Mistake("bad-entry", "a number in the method list", CompositionError,
            ("cannot read method entry 42",), START_UP, lambda: _run(["spo", 42])),
    Mistake("config-not-mapping", "a method's config that is not a mapping", CompositionError,
            ("method 'spo'", "config must be a mapping"), START_UP, lambda: _run([{"spo": 0.5}])),
    Mistake("two-estimators", "two methods providing advantages (spo and gtpo)", CompositionError,
            ("'spo'", "'gtpo'", "'compute_advantages'"), START_UP, lambda: _run(["spo", "gtpo"])),
    Mistake("two-samplers", "two prompt samplers (vade and spo)", CompositionError,
            ("'vade'", "'spo'", "'sample_prompts'"), START_UP, lambda: _run(["vade", "spo"])),
    Mistake("disabled-method", "enabling a method blocked by GRPO_PLUGINS_DISABLED", CompositionError,
            ("method 'spo'", "GRPO_PLUGINS_DISABLED"), START_UP, lambda: _disabled("spo", ["spo"])),
    Mistake("disabled-builtin", "blocking the built-in grpo with no other estimator", CompositionError,
            ("GRPO_PLUGINS_DISABLED", "'grpo'", "compute_advantages"), START_UP,
            lambda: _disabled("grpo", ["vade"])),
    # --------------------------------------------------------------- configuration values
    Mistake("unknown-key", "a misspelt config key", ConfigError,
            ("method 'grpo'", "unknown config key(s) ['epsilom']", "did you mean 'epsilon'"), START_UP,
            lambda: _run([{"grpo": {"epsilom": 1e-4}}])),
    Mistake("wrong-type", "a string where a number is expected", ConfigError,
            ("method 'sapo'", "'tau_pos' expects float, got '1.0' (str)"), START_UP,
            lambda: _run([{"sapo": {"tau_pos": "1.0"}}])),
    Mistake("bad-choice", "a value outside a Literal's choices", ConfigError,
            ("method 'grpo'", "'scale' expects 'group' | 'batch' | 'none', got 'std'"), START_UP,
            lambda: _run([{"grpo": {"scale": "std"}}])),
    Mistake("negative-epsilon-grpo", "grpo epsilon -1 (would flip every advantage)", ConfigError,
            ("method 'grpo'", "'epsilon' must lie in [0, inf), got -1"), START_UP,
            lambda: _run([{"grpo": {"epsilon": -1}}])),
    Mistake("negative-epsilon-gdpo", "gdpo epsilon -1 (would flip every advantage)", ConfigError,
            ("method 'gdpo'", "'epsilon' must lie in [0, inf), got -1"), START_UP,
            lambda: _run([{"gdpo": {"epsilon": -1}}])),
    Mistake("rank-penalty", "unlikeliness rank_penalty 5 (ranks correct answers below wrong ones)", ConfigError,
            ("method 'unlikeliness'", "'rank_penalty' must lie in [0, 1], got 5"), START_UP,
            lambda: _run([{"unlikeliness": {"rank_penalty": 5}}])),
    Mistake("infinite-epsilon", "spo norm_epsilon inf (zeroes every advantage)", ConfigError,
            ("method 'spo'", "'norm_epsilon' must be finite, got inf"), START_UP,
            lambda: _run([{"spo": {"norm_epsilon": float("inf")}}])),
    Mistake("nan-option", "a NaN option value", ConfigError,
            ("method 'sapo'", "'tau_neg' must be finite, got nan"), START_UP,
            lambda: _run([{"sapo": {"tau_neg": float("nan")}}])),
    Mistake("min-above-max", "knapsack_rl min_n above max_n", ConfigError,
            ("method 'knapsack_rl'", "min_n <= max_n"), START_UP,
            lambda: _run([{"knapsack_rl": {"min_n": 10, "max_n": 4}}])),
    Mistake("tuple-item", "a reward range with a NaN end", ConfigError,
            ("method 'vade'", "'reward_range' item 1 must be finite"), START_UP,
            lambda: _run([{"vade": {"reward_range": [0.0, float("nan")]}}])),
    # --------------------------------------------------------------- method authors
    Mistake("no-name", "a Method object without a name", CompositionError,
            ("_NoName", "has no name"), START_UP, lambda: _run([_NoName()])),
    Mistake("misspelt-hook", "a hookimpl whose name is not a hook", CompositionError,
            ("method 'misspelt'", "shape_reward"), START_UP, lambda: _run([_Misspelt()])),
    Mistake("ordering-marker", "tryfirst on a hookimpl (order is the config order)", CompositionError,
            ("method 'first_hook'", "tryfirst"), START_UP, lambda: _run([_FirstHook()])),
    Mistake("unknown-field", "requires() naming a batch field that does not exist", CompositionError,
            ("method 'unknown_field'", "old_logprobs"), START_UP, lambda: _run([_UnknownField()])),
    Mistake("unplain-state", "state holding an arbitrary object", PluginError,
            ("method 'unpicklable'", "state_dict", "object"), CHECKPOINT,
            lambda: Composition([_Unpicklable()]).state_dict()),
    # --------------------------------------------------------------- hook outputs
    Mistake("int-rewards", "shape_rewards returning int64 (would truncate)", PluginError,
            ("'bad_shape_rewards'", "'shape_rewards'", "int64"), FIRST_BATCH,
            lambda: _run([_method("shape_rewards", lambda batch, rewards: rewards.long())], _batch())),
    Mistake("int-adjust", "adjust_advantages returning int64", PluginError,
            ("'bad_adjust_advantages'", "'adjust_advantages'", "int64"), FIRST_BATCH,
            lambda: _run([_method("adjust_advantages", lambda batch, advantages: advantages.long())], _batch())),
    Mistake("nan-rewards-out", "shape_rewards returning NaN", PluginError,
            ("'bad_shape_rewards'", "NaN"), FIRST_BATCH,
            lambda: _run([_method("shape_rewards", lambda batch, rewards: rewards * float("nan"))], _batch())),
    Mistake("wrong-shape", "adjust_advantages returning the wrong shape", PluginError,
            ("'bad_adjust_advantages'", "shape"), FIRST_BATCH,
            lambda: _run([_method("adjust_advantages", lambda batch, advantages: advantages[:2])], _batch())),
    Mistake("negative-weights", "mask_tokens returning negative weights", PluginError,
            ("'bad_mask_tokens'", "below 0"), FIRST_BATCH,
            lambda: _run([_method("mask_tokens", lambda batch: -batch.completion_mask)], _batch())),
    Mistake("drop-all-tokens", "mask_tokens dropping every token", BatchError,
            ("['bad_mask_tokens']", "drop every token"), FIRST_BATCH,
            lambda: _run([_method("mask_tokens", lambda batch: batch.completion_mask * 0)], _batch())),
    Mistake("budget-sum", "allocate_rollouts not summing to the budget", PluginError,
            ("'bad_allocate_rollouts'", "summing to 12, expected the budget 16"), START_UP,
            lambda: Composition([_method("allocate_rollouts", lambda round, prompt_ids: torch.full_like(prompt_ids, 3))])
            .rollout_counts(_round(), torch.arange(4))),
    Mistake("sample-range", "sample_prompts returning an index past the dataset", PluginError,
            ("'bad_sample_prompts'", "above 9"), START_UP,
            lambda: Composition([_method("sample_prompts", lambda round, generator: torch.tensor([3, 12, 1, 0]))])
            .run_sample_prompts(_round(), torch.Generator())),
    Mistake("uneven-split", "a prompt count that does not divide the budget, without an allocator", CompositionError,
            ("3 prompts", "budget of 16"), START_UP,
            lambda: Composition(["grpo"]).rollout_counts(_round(), torch.arange(3))),
    Mistake("raising-hook", "a method raising inside a hook", PluginError,
            ("method 'bad_observe'", "hook 'observe'", "RuntimeError: tracker overflow"), FIRST_BATCH,
            lambda: _run([_method("observe", lambda batch, step: (_ for _ in ()).throw(RuntimeError("tracker overflow")))])
            .run_observe(_batch(), step=1)),
    # --------------------------------------------------------------- the data
    Mistake("nan-reward", "a reward function returning NaN", BatchError,
            ("rewards contain NaN/inf at completions",), FIRST_BATCH,
            lambda: _run([], _batch(rewards=[0.0, float("nan")] + [1.0] * 9))),
    Mistake("float-prompt-ids", "float prompt ids", BatchError,
            ("prompt_ids must be an (N,) integer tensor",), FIRST_BATCH,
            lambda: _run([], _edited(lambda b: setattr(b, "prompt_ids", b.prompt_ids.float())))),
    Mistake("reward-shape", "rewards of the wrong length", BatchError,
            ("rewards must be (11,)",), FIRST_BATCH,
            lambda: _run([], _edited(lambda b: setattr(b, "rewards", b.rewards[:5])))),
    Mistake("token-shapes", "token tensors that disagree", BatchError,
            ("old_log_probs must be (N, T)",), FIRST_BATCH,
            lambda: _run([], _edited(lambda b: setattr(b, "old_log_probs", b.old_log_probs[:, :3])))),
    Mistake("group-of-one", "a group of one completion under grpo", PluginError,
            ("'grpo'", "group normalisation"), FIRST_BATCH, lambda: _run([], make_batch(group_sizes=(3, 1, 2)))),
    # --------------------------------------------------------------- checkpoints
    Mistake("foreign-state", "resuming with state of a method the run does not enable", CompositionError,
            ("['spo']", "does not enable"), CHECKPOINT, _state_of_other_method),
    Mistake("corrupt-state", "a truncated plugin state file", GRPOPluginsError,
            ("grpo_plugins_state.pt",), CHECKPOINT, lambda: _load_state(b"PK\x03\x04truncated")),
    # --------------------------------------------------------------- the TRL adapter (trainer built, not trained)
    Mistake("plain-trainer", "a PluginGRPOConfig with methods given to plain trl.GRPOTrainer", ValueError,
            ("grpo_plugins=['ngrpo']", "PluginGRPOTrainer"), START_UP, lambda: _trl_trainer(["ngrpo"], trainer="plain")),
    Mistake("missing-columns", "scaf_grpo on a dataset without its hint columns", CompositionError,
            ("method 'scaf_grpo'", "'hint_knowledge'", "'hint_planning'", "'hint_solution'"), START_UP, _without_hints),
    Mistake("missing-prompt-id", "info_consistent on a dataset without a prompt_id column", CompositionError,
            ("info_consistent", "prompt_id"), START_UP, _with_prompt_ids_missing),
    Mistake("single-rollouts", "knapsack_rl min_n 1 with grpo's group normalisation", CompositionError,
            ("method 'knapsack_rl'", "'grpo'", "min_n=1"), START_UP, lambda: _trl_trainer([{"knapsack_rl": {"min_n": 1}}])),
    Mistake("refill-exhausted", "dynamic sampling (filter_groups) on a reward that never varies", RuntimeError,
            ("max_num_gen_batches=2", "on_refill_exhausted='keep_dropped'"), FIRST_BATCH, _refill_exhausted),
    Mistake("normalize-then-sum", "ngrpo with TRL's multi_objective_aggregation=normalize_then_sum", CompositionError,
            ("ngrpo", "normalize_then_sum"), START_UP,
            lambda: _trl_trainer(["ngrpo"], multi_objective_aggregation="normalize_then_sum")),
    Mistake("resume-without-state", "resuming a stateful method from a checkpoint without its state file",
            CompositionError, ("grpo_plugins_state.pt", "'spo'", "grpo_plugins_fresh_state"), CHECKPOINT,
            lambda: _resume(["spo"], "delete")),
    Mistake("truncated-state", "resuming from a truncated plugin state file", CompositionError,
            ("grpo_plugins_state.pt", "truncated or corrupt"), CHECKPOINT, lambda: _resume(["spo"], "truncate")),
    # --------------------------------------------------------------- grpo-plugins check on a run config
    Mistake("misspelt-top-key", "a run config with 'grpo_plugin:' instead of 'grpo_plugins:'", CommandFailed,
            ("grpo_plugin", "did you mean 'grpo_plugins'"), START_UP,
            lambda: _cli("check", config="model_name_or_path: m\ngrpo_plugin: [spo]\n")),
    Mistake("verl-nesting", "a TRL run config with the methods under algorithm.grpo_plugins", CommandFailed,
            ("algorithm.grpo_plugins", "top level"), START_UP,
            lambda: _cli("check", "--trainer", "trl", config="algorithm:\n  grpo_plugins: [spo]\n")),
    Mistake("number-list", "grpo_plugins: 3 in a run config", CommandFailed,
            ("grpo_plugins",), START_UP, lambda: _cli("check", config="grpo_plugins: 3\n")),
    Mistake("every-error-at-once", "a run config with two bad methods: both reported", CommandFailed,
            ("unknown method 'knapsak'", "'epsilon' must lie in [0, inf)"), START_UP,
            lambda: _cli("check", config="grpo_plugins: [knapsak, {grpo: {epsilon: -1}}]\n")),
]


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: m.id)
def test_each_mistake_is_caught_naming_its_culprit(mistake: Mistake):
    with pytest.raises(mistake.error) as caught:
        mistake.trigger()
    message = str(caught.value)
    missing = [word for word in mistake.culprit if word not in message]
    assert not missing, f"{mistake.id}: the message lacks {missing}: {message}"


def test_the_suite_is_large_and_ids_are_unique():
    ids = [m.id for m in MISTAKES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40


def test_errors_doc_is_current():
    assert DOC.read_text() == render_doc(), "docs/errors.md is stale: run `.venv/bin/python tests/test_bad_inputs.py --write`"


# ------------------------------------------------------------------ the generated page
def _outcome(mistake: Mistake) -> str:
    try:
        mistake.trigger()
    except Exception as error:  # noqa: BLE001 - recorded, whatever it is
        message = re.sub(r"/tmp/[^\s'\"]+/", "<tmp>/", str(error)).replace("\n", " ")
        message = re.sub(r"\(installed: [^)]*\)", "(installed: ...)", message)  # grows with every new method
        message = re.sub(r"<[\w.]+ object(?: at 0x[0-9a-f]+)?>", "<object>", message)  # differ between runs
        message = re.sub(r"<object from [\w.]+>", "<object from its module>", message)
        return f"`{type(error).__name__}`: {message}"
    return "**not caught**"


def render_doc() -> str:
    lines = [
        "# Mistakes and what they get",
        "",
        "Generated from `tests/test_bad_inputs.py` (`.venv/bin/python tests/test_bad_inputs.py --write`); a test fails",
        "when this page and the code disagree. Each row is a mistake, when it is caught, and the exact error a",
        "user sees. *start-up*: while the run is built, before any step; *first batch*: the data itself is",
        "wrong, caught when it arrives, before any update; *checkpoint*: saving or resuming.",
        "",
        "| id | mistake | caught at | error |",
        "|---|---|---|---|",
    ]
    for mistake in MISTAKES:
        outcome = _outcome(mistake).replace("|", "\\|")
        lines.append(f"| `{mistake.id}` | {mistake.what} | {mistake.when} | {outcome} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: tests/test_bad_inputs.py --write")
    DOC.write_text(render_doc())
    print(f"wrote {DOC.relative_to(ROOT)} ({len(MISTAKES)} mistakes)")
