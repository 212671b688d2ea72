"""The old-policy probe on verl (:mod:`grpo_plugins_verl.probe`): the actor workers' forward on a tiny model, the
chunk plan and row order by TransferQueue key, and the start-up refusals. verl's own ``fit()`` with the probe:
``tests/e2e/test_verl_probe.py``."""

from __future__ import annotations

import threading

import pytest
import torch

from grpo_plugins import Composition, CompositionError, GRPOBatch, Method, Needs
from grpo_plugins.probe import ProbeRequest
from grpo_plugins_verl.capabilities import check_run, verl_capabilities
from grpo_plugins_verl.probe import PendingProbes, VerlProbe
from grpo_plugins_verl.testing import local_probe, run_config

VOCAB = 24


def tiny_model(**config):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True, **config)).eval()


def stored_rows(prompt_lengths, response_lengths, seed=0):
    """``{key: fields}`` as verl's agent loop writes rows (prompt + response, no padding)."""
    gen = torch.Generator().manual_seed(seed)
    rows = {}
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        prompt, response = torch.randint(0, VOCAB, (p,), generator=gen), torch.randint(0, VOCAB, (r,), generator=gen)
        ids = torch.cat([prompt, response])
        rows[f"uid{i // 3}_{i % 3}_0"] = {"input_ids": ids, "position_ids": torch.arange(ids.numel()),
                                          "responses": response, "response_mask": torch.ones(r, dtype=torch.long)}
    return rows


def reference_log_probs(model, rows, width, temperature):
    """``(N, width)`` log-softmax(logits / temperature) at each response token, one unpadded forward per row."""
    out = torch.zeros(len(rows), width)
    with torch.no_grad():
        for i, row in enumerate(rows.values()):
            r, ids = row["responses"].numel(), row["input_ids"]
            logits = model(input_ids=ids[None]).logits[0, ids.numel() - r - 1: ids.numel() - 1].float() / temperature
            out[i, :r] = torch.log_softmax(logits, -1).gather(-1, row["responses"][:, None]).squeeze(-1)
    return out


def batch_over(rows, width, order=None):
    """The advantage stage's batch over ``rows`` (groups of three by uid), in ``order`` of verl's rows."""
    keys = list(rows)
    order = torch.arange(len(keys)) if order is None else order
    mask = torch.zeros(len(order), width)
    for n, i in enumerate(order.tolist()):
        mask[n, : rows[keys[i]]["responses"].numel()] = 1
    groups = torch.tensor([int(keys[i].split("_")[0][3:]) for i in order.tolist()])
    return GRPOBatch(prompt_ids=groups, rewards=torch.zeros(len(order)), completion_mask=mask)


def sampled_log_probs(chunk):
    return {"log_probs": torch.where(chunk.completion_mask > 0, chunk.log_probs().gather(
        -1, chunk.completion_ids.unsqueeze(-1)).squeeze(-1), 0.0)}


def test_the_workers_forward_gives_the_log_probs_of_an_ordinary_forward():
    """Prompts and responses of different lengths, right-padded in one chunk: the hidden states at the positions
    predicting each response token, through the head at temperature 0.7, give every sampled token's log-prob."""
    model = tiny_model()
    rows = stored_rows([3, 5, 2, 4, 1, 6], [4, 1, 6, 2, 5, 3])
    width = 7  # the advantage stage's width may exceed the longest response
    request = ProbeRequest(whole_groups=True, max_rows=4, temperature=0.7)
    pending = PendingProbes(local_probe(model, rows), list(rows), "train", {"p": request}, temperature=1.0,
                            default_rows=8)
    probe = pending.for_batch(batch_over(rows, width), torch.arange(6))["p"]
    assert [c.tolist() for c in probe.chunks] == [[0, 1, 2], [3, 4, 5]]  # whole groups of three, <= 4 rows
    got = probe.map(sampled_log_probs)["log_probs"]
    torch.testing.assert_close(got, reference_log_probs(model, rows, width, 0.7), rtol=1e-5, atol=1e-5)
    tokens = probe.sum(lambda chunk: {"tokens": chunk.completion_mask.sum(), "groups": torch.tensor(chunk.num_groups)})
    assert tokens == {"tokens": torch.tensor(21.0), "groups": torch.tensor(2)}
    assert probe.calls == 2


def test_rows_follow_the_advantage_stage_by_key():
    """The stage's rows are a reordered subset of verl's (padding rows left out): chunk ``n`` fetches the keys of
    rows ``rows[n]`` and ``map`` returns values in the stage's order."""
    model = tiny_model()
    rows = stored_rows([2, 3, 4, 2, 3, 4], [3, 2, 4, 1, 3, 2], seed=1)
    keys = list(rows)
    rows["pad_0_0"] = rows[keys[0]]  # a padding row of verl's batch, not in the stage
    order = torch.tensor([5, 2, 0, 4, 1])  # verl rows of the stage's rows 0..4
    pending = PendingProbes(local_probe(model, rows), list(rows), "train", {"p": ProbeRequest(max_rows=2)}, 1.0, 8)
    batch = batch_over(rows, 4, order)
    probe = pending.for_batch(batch, order)["p"]
    assert probe.job["keys"] == [keys[i] for i in order.tolist()]
    got = probe.map(lambda chunk: {"first": chunk.completion_ids[:, 0], "rows": chunk.rows})
    assert got["first"].tolist() == [int(rows[keys[i]]["responses"][0]) for i in order.tolist()]
    assert got["rows"].tolist() == [0, 1, 2, 3, 4]
    expected = reference_log_probs(model, {k: rows[keys[i]] for k, i in zip("abcde", order.tolist())}, 4, 1.0)
    torch.testing.assert_close(probe.map(sampled_log_probs)["log_probs"], expected, rtol=1e-5, atol=1e-5)


def test_an_unpicklable_function_and_a_model_without_head_and_decoder_are_refused():
    model = tiny_model()
    rows = stored_rows([2, 2, 2], [2, 2, 2])
    lock = threading.Lock()
    probe = VerlProbe(local_probe(model, rows), name="p", keys=list(rows), partition_id="train",
                      chunks=[torch.arange(3)], group_index=torch.zeros(3, dtype=torch.long), request=ProbeRequest(),
                      temperature=1.0, width=2)
    with pytest.raises(CompositionError, match=r"probe 'p': the function given to map cannot be sent to verl's actor"):
        probe.map(lambda chunk: {"x": torch.zeros(chunk.num_rows)} if lock else {})
    capped = VerlProbe(local_probe(tiny_model(final_logit_softcapping=30.0), rows), **probe.job)
    with pytest.raises(CompositionError, match=r"probe 'p' rebuilds logits as head\(decoder\(x\)\); the actor's "
                                               r"model is not that \(its config sets \['final_logit_softcapping'\]\)"):
        capped.sum(lambda chunk: {"x": chunk.hidden_states.sum()})


class Reader(Method):
    """Reads a probe (as tw_grpo does)."""

    name = "toy_reader"

    def needs(self):
        return Needs(probes={"toy": ProbeRequest(whole_groups=True)})


@pytest.mark.parametrize("override, setting", [
    ("actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",) * 2,
    ("actor_rollout_ref.actor.strategy=megatron",) * 2,
    ("actor_rollout_ref.model.use_fused_kernels=True",
     "actor_rollout_ref.model.use_fused_kernels=True with actor.strategy=fsdp"),
])
def test_settings_the_probe_cannot_run_with_are_refused_at_start_up(override, setting):
    composition = Composition([Reader()])
    check_run(composition, run_config())  # verl's defaults: FSDP, no sequence parallelism
    with pytest.raises(CompositionError) as error:
        check_run(composition, run_config(override))
    assert "method 'toy_reader' needs trainer feature 'old_policy_probe'" in str(error.value)
    assert setting in str(error.value)
    if "fused" in override:  # under FSDP2 a fused forward's head weight is gathered from its DTensor
        check_run(composition, run_config(override, "actor_rollout_ref.actor.strategy=fsdp2"))


def test_scaled_logits_in_the_models_config_and_verls_own_trainer_are_refused(tmp_path):
    tiny_model(final_logit_softcapping=30.0).config.save_pretrained(tmp_path)
    caps = verl_capabilities(run_config(f"actor_rollout_ref.model.path={tmp_path}"))
    assert "old_policy_probe" not in caps.features
    assert "the model's config sets ['final_logit_softcapping']" in caps.why_not["old_policy_probe"]
    assert "old_policy_probe" in verl_capabilities(run_config()).features
    assert "old_policy_probe" not in verl_capabilities(None).features  # verl's own trainer: no probe


def test_capo_stays_refused_for_the_update_preview():
    with pytest.raises(CompositionError, match=r"method 'capo' needs trainer feature 'update_preview'.*does not "
                                               r"preview the optimiser's LM-head update"):
        check_run(Composition(["capo"]), run_config())
    check_run(Composition(["tw_grpo"]), run_config())  # the probe alone runs


def test_the_actor_worker_group_is_built_from_the_probe_worker_only_when_a_method_reads_a_probe():
    import ray
    from verl.trainer.ppo.utils import Role
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from grpo_plugins_verl.workers import ProbeActorRolloutRefWorker, use_probe_worker

    def mapping():  # as verl's _init_resource_pool_mgr builds it without hybrid replicas
        return {Role.Actor: ray.remote(ActorRolloutRefWorker), Role.RefPolicy: ray.remote(ActorRolloutRefWorker)}

    plain = mapping()
    use_probe_worker(plain, Composition([]))
    assert all(cls.__ray_actor_class__ is ActorRolloutRefWorker for cls in plain.values())
    probing = mapping()
    use_probe_worker(probing, Composition([Reader()]))
    assert probing[Role.Actor].__ray_actor_class__ is ProbeActorRolloutRefWorker
    assert probing[Role.RefPolicy].__ray_actor_class__ is ActorRolloutRefWorker  # the reference needs no probe
    assert issubclass(ProbeActorRolloutRefWorker, ActorRolloutRefWorker)
