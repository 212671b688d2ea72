"""The corridor (``corridor.py``'s rules) as a verl agent loop, and its verl dataset.

:class:`CorridorAgentLoop` plays one episode per session. Each turn the policy writes up to
``data.max_response_length`` tokens (its first token is the action) and the environment answers with the new
cell; verl stores each turn as its own row, ``{uid}_{session}_{turn}`` (the turn's context as the prompt, the
policy's tokens as the response). Every turn row carries, in its ``extra_fields``, the ``step_key`` of the
state it acted in (the start cell and the current cell, as on TRL), which the grpo-plugins verl adapter reads
into ``GRPOBatch.steps`` for methods that need it (``gigpo``). The last turn carries the episode's reward (1
for reaching cell 4), which verl copies to the session's other turns.

Register it with verl's ``actor_rollout_ref.rollout.agent.agent_loop_config_path`` (:data:`AGENT_LOOPS`,
this folder on ``PYTHONPATH``) and select it with ``actor_rollout_ref.rollout.agent.default_agent_loop=corridor_agent``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import uuid4

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput

from corridor import GOAL, state_key, step

AGENT_LOOPS = Path(__file__).with_name("agent_loops.yaml")
"""verl's agent-loop config naming :class:`CorridorAgentLoop` ``corridor_agent``."""
MAX_TURNS = 4


def corridor_rows(n: int, seed: int = 0, offset: int = 0) -> list[dict]:
    """``n`` rows of verl's RL dataset schema: the prompt ``"s ="`` with start cells 0..3."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        start = rng.randrange(GOAL)
        rows.append({"data_source": "corridor", "prompt": [{"role": "user", "content": f"{start} ="}],
                     "ability": "agent", "reward_model": {"style": "rule", "ground_truth": str(GOAL)},
                     "extra_info": {"index": offset + i}})
    return rows


class CorridorAgentLoop(AgentLoopBase):
    """One corridor episode per session, one output (row) per policy turn."""

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> list[AgentLoopOutput]:
        messages = list(kwargs["raw_prompt"])
        text = messages[-1]["content"]
        cell = int(text.split()[0])
        chat = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        context = self.tokenizer.encode(chat)
        limit = int(self.rollout_config.response_length)
        outputs: list[AgentLoopOutput] = []
        for turn in range(MAX_TURNS):
            key = state_key(text, cell)
            generated = await self.server_manager.generate(request_id=uuid4().hex, prompt_ids=context,
                                                           sampling_params=sampling_params)
            tokens = list(generated.token_ids[:limit]) or [self.tokenizer.eos_token_id]
            cell = step(cell, self.tokenizer.convert_ids_to_tokens(tokens[0]))
            log_probs = list(generated.log_probs[: len(tokens)]) if generated.log_probs else None
            outputs.append(AgentLoopOutput(
                prompt_ids=list(context), response_ids=tokens, response_mask=[1] * len(tokens),
                response_logprobs=log_probs, num_turns=2 * (turn + 1), metrics={},
                extra_fields={**(generated.extra_fields or {}), "step_key": key},
            ))
            if cell == GOAL:
                break
            context = context + tokens + self.tokenizer.encode(f" {cell} =")
        reward = float(cell == GOAL)
        outputs[-1].reward_score = reward  # verl copies it to the session's other turns
        outputs[-1].extra_fields["reward_extra_info"] = {"score": reward}
        return outputs
