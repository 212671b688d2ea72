"""``PluginSampler``: TRL's ``RepeatSampler`` layout with prompts and rollout counts chosen by methods.

One round is ``budget`` (= ``generation_batch_size``) dataset indices, each prompt repeated by its
rollout count, consecutively; it is yielded ``repeat_count`` (= ``num_iterations * steps_per_generation``)
times because TRL consumes the dataloader on every micro-step but generates from the first block.
Every rank builds the same seeded sampler and calls the same hooks, so all ranks see identical rounds.
The dataloader fetches one batch ahead: a method's state reaches its sampling one round late.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import Sampler

from grpo_plugins import Composition, PromptRound


class PluginSampler(Sampler[int]):
    """Yields rounds planned by ``sample_prompts`` and ``allocate_rollouts``.

    Without a ``sample_prompts`` provider, prompts are drawn like ``RepeatSampler``: a seeded
    permutation of the dataset cut into rounds of ``num_prompts``. Without an ``allocate_rollouts``
    provider, the budget is split evenly over the round's prompts (``default_rollouts`` each for
    ``num_prompts`` prompts). ``total_steps`` returns the run's length when known (read when a round
    is planned, since the trainer sets it after building the dataloader).
    """

    def __init__(
        self,
        composition: Composition,
        dataset_size: int,
        num_prompts: int,
        budget: int,
        default_rollouts: int,
        repeat_count: int,
        steps_per_round: float,
        shuffle: bool = True,
        seed: int = 0,
        on_round: Callable[[torch.Tensor], None] | None = None,
        total_steps: Callable[[], int | None] | None = None,
    ):
        self.composition = composition
        self.dataset_size = dataset_size
        self.num_prompts = num_prompts
        self.budget = budget
        self.default_rollouts = default_rollouts
        self.repeat_count = repeat_count
        self.steps_per_round = steps_per_round
        self.shuffle = shuffle
        self.on_round = on_round
        self.total_steps = total_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.rounds_planned = 0

    @property
    def rounds_per_epoch(self) -> int:
        return self.dataset_size // self.num_prompts

    def _plan(self, default_prompts: torch.Tensor) -> torch.Tensor:
        """``(budget,)`` dataset indices of one round."""
        round = PromptRound(
            num_prompts=self.num_prompts,
            budget=self.budget,
            dataset_size=self.dataset_size,
            step=int(self.rounds_planned * self.steps_per_round),
            default_rollouts=self.default_rollouts,
            total_steps=self.total_steps() if self.total_steps is not None else None,
        )
        prompts = self.composition.run_sample_prompts(round, self.generator)
        if prompts is None:
            prompts = default_prompts
        counts = self.composition.rollout_counts(round, prompts)
        self.rounds_planned += 1
        return torch.repeat_interleave(prompts, counts)

    def __iter__(self) -> Iterator[int]:
        order = (
            torch.randperm(self.dataset_size, generator=self.generator)
            if self.shuffle
            else torch.arange(self.dataset_size)
        )
        for r in range(self.rounds_per_epoch):
            indices = self._plan(order[r * self.num_prompts : (r + 1) * self.num_prompts])
            if self.on_round is not None:
                self.on_round(indices)
            block = indices.tolist()
            for _ in range(self.repeat_count):
                yield from block

    def __len__(self) -> int:
        return self.rounds_per_epoch * self.budget * self.repeat_count
