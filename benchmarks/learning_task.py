"""The learning benchmark's task: multi-digit addition at four difficulty levels, a deterministic warm start,
a held-out evaluation set, and one GRPO run of one configuration on one prompt pool.

Levels are operand widths (``"2+1"`` is a two-digit number plus a one-digit number); harder levels need more
carries and longer answers. Three disjoint problem sets are drawn from one seeded generator: the warm-start
set (supervised), the held-out evaluation set (greedy exact match per level) and the RL prompts. The warm
start is single-threaded and seeded, so the same torch build gives the same checkpoint bit for bit; its
SHA-256 is recorded with every run, and a stored run made from another checkpoint is never mixed in.

Nothing is downloaded: the tokenizer and the Qwen2 model are built locally (``grpo_plugins_trl.testing``).
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from grpo_plugins_trl.testing import (  # noqa: E402
    completion_text,
    exact_answer_reward,
    supervised_batch,
    tiny_model,
    tiny_tokenizer,
)

LEVELS: tuple[str, ...] = ("1+1", "2+1", "2+2", "3+2")
"""Difficulty levels: digits of the first and the second operand."""

MAX_COMPLETION_TOKENS = 5  # the longest answer (4 digits) and the end-of-sequence token


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    level: str


@dataclass(frozen=True)
class TaskSettings:
    """Everything that determines the warm-start checkpoint and the problem sets (their hash keys the cache)."""

    hidden_size: int = 64
    num_layers: int = 2
    warm_problems: int = 4000
    warm_level_weights: tuple[int, ...] = (1, 1, 1, 1)  # warm-start problems per cycle of levels
    warm_steps: int = 1200
    warm_lr: float = 3e-3
    warm_batch: int = 64
    eval_per_level: int = 150
    revisited_pool: int = 512
    fresh_pool: int = 6000
    data_seed: int = 1234
    model_seed: int = 0

    def warm_key(self) -> str:
        """A hash of the fields that determine the warm-start checkpoint (the pool sizes do not: the pools
        are drawn after the warm-start and evaluation sets)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("revisited_pool", "fresh_pool")}
        return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:12]


def _draw(rng: random.Random, level: str) -> Problem:
    left, right = (int(d) for d in level.split("+"))
    a = rng.randrange(10 ** (left - 1) if left > 1 else 0, 10**left)
    b = rng.randrange(10 ** (right - 1) if right > 1 else 0, 10**right)
    return Problem(f"{a} + {b} =", str(a + b), level)


def problem_sets(settings: TaskSettings) -> dict[str, list[Problem]]:
    """Disjoint ``warm``, ``eval``, ``revisited`` and ``fresh`` problem lists, levels interleaved evenly.

    The ``1+1`` level has only 100 distinct problems: it is drawn with repeats in every set (its
    evaluation is over its distinct problems' frequencies, which is what the other levels do too); the
    other levels never share a problem between the evaluation set and any training set.
    """
    rng = random.Random(settings.data_seed)
    evaluation: list[Problem] = []
    seen: set[str] = set()
    for i in range(settings.eval_per_level * len(LEVELS)):
        level = LEVELS[i % len(LEVELS)]
        while True:
            p = _draw(rng, level)
            if level == "1+1" or p.prompt not in seen:
                break
        seen.add(p.prompt)
        evaluation.append(p)
    held_out = {p.prompt for p in evaluation if p.level != "1+1"}

    def draw_many(n: int, weights: tuple[int, ...] = (1,) * len(LEVELS)) -> list[Problem]:
        cycle = [level for level, weight in zip(LEVELS, weights) for _ in range(weight)]
        out = []
        for i in range(n):
            level = cycle[i % len(cycle)]
            while True:
                p = _draw(rng, level)
                if p.prompt not in held_out:
                    break
            out.append(p)
        return out

    return {
        "warm": draw_many(settings.warm_problems, settings.warm_level_weights),
        "eval": evaluation,
        "revisited": draw_many(settings.revisited_pool),
        "fresh": draw_many(settings.fresh_pool),
    }


def state_hash(model) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes and bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def warm_start(settings: TaskSettings, problems: list[Problem]):
    """Supervised training on ``prompt answer <eos>`` (loss on the answer tokens), single-threaded and seeded,
    at a constant learning rate, stopped where every level is mid-range (about 0.3-0.7 with the defaults).

    Returns the model (eval mode) and its tokenizer.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = tiny_tokenizer()
        model = tiny_model(settings.model_seed, hidden_size=settings.hidden_size, num_layers=settings.num_layers)
        ids, labels, attention = supervised_batch(tokenizer, problems)
        gen = torch.Generator().manual_seed(settings.model_seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.warm_lr)
        model.train()
        for _ in range(settings.warm_steps):
            pick = torch.randint(0, len(problems), (settings.warm_batch,), generator=gen)
            loss = model(input_ids=ids[pick], attention_mask=attention[pick], labels=labels[pick]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return model, tokenizer


def cache_dir() -> str:
    """Where warm-start checkpoints are cached (outside the repository): ``$GRPO_PLUGINS_BENCH_CACHE`` or
    ``~/.cache/grpo-plugins/learning``."""
    return os.environ.get("GRPO_PLUGINS_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "grpo-plugins", "learning"))


def load_warm_start(settings: TaskSettings, problems: list[Problem]) -> tuple[Any, Any, str]:
    """The warm-start model, its tokenizer and its checkpoint hash; computed once per settings and cached.

    A cached checkpoint is used only when its recomputed hash matches the one stored next to it.
    """
    tokenizer = tiny_tokenizer()
    path = os.path.join(cache_dir(), f"warm_{settings.warm_key()}.pt")
    if os.path.exists(path):
        stored = torch.load(path, weights_only=True)
        model = tiny_model(settings.model_seed, hidden_size=settings.hidden_size, num_layers=settings.num_layers)
        model.load_state_dict(stored["state"])
        model.eval()
        if state_hash(model) == stored["hash"]:
            return model, tokenizer, stored["hash"]
    model, tokenizer = warm_start(settings, problems)
    digest = state_hash(model)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"state": model.state_dict(), "hash": digest}, buffer)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(buffer.getvalue())
    os.replace(tmp, path)  # atomic: parallel workers never read a half-written file
    return model, tokenizer, digest


class GreedyEvaluator:
    """Greedy exact-match accuracy per level on fixed problems (prompts tokenised once, left-padded)."""

    def __init__(self, tokenizer, problems: list[Problem]):
        self.tokenizer, self.problems = tokenizer, problems
        tokenizer.padding_side = "left"
        self.encoded = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
        self.levels = [p.level for p in problems]

    @torch.no_grad()
    def solved(self, model) -> torch.Tensor:
        """``(len(problems),)`` bool: the greedy completion equals the answer."""
        was_training = model.training
        model.eval()
        out = model.generate(
            **self.encoded, max_new_tokens=MAX_COMPLETION_TOKENS, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        model.train(was_training)
        texts = self.tokenizer.batch_decode(out[:, self.encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        return torch.tensor([completion_text(t) == p.answer for t, p in zip(texts, self.problems)])

    def accuracy_by_level(self, model) -> dict[str, float]:
        correct = self.solved(model).float()
        return {level: float(correct[[lv == level for lv in self.levels]].mean()) for level in LEVELS}


def mean_over_levels(by_level: dict[str, float]) -> float:
    return sum(by_level.values()) / len(by_level)


def to_dataset(problems: list[Problem]):
    """A ``datasets.Dataset`` with ``prompt``, ``answer``, ``level`` and ``prompt_id`` columns."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [p.prompt for p in problems],
            "answer": [p.answer for p in problems],
            "level": [p.level for p in problems],
            "prompt_id": list(range(len(problems))),
        }
    )


@dataclass(frozen=True)
class RunSettings:
    """One GRPO run's trainer settings (the same for every configuration: the same rollout budget)."""

    steps: int = 240
    prompts_per_step: int = 16
    num_generations: int = 4
    lr: float = 1e-4
    eval_every: int = 20

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations


def grpo_run(
    warm_model,
    tokenizer,
    pool: list[Problem],
    evaluator: GreedyEvaluator,
    plugins: list,
    run: RunSettings,
    seed: int,
    reward_funcs: list | None = None,
    on_trainer=None,
) -> dict[str, Any]:
    """Train a copy of ``warm_model`` with ``PluginGRPOTrainer`` and ``plugins`` (an empty list: vanilla) on
    ``pool`` for ``run.steps`` optimiser steps, one generation round per step, single-threaded.

    ``reward_funcs``: the rewards (default: the exact answer alone). ``on_trainer(trainer)`` is called once
    the trainer is built (the oracle takes its model there).

    Returns the accuracy per level at step 0 and every ``run.eval_every`` steps (``curve``: a list of
    ``[step, {level: accuracy}]``), the completions generated (``rollouts``), the training reward per step,
    and the wall and CPU seconds of training and of evaluation.
    """
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from grpo_plugins_trl import PluginGRPOConfig, PluginGRPOTrainer

    torch.set_num_threads(1)
    curve: list[list[Any]] = []
    eval_seconds = [0.0]

    class Evaluate(TrainerCallback):
        def _record(self, step, model):
            start = time.process_time()
            curve.append([step, evaluator.accuracy_by_level(model)])
            eval_seconds[0] += time.process_time() - start

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % run.eval_every == 0 or state.global_step == state.max_steps:
                self._record(state.global_step, model)

    config = PluginGRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo_learning_"), use_cpu=True, bf16=False, gradient_checkpointing=False,
        max_steps=run.steps, per_device_train_batch_size=run.rollouts_per_step, gradient_accumulation_steps=1,
        num_generations=run.num_generations, max_completion_length=MAX_COMPLETION_TOKENS, learning_rate=run.lr,
        lr_scheduler_type="constant", warmup_steps=0, beta=0.0, temperature=1.0, logging_steps=1, report_to="none",
        save_strategy="no", seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    rewards = reward_funcs or [exact_answer_reward]
    trainer = PluginGRPOTrainer(
        model=copy.deepcopy(warm_model), reward_funcs=rewards if len(rewards) > 1 else rewards[0], args=config,
        train_dataset=to_dataset(pool), processing_class=tokenizer, callbacks=[Evaluate()], plugins=plugins,
    )
    trainer.remove_callback(PrinterCallback)
    if on_trainer is not None:
        on_trainer(trainer)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    logs = [row for row in trainer.state.log_history if "reward" in row]
    return {
        "curve": curve,
        "rollouts_per_step": run.rollouts_per_step,
        "rollouts": run.steps * run.rollouts_per_step,
        "reward": [row["reward"] for row in logs],
        "seconds_wall": wall,
        "seconds_cpu": cpu,
        "seconds_eval_cpu": eval_seconds[0],
        "trainer": trainer,
    }
