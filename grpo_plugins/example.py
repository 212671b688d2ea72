"""What a method needs to be exercised by the conformance suite: its example run.

The conformance suite (:mod:`grpo_plugins.conformance`) builds random batches and runs every hook of
a method. Many methods read data a generic batch lacks (named reward components, dataset columns,
completion text, the run's length) or accept only some batches (rewards in ``[0, 1]``, groups of at
least ``n``). A method says so by overriding :meth:`grpo_plugins.Method.example`::

    @classmethod
    def example(cls) -> Example:
        return Example(
            reward_names=("accuracy", "format"),
            columns={"previous_return": lambda prompt_id: (prompt_id % 4) / 4},
            min_group_size=2,
        )

The suite builds every batch from this declaration; a method it still cannot run fails the suite with
the error it raised (it is never skipped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


@dataclass(frozen=True)
class Example:
    """The data and config of a method's example run.

    Attributes:
        config: the method's config in the suite (its defaults when empty); choose one that switches
            every hook on.
        methods: other methods enabled with it, in order (e.g. a method it needs), as run-list items.
        reward_names: the reward components every batch carries (``K`` of them; rewards are their sum
            with weight 1). At least two, so that multi-reward handling is exercised, unless the method
            needs exactly one.
        reward_values: the values each reward component takes (drawn at random per completion). None: any
            finite value — the suite then draws from ``{0, 1}`` and checks constant groups at
            non-dyadic scales up to ``1e4``.
        columns: dataset columns: ``{name: value_of(prompt_id)}``; every completion of a prompt carries
            its prompt's row. The method must declare each of them in ``needs().columns``.
        completions: texts the completions are drawn from (per completion, at random); empty: a text
            built from the completion's token ids.
        prompts: texts the prompts are drawn from (per prompt); empty: ``"prompt <id>"``.
        min_group_size: the smallest group (completions of one prompt) the method accepts; the suite
            checks that a smaller one is refused with an error. 1 where it accepts groups of one.
        dataset_size: prompts in the example dataset (prompt ids are ``0 .. dataset_size - 1``).
        round_prompts: prompts the trainer draws per generation round (``PromptRound.num_prompts``).
        rollouts_per_prompt: completions per prompt the trainer generates by default; a round's budget is
            ``round_prompts * rollouts_per_prompt``.
        total_steps: the run's length the batches and rounds carry (None: unknown).
        nonzero_constant_groups: why the method may give a group whose rewards are all equal a non-zero
            advantage (e.g. a virtual sample, a running baseline); empty: it must give exactly 0.
        order_dependent: why permuting the rows of a batch may change more than the order of the outputs
            (e.g. random subsets drawn by position); empty: it must not.
        temperatures: temperatures of ``GRPOBatch.old_log_probs_at`` every batch carries (random log-probs
            per temperature), for a method that reads the field (``Needs.temperatures``).
    """

    config: Mapping[str, Any] = field(default_factory=dict)
    methods: Sequence[Any] = ()
    reward_names: Sequence[str] = ("reward_0", "reward_1")
    reward_values: Sequence[float] | None = None
    columns: Mapping[str, Callable[[int], Any]] = field(default_factory=dict)
    completions: Sequence[str] = ()
    prompts: Sequence[str] = ()
    min_group_size: int = 2
    dataset_size: int = 32
    round_prompts: int = 4
    rollouts_per_prompt: int = 4
    total_steps: int | None = 20
    nonzero_constant_groups: str = ""
    order_dependent: str = ""
    temperatures: Sequence[float] = ()

    def __post_init__(self):
        if not self.reward_names:
            raise ValueError("Example.reward_names must name at least one reward component")
        if self.min_group_size < 1:
            raise ValueError(f"Example.min_group_size must be >= 1, got {self.min_group_size}")
        if self.dataset_size < 8:
            raise ValueError(f"Example.dataset_size must be >= 8, got {self.dataset_size}")
        if self.round_prompts < 1 or self.rollouts_per_prompt < 1:
            raise ValueError("Example.round_prompts and rollouts_per_prompt must be >= 1")
        if self.reward_values is not None and not self.reward_values:
            raise ValueError("Example.reward_values must hold at least one value (or be None: any value)")
