"""A verifiable toy task for CPU training: addition problems of graded difficulty.

Shared by the demo (``examples/trl_demo.py``) and the learning benchmark (``benchmarks/learning.py``):
a locally built tokenizer and model (``grpo_plugins_trl.testing``), a dataset whose ``level`` column
is the number of digits per operand, a short supervised warm start so that rewards are neither all
0 nor all 1 when reinforcement learning begins, and greedy evaluation per difficulty level.
"""

from __future__ import annotations

import copy
import random
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from grpo_plugins_trl.testing import completion_text, exact_answer_reward, supervised_batch, tiny_model, tiny_tokenizer


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    level: int


def make_problems(n: int, levels: tuple[int, ...], seed: int) -> list[Problem]:
    """``n`` addition problems spread evenly over ``levels`` (digits per operand)."""
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        level = levels[i % len(levels)]
        a, b = rng.randrange(10**level), rng.randrange(10**level)
        problems.append(Problem(f"{a} + {b} =", str(a + b), level))
    return problems


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


def build_model(seed: int, hidden_size: int = 64, num_layers: int = 2):
    """The tiny Qwen2 model and its tokenizer (about 0.1M parameters at hidden 64)."""
    return tiny_model(seed, hidden_size=hidden_size, num_layers=num_layers), tiny_tokenizer()


def warm_start(model, tokenizer, problems: list[Problem], steps: int, seed: int, lr: float = 3e-3, batch: int = 32) -> None:
    """Supervised training on ``prompt answer <eos>`` (loss on the answer tokens only)."""
    gen = torch.Generator().manual_seed(seed)
    ids, labels, attention = supervised_batch(tokenizer, problems)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(problems), (batch,), generator=gen)
        loss = model(input_ids=ids[pick], attention_mask=attention[pick], labels=labels[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy_by_level(model, tokenizer, problems: list[Problem], max_new_tokens: int = 5) -> dict[int, float]:
    """Greedy exact-answer accuracy per difficulty level."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    enc = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = torch.tensor([completion_text(t) == p.answer for t, p in zip(texts, problems)], dtype=torch.float)
    levels = torch.tensor([p.level for p in problems])
    model.train(was_training)
    return {int(level): float(correct[levels == level].mean()) for level in levels.unique()}


def overall(acc: dict[int, float]) -> float:
    """Mean accuracy over levels."""
    return sum(acc.values()) / len(acc)


class EvalCallback(TrainerCallback):
    """Greedy accuracy on held-out problems at step 0 and every ``every`` optimiser steps."""

    def __init__(self, problems: list[Problem], tokenizer, every: int):
        self.problems, self.tokenizer, self.every = problems, tokenizer, every
        self.curve: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.curve.append((0, overall(accuracy_by_level(model, self.tokenizer, self.problems))))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.curve.append((state.global_step, overall(accuracy_by_level(model, self.tokenizer, self.problems))))


# The metric that best says what a method did (a method not listed shows its first metric).
HEADLINE_METRICS = {
    "knapsack_rl": "max_rollouts", "ngrpo": "frac_uniform_groups_with_signal", "unlikeliness": "frac_flat_groups_after",
    "spo": "mean_baseline", "vade": "mean_rho", "llds": "frac_gated_actions", "gtpo": "frac_conflict_tokens",
}


class ProgressBar(TrainerCallback):
    """One progress bar per run, with the numbers that matter: the training reward (mean of the last 10
    steps), the latest held-out greedy accuracy, and for each method its headline metric."""

    def __init__(self, label: str, evaluator: EvalCallback):
        self.label, self.evaluator = label, evaluator
        self.rewards: list[float] = []
        self.methods: dict[str, dict[str, float]] = {}
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc=self.label, unit="step", dynamic_ncols=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "reward" in logs:
            self.rewards.append(logs["reward"])
        for key, value in logs.items():
            if key.startswith("plugins/") and key.count("/") == 2:
                _, method, name = key.split("/")
                self.methods.setdefault(method, {})[name] = value
        if self.bar is not None:
            self.bar.n = state.global_step
            self.bar.set_postfix_str(self.summary(), refresh=True)

    def summary(self) -> str:
        recent = self.rewards[-10:]
        parts = [f"reward {sum(recent) / len(recent):.2f}" if recent else "reward -"]
        if self.evaluator.curve:
            parts.append(f"acc {self.evaluator.curve[-1][1]:.2f}")
        for method, values in self.methods.items():
            name = HEADLINE_METRICS.get(method, "")
            name = name if name in values else min(values)
            parts.append(f"{method} {name}={values[name]:.3g}")
        return " | ".join(parts)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def run_grpo(
    warm_model,
    tokenizer,
    dataset,
    eval_problems: list[Problem],
    *,
    plugins: list | None,
    steps: int,
    rollouts_per_step: int = 32,
    num_generations: int = 4,
    lr: float = 3e-4,
    seed: int = 0,
    eval_every: int = 5,
    num_iterations: int = 1,
    progress: bool = False,
    label: str = "GRPO",
) -> dict[str, Any]:
    """Train a copy of ``warm_model`` with GRPO for ``steps`` optimiser steps of ``rollouts_per_step``
    completions each (each generation batch reused for ``num_iterations`` steps): ``trl.GRPOTrainer`` when ``plugins`` is None, else ``PluginGRPOTrainer``.
    ``progress`` shows one :class:`ProgressBar` named ``label`` instead of the trainer's per-step log lines.

    Returns the trainer, the reward per step, the accuracy curve ``[(step, accuracy)]`` and the final
    accuracy per level.
    """
    from trl import GRPOConfig, GRPOTrainer

    from grpo_plugins_trl import PluginGRPOTrainer

    evaluator = EvalCallback(eval_problems, tokenizer, every=eval_every)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo_arith_"), use_cpu=True, bf16=False, gradient_checkpointing=False,
        max_steps=steps, per_device_train_batch_size=rollouts_per_step // 2, gradient_accumulation_steps=2,
        num_generations=num_generations, num_iterations=num_iterations, max_completion_length=5, learning_rate=lr,
        beta=0.0, temperature=1.0,
        logging_steps=1, report_to="none", save_strategy="no", seed=seed, disable_tqdm=True,
    )
    kwargs: dict[str, Any] = dict(
        model=copy.deepcopy(warm_model), reward_funcs=exact_answer_reward, args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[evaluator],
    )
    trainer_cls = GRPOTrainer
    if plugins is not None:
        trainer_cls, kwargs["plugins"] = PluginGRPOTrainer, plugins
    trainer = trainer_cls(**kwargs)
    trainer.remove_callback(PrinterCallback)  # no raw metric dictionary per step
    if progress:
        trainer.add_callback(ProgressBar(label, evaluator))
    trainer.train()
    logs = [row for row in trainer.state.log_history if "reward" in row]
    return {
        "trainer": trainer,
        "reward": [row["reward"] for row in logs],
        "accuracy": evaluator.curve,
        "final_accuracy_by_level": accuracy_by_level(trainer.model, tokenizer, eval_problems),
    }
