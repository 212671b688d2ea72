"""The ``grpo_plugins`` V1 trainer's CPU-runnable parts: round planning, extras, observe, checkpoints.

verl's trainer cannot start without GPUs (see the README); these tests drive its methods on an
instance built without ``__init__``, with verl's real collate function, TensorDict conversion and
agent-loop column handling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict.tensorclass import NonTensorData, NonTensorStack
from torchdata.stateful_dataloader import StatefulDataLoader
from verl.trainer.ppo.v1.trainer_base import get_trainer_cls
from verl.utils.dataset.rl_dataset import collate_fn
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

import grpo_plugins_verl
from grpo_plugins import CompositionError, GRPOBatch, Method, hookimpl
from grpo_plugins_verl.advantage import compute_grpo_plugins_advantage
from grpo_plugins_verl.extras import batch_extras
from grpo_plugins_verl.runtime import get_runtime
from grpo_plugins_verl.trainer import (
    INDEX_KEY,
    ROLLOUT_N_KEY,
    STATE_FILE,
    GRPOPluginsTrainer,
    IndexedDataset,
    load_plugin_state,
    save_plugin_state,
)


class Sampler(Method):
    name = "toy_sampler"

    @hookimpl
    def sample_prompts(self, round, generator):
        return torch.randint(0, round.dataset_size, (round.num_prompts,), generator=generator)


class Allocator(Method):
    name = "toy_allocator"

    @hookimpl
    def allocate_rollouts(self, round, prompt_ids):
        counts = torch.full_like(prompt_ids, round.default_rollouts - 1)
        counts[0] += round.budget - int(counts.sum())  # the first prompt gets the remainder
        return counts


class Hinter(Method):
    name = "toy_hinter"

    @hookimpl
    def augment_prompts(self, prompt_ids, prompts, rows):
        return [[{**p[-1], "content": p[-1]["content"] + f" (hint {row['data_source']})"}] for p, row in zip(prompts, rows)]


class Counter(Method):
    name = "toy_counter"

    def __init__(self, config=None):
        super().__init__(config)
        self.seen = torch.zeros(10)
        self.steps: list[int] = []

    @hookimpl
    def observe(self, batch: GRPOBatch, step):
        self.seen += torch.bincount(batch.prompt_ids, minlength=10).float()
        self.steps.append(step)

    def state_dict(self):
        return {"seen": self.seen.clone(), "steps": list(self.steps)}

    def load_state_dict(self, state):
        self.seen, self.steps = state["seen"].clone(), list(state["steps"])


class Dropper(Method):
    name = "toy_dropper"

    @hookimpl
    def allocate_rollouts(self, round, prompt_ids):
        counts = torch.zeros_like(prompt_ids)
        counts[0] = round.budget
        return counts


def toy_rows(size=10):
    return [
        {"raw_prompt": [{"role": "user", "content": f"q{i}"}], "data_source": "toy", "dummy": torch.tensor([i])}
        for i in range(size)
    ]


def make_trainer(tmp_path, gen_batch_size=3, rollout_n=4, global_steps=1):
    """A GRPOPluginsTrainer with just the state its planning/checkpoint methods use."""
    trainer = object.__new__(GRPOPluginsTrainer)
    trainer.config = OmegaConf.create(
        {
            "algorithm": {"norm_adv_by_std_in_grpo": True},
            "data": {"train_batch_size": gen_batch_size, "gen_batch_size": None, "dataloader_num_workers": 0, "seed": 1},
            "actor_rollout_ref": {"rollout": {"n": rollout_n}},
            "trainer": {"default_local_dir": str(tmp_path / "ckpt"), "resume_mode": "auto", "resume_from_path": None},
        }
    )
    trainer.global_steps = global_steps
    trainer.train_dataset = IndexedDataset(toy_rows())
    trainer.train_dataloader = StatefulDataLoader(trainer.train_dataset, batch_size=gen_batch_size, collate_fn=collate_fn, drop_last=True)
    trainer.train_dataloader_it = None
    trainer.grpo_plugins = get_runtime(trainer.config.algorithm)
    trainer.grpo_plugins.trainer_attached = True
    trainer.prompt_generator = torch.Generator().manual_seed(1)
    return trainer


def agent_loop_view(td, i):
    """Row ``i`` of a prompt TensorDict as verl's ``AgentLoopWorkerTQ.generate_sequences`` reads it."""
    prompt = {}
    for key, value in td.items():
        if isinstance(value, torch.Tensor):
            prompt[key] = value[i]
        elif isinstance(value, NonTensorStack):
            prompt[key] = value[i].data
        elif isinstance(value, NonTensorData):
            prompt[key] = value.data
    return prompt


def test_trainer_is_registered_for_trainer_mode():
    assert get_trainer_cls("grpo_plugins") is GRPOPluginsTrainer


def test_planned_round_reaches_verl_prompt_batch(tmp_path):
    grpo_plugins_verl.configure([Sampler(), Allocator(), Hinter()])
    trainer = make_trainer(tmp_path)
    expected_ids = torch.randint(0, 10, (3,), generator=torch.Generator().manual_seed(1)).tolist()
    td = trainer._fetch_one_gen_batch()
    rows = [agent_loop_view(td, i) for i in range(3)]
    assert [row[ROLLOUT_N_KEY] for row in rows] == [6, 3, 3]  # budget 3 x 4 = 12: 3 each, the remainder to the first
    assert [int(row["dummy"][0]) for row in rows] == expected_ids
    assert [row["raw_prompt"][-1]["content"] for row in rows] == [f"q{i} (hint toy)" for i in expected_ids]
    assert INDEX_KEY not in td.keys()
    assert [trainer.grpo_plugins.prompt_ids[row["uid"]] for row in rows] == expected_ids


def test_default_round_uses_verl_dataloader_and_dataset_indices(tmp_path):
    grpo_plugins_verl.configure([Counter()])
    trainer = make_trainer(tmp_path)
    first, second = trainer._fetch_one_gen_batch(), trainer._fetch_one_gen_batch()
    ids = [trainer.grpo_plugins.prompt_ids[agent_loop_view(td, i)["uid"]] for td in (first, second) for i in range(3)]
    assert ids == [0, 1, 2, 3, 4, 5]
    assert ROLLOUT_N_KEY not in first.keys()  # no allocator: verl's rollout.n applies


class EvenAllocator(Method):
    name = "even_allocator"

    @hookimpl
    def allocate_rollouts(self, round, prompt_ids):
        return torch.full_like(prompt_ids, round.budget // prompt_ids.numel())


def test_rounds_of_an_allocating_run_always_carry_the_rollout_counts(tmp_path):
    # verl concatenates rounds (data.gen_batch_size < train_batch_size): a round whose counts happen to
    # equal rollout.n must carry the column too, or the concatenation fails on mismatched keys
    from verl.utils import tensordict_utils as tu

    grpo_plugins_verl.configure([EvenAllocator()])
    trainer = make_trainer(tmp_path)
    even = trainer._fetch_one_gen_batch()
    assert [agent_loop_view(even, i)[ROLLOUT_N_KEY] for i in range(3)] == [4, 4, 4]
    grpo_plugins_verl.configure([Allocator()])
    uneven = make_trainer(tmp_path)._fetch_one_gen_batch()
    assert len(tu.concat_tensordict([even, uneven])) == 6


def test_zero_allocation_is_a_clear_error(tmp_path):
    grpo_plugins_verl.configure([Dropper()])
    with pytest.raises(CompositionError, match="at least 1"):
        make_trainer(tmp_path)._fetch_one_gen_batch()


def test_observe_sees_dataset_prompt_ids_and_the_step(tmp_path):
    counter = Counter()
    grpo_plugins_verl.configure([Sampler(), counter])
    trainer = make_trainer(tmp_path, global_steps=3)
    td = trainer._fetch_one_gen_batch()
    uids = np.repeat(np.array([agent_loop_view(td, i)["uid"] for i in range(3)], dtype=object), 2)
    rewards = torch.zeros(6, 4)
    rewards[:, -1] = torch.tensor([1.0, 0, 1, 1, 0, 0])
    compute_grpo_plugins_advantage(rewards, torch.ones(6, 4, dtype=torch.long), uids, trainer.config.algorithm)
    trainer.observe_step()
    trainer.observe_step()  # once per advantage stage
    ids = [trainer.grpo_plugins.prompt_ids[u] for u in uids]
    assert counter.seen.tolist() == torch.bincount(torch.tensor(ids), minlength=10).float().tolist()
    assert counter.steps == [3]


def test_extras_from_transfer_queue_rows_reach_the_batch():
    rows = [
        {"responses": torch.tensor([5, 6, 7]), "old_log_probs": torch.tensor([-0.1, -0.2, -0.3]),
         "extra_fields": {"reward_extra_info": {"acc": 1.0, "fmt": 0.5, "score": 1.5}}, "raw_prompt": [{"role": "user", "content": "a"}]},
        {"responses": torch.tensor([8]), "old_log_probs": torch.tensor([-0.5]),
         "extra_fields": {"reward_extra_info": {"acc": 0.0}}, "raw_prompt": [{"role": "user", "content": "a"}]},
        {"responses": torch.tensor([9, 9]), "old_log_probs": torch.tensor([-0.7, -0.8]),
         "extra_fields": {"reward_extra_info": {"acc": 1.0, "fmt": 0.0}}, "raw_prompt": [{"role": "user", "content": "b"}]},
        {"responses": torch.tensor([4, 4]), "old_log_probs": torch.tensor([-0.9, -1.0]),
         "extra_fields": {"reward_extra_info": {"acc": 0.0, "fmt": 1.0}}, "raw_prompt": [{"role": "user", "content": "b"}]},
    ]
    extras = batch_extras(list_of_dict_to_tensordict(rows))  # the format the agent loop writes to TransferQueue
    runtime = get_runtime(OmegaConf.create({}))
    runtime.extras = extras
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    compute_grpo_plugins_advantage(torch.zeros(4, 3), mask, np.array(["a", "a", "b", "b"], dtype=object), None)
    batch = runtime.last_batch
    assert batch.completion_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0], [4, 4, 0]]
    torch.testing.assert_close(batch.old_log_probs[1], torch.tensor([-0.5, 0.0, 0.0]))
    assert batch.reward_names == ("acc", "fmt")
    assert torch.equal(batch.reward_components.isnan(), torch.tensor([[False, False], [False, True], [False, False], [False, False]]))
    assert batch.prompts[2] == [{"role": "user", "content": "b"}]
    assert batch_extras(list_of_dict_to_tensordict(rows), ["fmt"])["reward_names"] == ("fmt",)
    # verl's response_mask may be padded wider or narrower than the fetched rows: only padding changes
    compute_grpo_plugins_advantage(torch.zeros(4, 5), torch.cat([mask, torch.zeros(4, 2, dtype=torch.long)], 1),
                                   np.array(["a", "a", "b", "b"], dtype=object), None)
    assert runtime.last_batch.completion_ids.tolist()[0] == [5, 6, 7, 0, 0]


def test_plugin_state_round_trips_through_a_checkpoint_folder(tmp_path):
    counter = Counter()
    grpo_plugins_verl.configure([Sampler(), counter])
    trainer = make_trainer(tmp_path, global_steps=2)
    counter.seen[3] = 5.0
    counter.steps.append(2)
    trainer.prompt_generator.manual_seed(123)
    torch.rand(3, generator=trainer.prompt_generator)
    path = save_plugin_state(trainer.grpo_plugins.composition, trainer.prompt_generator, trainer._checkpoint_folder())
    assert path == str(tmp_path / "ckpt" / "global_step_2" / STATE_FILE)
    next_draw = torch.rand(3, generator=trainer.prompt_generator)

    restored = Counter()
    grpo_plugins_verl.configure([Sampler(), restored])
    resumed = make_trainer(tmp_path, global_steps=2)
    assert load_plugin_state(resumed.grpo_plugins.composition, resumed.prompt_generator, resumed._checkpoint_folder(resuming=True))
    assert restored.seen[3] == 5.0 and restored.steps == [2]
    assert torch.equal(torch.rand(3, generator=resumed.prompt_generator), next_draw)
    resumed.config.trainer.resume_mode = "resume_path"
    resumed.config.trainer.resume_from_path = str(tmp_path / "elsewhere" / "global_step_7")
    assert resumed._checkpoint_folder(resuming=True) == str(tmp_path / "elsewhere" / "global_step_7")
    # a checkpoint without the state file: refused while methods keep state, unless fresh state is asked for
    with pytest.raises(CompositionError, match=r"holds no grpo_plugins.pt.*\['toy_counter'\].*grpo_plugins_fresh_state"):
        load_plugin_state(resumed.grpo_plugins.composition, resumed.prompt_generator, str(tmp_path / "empty"))
    assert not load_plugin_state(resumed.grpo_plugins.composition, resumed.prompt_generator, str(tmp_path / "empty"),
                                 fresh=True)
    # a truncated file is named
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / STATE_FILE).write_bytes(open(path, "rb").read()[:40])
    with pytest.raises(CompositionError, match=f"{broken / STATE_FILE}: it is truncated or corrupt"):
        load_plugin_state(resumed.grpo_plugins.composition, resumed.prompt_generator, str(broken))


class FakeTransferQueue:
    """An in-memory stand-in for TransferQueue's ``kv_batch_get``/``kv_batch_put`` (rows stored per key,
    in the per-trajectory format verl's agent loop writes)."""

    def __init__(self, rows: dict):
        self.rows = rows

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        fields = select_fields or sorted({f for k in keys for f in self.rows[k]})
        return list_of_dict_to_tensordict([{f: self.rows[k][f] for f in fields if f in self.rows[k]} for k in keys])

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        from transfer_queue import KVBatchMeta

        for i, key in enumerate(keys):
            for name in fields.keys():
                self.rows[key][name] = fields[name][i]
        return KVBatchMeta(keys=list(keys), partition_id=partition_id, tags=tags or [{} for _ in keys])


def test_verl_advantage_step_with_the_trainer_extras(tmp_path, monkeypatch):
    """verl's own ``PPOTrainer._compute_advantage`` (reads and writes TransferQueue) under the trainer's
    override: the estimator sees the fetched tokens/log-probs/components row-aligned, a plain run stores
    verl's ``grpo`` advantages bit for bit, and ``observe`` follows."""
    import transfer_queue as tq
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    counter = Counter()
    grpo_plugins_verl.configure([counter])
    gen = torch.Generator().manual_seed(4)
    rows, keys, uids = {}, [], []
    for g, size in enumerate([3, 4, 2]):
        for s in range(size):
            length = int(torch.randint(1, 6, (1,), generator=gen))
            score = torch.zeros(length)
            score[-1] = float(torch.randint(0, 2, (1,), generator=gen))
            key = f"uid{g}_{s}_0"
            rows[key] = {
                "uid": f"uid{g}", "response_mask": torch.ones(length, dtype=torch.long), "rm_scores": score,
                "old_log_probs": -torch.rand(length, generator=gen), "responses": torch.randint(3, 90, (length,), generator=gen),
                "extra_fields": {"reward_extra_info": {"acc": float(score[-1])}}, "raw_prompt": [{"role": "user", "content": f"p{g}"}],
            }
            keys.append(key)
            uids.append(f"uid{g}")
    pad = dict(rows[keys[0]], uid="pad00ff", response_mask=torch.zeros(1, dtype=torch.long), rm_scores=torch.zeros(1))
    rows["pad00ff_0_0"] = pad
    keys.append("pad00ff_0_0")
    order = torch.randperm(len(keys), generator=gen).tolist()  # verl reorders rows by sequence length
    keys = [keys[i] for i in order]
    fake = FakeTransferQueue(rows)
    monkeypatch.setattr(tq, "kv_batch_get", fake.kv_batch_get)
    monkeypatch.setattr(tq, "kv_batch_put", fake.kv_batch_put)

    trainer = make_trainer(tmp_path, global_steps=5)
    trainer.config = OmegaConf.merge(
        trainer.config,
        {"algorithm": {"adv_estimator": "grpo_plugins", "use_kl_in_reward": False, "gamma": 1.0, "lam": 1.0}},
    )
    trainer.use_reference_policy = False
    trainer.grpo_plugins.prompt_ids.update({"uid0": 7, "uid1": 2, "uid2": 9})
    metrics = {}
    trainer._compute_advantage(KVBatchMeta(keys=keys, partition_id="train", tags=[{} for _ in keys]), metrics)

    batch = trainer.grpo_plugins.last_batch
    real = [k for k in keys if not k.startswith("pad")]
    assert batch.prompt_ids.tolist() == [{"uid0": 7, "uid1": 2, "uid2": 9}[rows[k]["uid"]] for k in real]
    for i, key in enumerate(real):  # fetched fields are aligned with verl's rows
        n = len(rows[key]["responses"])
        assert batch.completion_ids[i, :n].tolist() == rows[key]["responses"].tolist()
        assert torch.equal(batch.old_log_probs[i, :n], rows[key]["old_log_probs"])
        assert batch.reward_components[i, 0] == rows[key]["rm_scores"][-1]
        assert batch.prompts[i] == rows[key]["raw_prompt"]
    assert trainer.grpo_plugins.extras is None and "plugins/grpo/frac_zero_advantage" in metrics
    assert not set(trainer.grpo_plugins.prompt_ids) & {"uid0", "uid1", "uid2"}  # forgotten after the step

    padded = list_of_dict_to_tensordict([{f: rows[k][f] for f in ("rm_scores", "response_mask")} for k in keys]).to_padded_tensor()
    expected, _ = compute_grpo_outcome_advantage(padded["rm_scores"], padded["response_mask"], np.array([rows[k]["uid"] for k in keys], dtype=object))
    for i, key in enumerate(keys):
        n = len(rows[key]["response_mask"])
        assert torch.equal(rows[key]["advantages"], expected[i, :n]), key

    trainer.observe_step()
    assert counter.steps == [5] and counter.seen[[7, 2, 9]].tolist() == [3.0, 4.0, 2.0]


class SingleStream(Method):
    name = "toy_single_stream"

    @hookimpl
    def sample_prompts(self, round, generator):  # one completion for each of `budget` prompts
        return torch.randint(0, round.dataset_size, (round.budget,), generator=generator)


def test_rounds_with_another_prompt_count_reach_verl_sampling(tmp_path, monkeypatch):
    """A sampler may return P' != num_prompts prompts (here budget prompts x 1 completion): every one
    gets ``__rollout_n__`` and verl's replay buffer is asked for all P' groups of the step."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    grpo_plugins_verl.configure([SingleStream()])
    trainer = make_trainer(tmp_path, gen_batch_size=3, rollout_n=4)
    trainer.parameter_sync_step = 1
    submitted, sampled = [], []
    monkeypatch.setattr(trainer, "_submit_batch_to_rollout", lambda batch: submitted.append(batch) or len(batch), raising=False)
    monkeypatch.setattr(PPOTrainer, "_step_once", lambda self, metrics, timing, size: sampled.append(size) or "batch")
    trainer.prepare_step()
    assert len(submitted) == 1 and len(submitted[0]) == 12
    assert [agent_loop_view(submitted[0], i)[ROLLOUT_N_KEY] for i in range(12)] == [1] * 12
    assert trainer._step_once({}, {}, 3) == "batch" and sampled == [12]
    trainer.parameter_sync_step = 2
    with pytest.raises(CompositionError, match="parameter_sync_step"):
        trainer._step_once({}, {}, 3)


class NeedsEverything(Method):
    name = "toy_needs_everything"

    def requires(self):
        return {"completions", "rows", "total_steps", "old_log_probs"}

    @hookimpl
    def shape_rewards(self, batch, rewards):
        self.seen = (list(batch.completions), [row["data_source"] for row in batch.rows], batch.total_steps)
        return rewards


class NeedsReference(Method):
    name = "toy_needs_reference"

    def requires(self):
        return {"ref_log_probs"}


class ToyTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 0))


def test_required_batch_fields_are_filled_or_refused(tmp_path):
    method = NeedsEverything()
    grpo_plugins_verl.configure([method])
    trainer = make_trainer(tmp_path)
    runtime = trainer.grpo_plugins
    runtime.rows_for = trainer._dataset_rows
    runtime.total_steps = 40
    rows = [
        {"responses": torch.tensor([5, 6]), "old_log_probs": torch.tensor([-0.1, -0.2]), "raw_prompt": [{"role": "user", "content": "a"}]},
        {"responses": torch.tensor([7, 0]), "old_log_probs": torch.tensor([-0.3, -0.4]), "raw_prompt": [{"role": "user", "content": "a"}]},
    ]
    runtime.extras = batch_extras(list_of_dict_to_tensordict(rows), tokenizer=ToyTokenizer())
    runtime.prompt_ids.update({"a": 4})
    runtime.dataset_index.update({"a": 4})
    uids = np.array(["a", "a"], dtype=object)
    compute_grpo_plugins_advantage(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.ones(2, 2, dtype=torch.long), uids, None)
    assert method.seen == (["5 6", "7"], ["toy", "toy"], 40)

    runtime.extras = None  # verl's own trainer: no fetched fields
    with pytest.raises(CompositionError, match="lacks completions .*old_log_probs .*trainer_mode=grpo_plugins"):
        compute_grpo_plugins_advantage(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.long), uids, None)
    grpo_plugins_verl.configure([NeedsReference()])
    get_runtime().trainer_attached = True  # the trainer's fetch found no reference log-probs
    with pytest.raises(CompositionError, match="ref_log_probs .*use_kl_loss=True"):
        compute_grpo_plugins_advantage(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.long), uids, None)


def test_a_batch_with_every_completion_masked_is_skipped_like_verl(tmp_path, monkeypatch):
    """verl's ``grpo`` gives such a batch (e.g. every response rejected by rollout correction) zero
    advantages and trains on; the methods skip it (no stage, no ``observe``) and the step logs it."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    counter = Counter()
    grpo_plugins_verl.configure([Sampler(), counter])
    trainer = make_trainer(tmp_path)
    td = trainer._fetch_one_gen_batch()
    uids = np.repeat(np.array([agent_loop_view(td, i)["uid"] for i in range(3)], dtype=object), 2)
    rewards, mask = torch.zeros(6, 4), torch.zeros(6, 4, dtype=torch.long)
    rewards[:, -1] = torch.tensor([1.0, 0, 1, 1, 0, 0])
    advantages, _ = compute_grpo_plugins_advantage(rewards, mask, uids, trainer.config.algorithm)
    expected, _ = compute_grpo_outcome_advantage(rewards, mask, uids)
    assert torch.equal(advantages, expected) and not advantages.any()
    trainer.observe_step()
    assert counter.steps == [] and trainer.grpo_plugins.skipped == 1
    import transfer_queue as tq  # the step's metrics: verl's own advantage step left out

    monkeypatch.setattr(tq, "kv_batch_get", lambda **kwargs: list_of_dict_to_tensordict([{"responses": torch.ones(1)}]))
    monkeypatch.setattr(GRPOPluginsTrainer.__mro__[1], "_compute_advantage", lambda self, batch, metrics: batch)
    trainer.use_reference_policy, trainer.tokenizer, metrics = False, None, {}
    trainer._compute_advantage(type("Meta", (), {"keys": [], "partition_id": "train"})(), metrics)
    assert metrics["plugins/skipped_empty_batches"] == 1.0 and trainer.grpo_plugins.skipped == 0


class NeedsRows(Method):
    name = "toy_needs_rows"

    def requires(self):
        return {"rows"}

    @hookimpl
    def shape_rewards(self, batch, rewards):
        self.rows = [row["dummy"].item() for row in batch.rows]
        return rewards


def test_groups_are_keyed_by_the_prompt_id_column(tmp_path):
    """Rows sharing a ``prompt_id`` form one group (as on TRL); the methods still read each row's own
    dataset row."""
    method = NeedsRows()
    grpo_plugins_verl.configure([Sampler(), method])
    trainer = make_trainer(tmp_path)
    trainer.train_dataset = IndexedDataset([{**row, "prompt_id": 100 + i // 2} for i, row in enumerate(toy_rows())])
    runtime = trainer.grpo_plugins
    runtime.rows_for = trainer._dataset_rows
    td = trainer._fetch_one_gen_batch()
    views = [agent_loop_view(td, i) for i in range(3)]
    indices = [int(view["dummy"][0]) for view in views]
    assert [runtime.prompt_ids[view["uid"]] for view in views] == [100 + i // 2 for i in indices]
    uids = np.repeat(np.array([view["uid"] for view in views], dtype=object), 2)
    rewards = torch.zeros(6, 3)
    rewards[:, -1] = torch.tensor([1.0, 0, 1, 1, 0, 1])
    compute_grpo_plugins_advantage(rewards, torch.ones(6, 3, dtype=torch.long), uids, trainer.config.algorithm)
    batch = runtime.last_batch
    assert batch.prompt_ids.tolist() == [100 + i // 2 for i in np.repeat(indices, 2)]
    assert method.rows == np.repeat(indices, 2).tolist()  # each uid's own dataset row
