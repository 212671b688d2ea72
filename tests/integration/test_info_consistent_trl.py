"""info_consistent in the real TRL GRPOTrainer: the dataset's ``prompt_id`` column (a request id shared
by paraphrase variant rows, unrelated to the dataset index) keys the groups; each variant row keeps
its own text through ``augment_prompts``; two tiny steps alone and composed with round 1's ``llds``."""

from __future__ import annotations

import math
import random

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from grpo_plugins_trl.testing import tiny_grpo_run  # noqa: E402

REQUEST_ID_OFFSET = 1000  # request ids far from every dataset index (0 .. 31)
CONFIG = {
    "variants_per_request": 2,
    "rollouts_per_variant": 2,  # budget 8 = 2 requests x 2 variants x 2 completions
    "unit_pattern": r"\S+",  # the tiny tokenizer decodes digits one per word
    "helpfulness": "reward",
}


def paraphrase_dataset(num_requests: int = 16, seed: int = 0):
    """Two variant rows per request, contiguous: ``"a + b ="`` and ``"b + a ="`` (a != b), sharing
    ``prompt_id = 1000 + request``."""
    from datasets import Dataset

    rng = random.Random(seed)
    prompts, answers, ids = [], [], []
    for request in range(num_requests):
        a = rng.randint(0, 8)
        b = rng.choice([x for x in range(10) if x != a])
        prompts += [f"{a} + {b} =", f"{b} + {a} ="]
        answers += [str(a + b)] * 2
        ids += [REQUEST_ID_OFFSET + request] * 2
    return Dataset.from_dict({"prompt": prompts, "answer": answers, "prompt_id": ids})


def logged(trainer, key: str) -> list[float]:
    return [row[key] for row in trainer.state.log_history if key in row]


def check_groups_are_requests(trainer) -> None:
    batch = trainer.last_plugin_batch
    ids = batch.group_prompt_ids.tolist()
    assert all(i >= REQUEST_ID_OFFSET for i in ids), ids  # the prompt_id column, not the dataset index
    assert batch.group_sizes.tolist() == [4, 4]
    for group in range(batch.num_groups):
        members = (batch.group_index == group).nonzero().flatten().tolist()
        texts = {batch.prompts[i] for i in members}
        assert len(texts) == 2, texts  # both phrasings of the request, each kept through augment_prompts
        operands = [sorted(x.strip() for x in t.replace("=", "").split("+")) for t in texts]
        assert operands[0] == operands[1]  # the same request, phrased twice


def test_prompt_id_column_keys_the_groups_alone():
    trainer = tiny_grpo_run([{"info_consistent": CONFIG}], max_steps=2, dataset=paraphrase_dataset())
    check_groups_are_requests(trainer)
    rounds = list(trainer._plugin_rounds)
    for indices in rounds:  # per request: rows 2j, 2j, 2j + 1, 2j + 1 (each variant row twice, adjacent)
        blocks = indices.view(-1, 4)
        first = blocks[:, :1]
        assert bool((first % 2 == 0).all()) and bool((blocks == first + torch.tensor([0, 0, 1, 1])).all()), indices
    stability = logged(trainer, "plugins/info_consistent/stability_reward_mean")
    assert stability and all(-math.log(2) <= s <= 0 for s in stability)
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_composed_with_llds():
    trainer = tiny_grpo_run(
        [{"info_consistent": CONFIG}, "llds"], max_steps=2, dataset=paraphrase_dataset(), beta=0.0
    )
    check_groups_are_requests(trainer)
    assert logged(trainer, "plugins/info_consistent/group_instability_mean")
    assert any(key.startswith("plugins/llds/") for row in trainer.state.log_history for key in row)
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_missing_prompt_id_column_stops_the_first_round():
    from datasets import Dataset

    data = paraphrase_dataset().to_dict()
    del data["prompt_id"]
    with pytest.raises(Exception, match=r"info_consistent.*column 'prompt_id'"):
        tiny_grpo_run([{"info_consistent": CONFIG}], max_steps=1, dataset=Dataset.from_dict(data))
