"""A tiny multi-turn environment, written here (no downloads): walk a corridor of cells 0..4 to cell 4.

A prompt ``"s ="`` starts the walker at cell ``s``. Each turn the policy writes up to ``tokens_per_turn``
tokens; its first token is the action (a digit below 5 steps left, any other token right; walls hold).
The environment answers with the new cell and ``=`` (tokens the policy did not write: ``env_mask`` 0).
An episode ends at cell 4 or after ``max_turns`` turns; the reward is 1 for reaching cell 4.

:func:`make_rollout` is a TRL ``rollout_func``: besides the token ids it returns the per-row fields the
grpo-plugins TRL adapter reads into ``GRPOBatch.steps`` -- ``env_mask``, ``step_keys`` (the cell each
turn acted in, with the prompt: trajectories of one prompt that stand in the same cell share a key) and
``reached`` for the reward function.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

GOAL, CELLS = 4, 5


def corridor_dataset(n: int = 16, seed: int = 0):
    """``n`` prompts ``"s ="`` with start cells 0..3, and their ``prompt_id``."""
    from datasets import Dataset

    starts = torch.randint(0, GOAL, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"prompt": [f"{s} =" for s in starts], "prompt_id": list(range(n))})


def state_key(prompt: str, cell: int) -> int:
    """A 63-bit key of (the episode's start, the current cell)."""
    return int(prompt.split()[0]) * CELLS + cell


def step(cell: int, action_token: str) -> int:
    """The walker's next cell: left on a digit below 5, right otherwise; the walls at 0 and 4 hold."""
    right = not (action_token.isdecimal() and int(action_token) < 5)  # isdecimal: "²" is a digit int() refuses
    return min(max(cell + (1 if right else -1), 0), CELLS - 1)


def make_rollout(max_turns: int = 4, tokens_per_turn: int = 2) -> Callable[[list, Any], dict]:
    """A TRL ``rollout_func`` playing one episode per prompt with the trainer's current model."""

    @torch.no_grad()
    def rollout(prompts: list, trainer: Any) -> dict:
        tokenizer = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        out: dict[str, list] = {key: [] for key in ("prompt_ids", "completion_ids", "logprobs", "env_mask",
                                                   "step_keys", "reached")}
        for prompt in prompts:  # episodes, one after another: an example environment, not a hot path
            prompt_ids = tokenizer(prompt)["input_ids"]
            cell, context, completion, mask, keys = int(prompt.split()[0]), list(prompt_ids), [], [], []
            for turn in range(max_turns):
                keys.append(state_key(prompt, cell))
                generated = model.generate(torch.tensor([context]), max_new_tokens=tokens_per_turn, do_sample=True,
                                           temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id)[0, len(context):].tolist()
                generated = [t for t in generated if t != tokenizer.pad_token_id] or [tokenizer.eos_token_id]
                cell = step(cell, tokenizer.convert_ids_to_tokens(generated[0]))
                completion += generated
                mask += [1] * len(generated)
                if cell == GOAL or turn == max_turns - 1:
                    break
                observation = tokenizer(f"{cell} =")["input_ids"]
                completion += observation
                mask += [0] * len(observation)
                context += generated + observation
            out["prompt_ids"].append(prompt_ids)
            out["completion_ids"].append(completion)
            out["env_mask"].append(mask)
            out["step_keys"].append(keys)
            out["reached"].append(cell == GOAL)
        out["logprobs"] = None  # no importance-sampling correction: the trainer recomputes the log-probs
        model.train(was_training)
        return out

    return rollout


def reached_goal(completions: list, reached: list, **kwargs: Any) -> list[float]:
    """1.0 for an episode that reached cell 4."""
    return [1.0 if r else 0.0 for r in reached]
