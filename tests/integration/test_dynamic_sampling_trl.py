"""Dynamic sampling (``filter_groups``) on TRL: groups dropped after scoring and refilled inside the step, tiny
CPU runs; and the same filter decision as verl's DAPO filter (its real ``ReplayBuffer`` over a real
TransferQueue) on the same batch."""

import math
import os
import shutil
import socket
import subprocess
import sys
import zlib

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from grpo_plugins.testing import BatchRecorder  # noqa: E402
from grpo_plugins import GRPOBatch, Method, hookimpl  # noqa: E402
from grpo_plugins.batch_editing import RefillExhausted, filter_groups_keep  # noqa: E402
from grpo_plugins.errors import CompositionError  # noqa: E402
from grpo_plugins_trl.testing import completion_text, tiny_grpo_run  # noqa: E402


def parity_reward(completions, **kwargs):
    """A 0/1 hash of the completion text: the tiny random model's groups are often, not always, mixed."""
    return [float(zlib.crc32(completion_text(c).encode()) % 2) for c in completions]


def sparse_reward(completions, **kwargs):
    """1 for one text hash in four: many groups are all 0."""
    return [float(zlib.crc32(completion_text(c).encode()) % 4 == 0) for c in completions]


def zero_reward(completions, **kwargs):
    return [0.0 for _ in completions]


def logged(trainer, prefix):
    return [{k: v for k, v in row.items() if k.startswith(prefix)} for row in trainer.state.log_history
            if any(k.startswith(prefix) for k in row)]


def test_off_by_default_nothing_runs():
    trainer = tiny_grpo_run(None, max_steps=1)
    assert trainer.plugin_refill is None and trainer._plugin_passthrough  # GRPOTrainer's own path, bit for bit
    assert not logged(trainer, "batch_editing/")


def test_filter_groups_trains_only_informative_groups_and_counts_the_refill():
    recorder = BatchRecorder()
    trainer = tiny_grpo_run([recorder], max_steps=3, reward_funcs=parity_reward, filter_groups=True)
    assert len(recorder.batches) == 3
    for batch in recorder.batches:  # every trained batch: full size, every group mixed
        assert batch.num_completions == trainer.args.generation_batch_size
        assert filter_groups_keep(batch).all()
        assert batch.group_sizes.tolist() == [trainer.num_generations] * batch.num_groups
    rows = logged(trainer, "batch_editing/")
    assert len(rows) == 3
    rollouts = [row["batch_editing/rollouts"] for row in rows]
    assert all(r == trainer.args.generation_batch_size + row["batch_editing/refill_rollouts"] for r, row in zip(rollouts, rows))
    assert sum(rollouts) == trainer.plugin_refill.total_rollouts
    assert sum(row["batch_editing/refill_rounds"] for row in rows) >= 1  # this seed drops groups and refills them
    assert all(math.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)
    assert all(row.get("plugins/grpo/frac_zero_advantage", 0.0) == 0.0 for row in trainer.state.log_history)


def test_steps_per_generation_and_iterations_reuse_the_refilled_batch():
    recorder = BatchRecorder()
    trainer = tiny_grpo_run([recorder], max_steps=2, reward_funcs=parity_reward, filter_groups=True,
                            gradient_accumulation_steps=2, steps_per_generation=4, num_iterations=2)
    assert trainer.args.generation_batch_size == 16
    # one generation batch spans 4 micro-steps x 2 iterations = 4 optimiser steps: generated once, refilled once
    assert len(logged(trainer, "batch_editing/")) == 1 and len(recorder.batches) <= 1
    assert all(math.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)


def test_exhausted_rounds_error_or_keep_dropped():
    with pytest.raises(RefillExhausted, match=r"after 2 generation round\(s\) \(max_num_gen_batches=2\)"):
        tiny_grpo_run(None, max_steps=1, reward_funcs=zero_reward, filter_groups=True, max_num_gen_batches=2)
    trainer = tiny_grpo_run(None, max_steps=1, reward_funcs=zero_reward, filter_groups=True, max_num_gen_batches=2,
                            on_refill_exhausted="keep_dropped")
    (row,) = logged(trainer, "batch_editing/")
    groups = trainer.args.generation_batch_size // trainer.num_generations
    assert row["batch_editing/generation_rounds"] == 2 and row["batch_editing/filled_with_dropped_groups"] == groups
    assert row["batch_editing/rollouts"] == 2 * trainer.args.generation_batch_size


def test_start_up_refusals():
    with pytest.raises(CompositionError, match="on_refill_exhausted='pad' must be one of"):
        tiny_grpo_run(None, train=False, filter_groups=True, on_refill_exhausted="pad")
    with pytest.raises(CompositionError, match="max_num_gen_batches=-1 must be a whole number >= 0"):
        tiny_grpo_run(None, train=False, filter_groups=True, max_num_gen_batches=-1)
    with pytest.raises(CompositionError, match=r"filter_groups_metric='acc' is neither 'reward' nor a reward function "
                                               r"of the run \(\['exact_answer_reward'\]\)"):
        tiny_grpo_run(None, train=False, filter_groups=True, filter_groups_metric="acc")
    pytest.importorskip("grpo_plugin_knapsack_rl")
    with pytest.raises(CompositionError, match=r"batch editing \(filter_groups\) refills the batch with groups of"):
        tiny_grpo_run(["knapsack_rl"], train=False, filter_groups=True)


class DropsOneRow(Method):
    name = "drops_one_row"

    @hookimpl
    def keep_rows(self, batch):
        return torch.arange(batch.num_completions) > 0


def test_a_keep_rows_mask_that_splits_a_group_is_refused():
    with pytest.raises(Exception, match=r"drops_one_row kept some rows of prompt id\(s\) \[\d+\] and dropped others"):
        tiny_grpo_run([DropsOneRow()], max_steps=1)


def test_plain_trainer_refuses_the_option(tmp_path):
    from trl import GRPOTrainer

    from grpo_plugins_trl import PluginGRPOConfig
    from grpo_plugins_trl.testing import arithmetic_dataset, tiny_model, tiny_tokenizer

    args = PluginGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                            num_generations=4, report_to="none", filter_groups=True)
    with pytest.raises(ValueError, match="enables filter_groups=True, which only grpo_plugins_trl.PluginGRPOTrainer runs"):
        GRPOTrainer(model=tiny_model(), reward_funcs=parity_reward, args=args, train_dataset=arithmetic_dataset(8),
                    processing_class=tiny_tokenizer())


# ----------------------------------------------------------------------------- against verl's DAPO filter
REWARDS = {  # uid -> rewards of its trajectories
    "a": [1.0, 1.0, 1.0, 1.0],  # all right: dropped
    "b": [0.0, 1.0, 0.0, 0.0],  # mixed: kept
    "c": [0.0, 0.0, 0.0, 0.0],  # all wrong: dropped
    "d": [0.5],  # a group of one: kept by verl (len == 1), and here
    "e": [0.25, 0.75, 0.25],  # mixed: kept
    "f": [-2.5, -2.5],  # constant, negative: dropped
}


def test_same_kept_groups_as_verl_dapo_filter():
    """verl 0.9.1's V1 ``ReplayBuffer._dapo_filtered_keys`` (``algorithm.filter_groups.metric=reward``) over a real
    TransferQueue, against :func:`filter_groups_keep` on the same rewards and uids."""
    ray = pytest.importorskip("ray")
    tq = pytest.importorskip("transfer_queue")
    pytest.importorskip("verl")
    from omegaconf import OmegaConf
    from tensordict import TensorDict
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    try:
        keys = [f"{uid}_{i}" for uid, values in REWARDS.items() for i in range(len(values))]
        # verl's canonical reward: rm_scores summed over the response tokens (here the last token holds it)
        scores = torch.tensor([[0.0, 0.0, r] for values in REWARDS.values() for r in values])
        tq.kv_batch_put(keys=keys, partition_id="train", fields=TensorDict({"rm_scores": scores}, batch_size=len(keys)),
                        tags=[{"status": "finished"} for _ in keys])
        for uid in REWARDS:
            tq.kv_put(key=uid, partition_id="train", tag={"is_prompt": True, "status": "finished", "global_steps": 0})
        buffer = ReplayBuffer(trainer_mode="sync", trainer_config=OmegaConf.create({}), max_off_policy_threshold=None,
                              max_off_policy_strategy="drop", sampler_kwargs=OmegaConf.create({}),
                              refill_fn=lambda count: None, filter_groups_metric="reward", train_batch_size=len(REWARDS),
                              gen_batch_size=1)
        buffer._sync_metadata_from_transfer_queue()
        verl_dropped, _ = buffer._dapo_filtered_keys("train")
        verl_kept = buffer._sampleable_terminal_keys("train", buffer._terminal_eviction_reasons(0, "train"))
    finally:
        tq.close()
        if started:
            ray.shutdown()
    uids = sorted(REWARDS)
    batch = GRPOBatch(prompt_ids=torch.tensor([uids.index(k.split("_")[0]) for k in keys]), rewards=scores.sum(1))
    ours = filter_groups_keep(batch)
    kept = {uids[int(p)] for p, keep in zip(batch.prompt_ids, ours) if keep}
    assert kept == set(verl_kept) == {"b", "d", "e"}
    assert set(uids) - kept == verl_dropped == {"a", "c", "f"}


# ----------------------------------------------------------------------------- two data-parallel processes
def test_two_processes_make_the_same_decisions(tmp_path):
    """torchrun, 2 CPU processes (gloo): both ranks refill identically, and each trains its slice of one global batch."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), __file__, str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["plans"] == rank1["plans"] and len(rank0["plans"]) == 2  # same rounds, same kept groups
    assert sum(plan["refill_rounds"] for plan in rank0["plans"]) >= 1
    assert len(rank0["batches"]) == len(rank1["batches"]) == 2
    for b0, b1, n0, n1 in zip(rank0["batches"], rank1["batches"], rank0["num_items"], rank1["num_items"]):
        for key in b0:
            assert torch.equal(b0[key], b1[key]), key
        assert b0["prompt_ids"].shape == (16,)
        batch = GRPOBatch(prompt_ids=b0["prompt_ids"], rewards=b0["rewards"])
        assert filter_groups_keep(batch).all() and batch.group_sizes.tolist() == [4, 4, 4, 4]
        assert n0 == n1 == int(b0["completion_mask"].sum())  # num_items_in_batch recounted over the kept rows
    for local, rows in ((rank0["local_ids"], slice(0, 8)), (rank1["local_ids"], slice(8, 16))):
        for ids, b in zip(local, rank0["batches"]):  # each rank holds its own rows of the global batch
            width = ids.shape[1]
            assert torch.equal(ids, b["completion_ids"][rows, :width])
            assert not bool(b["completion_mask"][rows, width:].any())


def _worker(out_dir: str) -> None:
    from grpo_plugins_trl import PluginGRPOTrainer

    class Recording(PluginGRPOTrainer):
        def _run_advantage_stage(self, out, n):
            self.local_ids = getattr(self, "local_ids", []) + [out["completion_ids"].clone()]
            self.num_items = getattr(self, "num_items", []) + [int(out["num_items_in_batch"])]
            super()._run_advantage_stage(out, n)
            self.plans = getattr(self, "plans", []) + [self.plugin_refill.last_plan.metrics()]

    class Keep(Method):
        name = "keep"

        def __init__(self, config=None):
            super().__init__(config)
            self.batches = []

        @hookimpl
        def observe(self, batch):
            self.batches.append({k: getattr(batch, k).clone() for k in ("prompt_ids", "rewards", "completion_ids",
                                                                         "completion_mask")})

    keep = Keep()
    trainer = tiny_grpo_run([keep], trainer_cls=Recording, max_steps=2, reward_funcs=sparse_reward, filter_groups=True,
                            per_device_train_batch_size=4, output_dir=os.path.join(out_dir, "run"))
    torch.save({"world": trainer.accelerator.num_processes, "batches": keep.batches, "plans": trainer.plans,
                "num_items": trainer.num_items, "local_ids": trainer.local_ids},
               os.path.join(out_dir, f"rank{trainer.accelerator.process_index}.pt"))


if __name__ == "__main__":
    _worker(sys.argv[1])
