"""Injected rows on TRL (grpo_plugins_trl.injection): rows appended after scoring with their kind in the
batch and the loss stage, tokenised as completions, scored by the trainer unless given a reward, with
log-probs like every row; the counts that split and normalise the batch (num_items_in_batch,
steps_per_generation, gradient accumulation, num_iterations, filler rows) stay right; refusals at
start-up."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from grpo_plugins import CompositionError, Method, hookimpl  # noqa: E402
from grpo_plugins.injection import INJECTED_KEY, kind_code  # noqa: E402
from grpo_plugins.testing import BatchRecorder  # noqa: E402
from grpo_plugins_trl.testing import tiny_grpo_run, tiny_tokenizer  # noqa: E402


class Injector(Method):
    """Injects, into the first group, its answer as text (scored by the trainer); into the second, token ids
    with a given reward; with ``every_group``, one token-id row per group."""

    name = "injector"

    def __init__(self, every_group: bool = False):
        super().__init__()
        self.every_group = every_group

    @hookimpl
    def inject_rows(self, batch):
        groups = batch.group_prompt_ids.tolist()
        if self.every_group:
            return [{"prompt_id": p, "completion": [5, 6, 7], "kind": "tokens", "reward": 0.5} for p in groups]
        first = batch.prompt_ids.tolist().index(groups[0])
        return [{"prompt_id": groups[0], "completion": batch.rows[first]["answer"], "kind": "demo"},
                {"prompt_id": groups[1], "completion": [5, 6, 7], "kind": "tokens", "reward": 0.25}]


class LossRecorder(Method):
    """Records what each loss micro-batch sees: the rows' kinds, token counts and old log-probs."""

    name = "loss_recorder"

    def __init__(self):
        super().__init__()
        self.micro_batches: list[dict] = []

    def needs(self):
        from grpo_plugins import Needs

        return Needs(loss_fields={"row_data"})

    @hookimpl
    def gate_loss(self, inputs):
        self.micro_batches.append({"kind": inputs.row_data[INJECTED_KEY].clone(), "tokens": inputs.mask.sum(-1).clone(),
                                   "old": inputs.old_log_probs.detach().clone(), "mask": inputs.mask.clone()})
        return torch.ones_like(inputs.log_probs[:, :1])


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def test_injected_rows_are_tokenised_scored_and_marked_in_batch_and_loss():
    recorder, losses = BatchRecorder(needs=("old_log_probs",)), LossRecorder()
    trainer = tiny_grpo_run([Injector(), recorder, losses], max_steps=1)
    batch = recorder.batches[0]
    assert batch.num_completions == 8 + 2
    codes = batch.row_data[INJECTED_KEY]
    assert codes.tolist() == [0] * 8 + [kind_code("demo"), kind_code("tokens")]
    groups = batch.prompt_ids[:8].unique(sorted=True).tolist()
    assert batch.prompt_ids[8:].tolist() == groups[:2]  # each row joined its prompt's group
    assert batch.rewards[8] == 1.0  # the answer, scored by exact_answer_reward
    assert batch.rewards[9] == 0.25 and torch.isnan(batch.reward_components[9]).all()  # given: not scored
    tokenizer = tiny_tokenizer()
    answer = batch.rows[8]["answer"]
    expected = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    length = int(batch.completion_mask[8].sum())
    assert batch.completion_ids[8, :length].tolist() == expected[:6]  # cut at max_completion_length=6
    assert batch.completion_ids[9, :3].tolist() == [5, 6, 7] and batch.completion_mask[9].sum() == 3
    old = batch.old_log_probs[8:][batch.completion_mask[8:] > 0]
    assert bool(torch.isfinite(old).all()) and bool((old < 0).all())
    assert batch.prompts[8] == batch.prompts[batch.prompt_ids.tolist().index(groups[0])]
    # the loss stage sees every row once per step, with its kind; the token counts are TRL's normaliser
    kinds = torch.cat([m["kind"] for m in losses.micro_batches])
    assert sorted(kinds.tolist()) == sorted(codes.tolist())
    assert sum(float(m["tokens"].sum()) for m in losses.micro_batches) == float(batch.completion_mask.sum())
    assert logged(trainer, "injection/rows") == [2.0] and logged(trainer, "injection/demo") == [1.0]
    assert logged(trainer, "injection/filler_rows") == [0.0]
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_filler_rows_complete_the_split_and_every_row_trains_once_per_iteration():
    """3 groups of 2 per generation batch + 3 injected rows = 9 rows, split in 2 (steps_per_generation):
    one filler row without tokens; with num_iterations=2 each row reaches the loss twice."""
    recorder, losses = BatchRecorder(), LossRecorder()
    trainer = tiny_grpo_run([Injector(every_group=True), recorder, losses], max_steps=2, per_device_train_batch_size=3,
                            num_generations=2, gradient_accumulation_steps=2, num_iterations=2)
    assert logged(trainer, "injection/filler_rows")[0] == 1.0
    batch = recorder.batches[0]
    assert batch.num_completions == 9  # the filler is in no GRPOBatch
    first = losses.micro_batches[:2]  # the first optimiser step: the whole generation batch, in 2 micro-batches
    assert [len(m["kind"]) for m in first] == [5, 5]
    tokens = torch.cat([m["tokens"] for m in first])
    assert int((tokens == 0).sum()) == 1  # the filler: no completion token
    assert float(tokens.sum()) == float(batch.completion_mask.sum())
    again = torch.cat([m["kind"] for m in losses.micro_batches[2:4]])
    assert sorted(again.tolist()) == sorted(torch.cat([m["kind"] for m in first]).tolist())  # the second iteration


def test_injected_rows_get_reference_log_probs_equal_to_the_initial_policy():
    """beta > 0: at the first batch the policy is the reference, so every row's old and reference log-probs agree."""
    recorder = BatchRecorder(needs=("old_log_probs", "ref_log_probs"))
    tiny_grpo_run([Injector(), recorder, LossRecorder()], max_steps=1, beta=0.1)
    batch = recorder.batches[0]
    mask = batch.completion_mask > 0
    assert torch.allclose(batch.old_log_probs[mask], batch.ref_log_probs[mask], atol=1e-5)
    assert bool(mask[8:].any())


def test_no_injected_row_leaves_the_batch_as_trl_built_it():
    class Nothing(Method):
        name = "nothing"

        @hookimpl
        def inject_rows(self, batch):
            return []

    recorder = BatchRecorder()
    trainer = tiny_grpo_run([Nothing(), recorder], max_steps=1)
    assert recorder.batches[0].num_completions == 8
    assert recorder.batches[0].row_data[INJECTED_KEY].tolist() == [0] * 8
    assert logged(trainer, "injection/rows") == [0.0]


def test_without_an_injecting_method_nothing_is_installed():
    trainer = tiny_grpo_run(["ngrpo"], max_steps=1, train=False)
    assert trainer.plugin_injection is None


def test_refused_at_start_up_with_whole_groups_and_with_trl_normalising_the_batch():
    pytest.importorskip("grpo_plugin_copg")
    with pytest.raises(CompositionError, match="inject rows.*whole_groups"):
        tiny_grpo_run([Injector(), "copg"], max_steps=1, train=False)
    with pytest.raises(CompositionError, match="row_injection.*multi_objective_aggregation"):
        tiny_grpo_run([Injector()], max_steps=1, train=False, multi_objective_aggregation="normalize_then_sum")


def test_a_bad_row_names_the_method():
    class Bad(Method):
        name = "bad"

        @hookimpl
        def inject_rows(self, batch):
            return [{"prompt_id": -5, "completion": "x"}]

    with pytest.raises(ValueError, match=r"inject_rows of \['bad'\]: row 0: prompt_id=-5 is not a prompt of the batch"):
        tiny_grpo_run([Bad()], max_steps=1)



@pytest.mark.distributed
def test_two_processes_spread_injected_rows_and_fillers_evenly(tmp_path):
    """2 ranks x 6 rows (6 groups of 2) + 6 injected rows = 18 rows, steps_per_generation=2: 10 rows per rank,
    the last 2 of rank 1 fillers; both ranks hold the same global batch and count the same tokens."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    worker = Path(__file__).with_name("trl_injection_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(worker),
                             str(tmp_path)], capture_output=True, text=True, timeout=230, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["local_rows"] == rank1["local_rows"] == [10, 10] and rank0["fillers"][0] == 2.0
    for b0, b1, items0, items1 in zip(rank0["batches"], rank1["batches"], rank0["num_items"], rank1["num_items"]):
        for key in b0:
            assert torch.equal(b0[key], b1[key]), key
        assert b0["prompt_ids"].shape == (18,) and int((b0["kinds"] != 0).sum()) == 6
        assert items0 == items1 == int(b0["mask"].sum())  # TRL's normaliser: every real token, fillers add none
    # the first step (a whole generation batch: 2 micro-batches per rank) sees each real row once, plus 2 fillers
    seen = [m for rank in (rank0, rank1) for m in rank["micro_batches"][:2]]
    tokens = torch.cat([m["tokens"] for m in seen])
    kinds = torch.cat([m["kind"] for m in seen])
    assert tokens.numel() == 20 and int((tokens == 0).sum()) == 2
    assert float(tokens.sum()) == float(rank0["batches"][0]["mask"].sum())
    assert sorted(kinds[tokens > 0].tolist()) == sorted(rank0["batches"][0]["kinds"].tolist())


def test_rows_are_injected_into_the_refilled_batch():
    """Batch editing runs first: a group dropped at the first round is refilled, then every group of the
    refilled batch gets its row."""

    class DropFirstOnce(Method):
        name = "drop_first_once"

        def __init__(self):
            super().__init__()
            self.calls = 0

        @hookimpl
        def keep_rows(self, batch):
            self.calls += 1
            keep = torch.ones(batch.num_completions, dtype=torch.bool)
            if self.calls == 1:
                keep &= batch.prompt_ids != batch.prompt_ids.min()
            return keep

    recorder = BatchRecorder()
    trainer = tiny_grpo_run([DropFirstOnce(), Injector(every_group=True), recorder], max_steps=1)
    assert logged(trainer, "batch_editing/generation_rounds") == [2.0]
    batch = recorder.batches[0]
    generated = batch.row_data[INJECTED_KEY] == 0
    assert int(generated.sum()) == 8 and batch.num_completions == 10
    assert sorted(batch.prompt_ids[~generated].tolist()) == sorted(batch.prompt_ids[generated].unique().tolist())
