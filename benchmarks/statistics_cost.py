"""(Named statistics_cost.py, not statistics.py, which would shadow the standard library for scripts run from here.)

What the old-policy statistics cost in the TRL adapter: the extra forward work per generation batch.

    python benchmarks/statistics_cost.py           # tiny Qwen2 (hidden 64, 2 layers), CPU, N = 16, T = 64

For each configuration, on the same local generation batch, the adapter's statistics work
(``grpo_plugins_trl.statistics.batch_fields``) is timed against one TRL old-log-prob forward (TRL's
``_get_per_token_logps_and_entropies``, the work of one no-grad pass over the batch):

- ``none``: no method reads a statistic (nothing runs);
- ``entropies, TRL old pass``: D3S with ``steps_per_generation > gradient_accumulation_steps``: the
  entropies come from TRL's own old pass (asked for what its fused head computes anyway);
- ``entropies, on-policy``: D3S in a fully on-policy run: one extra fused-head pass;
- ``temperatures``: DCPO (entropies and log-probs at 0.8, 1.0, 1.2): one extra unfused pass, logits of
  ``per_device_train_batch_size`` rows at a time;
- ``old-policy probe``: TW-GRPO (one decoder pass over whole groups, then the group divergence over the
  full vocabulary, one block of positions at a time) and CAPO (one decoder pass, kept between its two
  passes: the LM-head gradient, then the logit change of the previewed AdamW step). Their "extra" is the
  probe's fields plus the method's ``mask_tokens`` (the probe runs inside it), i.e. the advantage stage
  with the method minus the stage without it.

**Probe memory** (``python benchmarks/statistics_cost.py --memory``, also part of the default run): the
old-policy probe on the core's reference model (:class:`grpo_plugins.probe.LinearProbe`, vocabulary
151,936 as Qwen2.5, hidden 64) for one group of ``G = 16`` completions of ``T = 512`` tokens, on CPU,
each method in a fresh process: the peak resident memory the method's ``mask_tokens`` adds (``ru_maxrss``
after minus before), against the bound stated in ``grpo_plugins.probe``: ``8 * logits_budget * 4`` bytes
of logits-block temporaries + the chunk's hidden states + (CAPO) ``8 * V * d * 4`` bytes for the head's
gradient, its previewed step and AdamW's temporaries. The whole-group tensor ``G * T * V`` floats
(4.6 GiB) is what the probe avoids.

The memory bound of the temperature pass is analytic: one chunk's float32 logits and their
``log_softmax``, ``2 * rows * T * V * 4`` bytes, reported for ``V = 151936`` (Qwen2.5), ``T = 512`` and
chunks of 16 rows (a group of 16). Seconds: best of 7 after a warm-up (a shared machine). Writes
``benchmarks/results/statistics.{json,md}``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int = 7) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return min(runs)


def main() -> None:
    from grpo_plugins import Composition
    from grpo_plugins_trl import statistics
    from grpo_plugins_trl.testing import tiny_grpo_run

    n, width, prompt = 16, 64, 8
    torch.manual_seed(0)
    out = {"prompt_ids": torch.randint(4, 16, (n, prompt)), "prompt_mask": torch.ones(n, prompt, dtype=torch.long),
           "completion_ids": torch.randint(4, 16, (n, width)), "completion_mask": torch.ones(n, width, dtype=torch.long)}
    cases = [("none", None, {}), ("entropies, TRL old pass", ["d3s"], {"steps_per_generation": 4}),
             ("entropies, on-policy", ["d3s"], {}), ("temperatures (DCPO)", ["dcpo"], {})]
    rows = []
    for label, methods, overrides in cases:
        trainer = tiny_grpo_run(methods or [], train=False, model_config={"hidden_size": 64}, max_completion_length=width,
                                **overrides)
        trainer.model.train()
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)

        def trl_forward():
            with torch.no_grad():
                trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, width, batch_size=4)

        def capture():
            with torch.no_grad(), statistics.capture_old_pass(trainer):  # TRL's own old pass, asked for its entropies
                trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, width, batch_size=4)

        def ours():
            statistics.batch_fields(trainer, out)

        if label.startswith("entropies, TRL"):
            capture()  # part of TRL's step anyway; what the method adds is what follows
        base = timed(trl_forward)
        extra = timed(ours)
        rows.append({"case": label, "trl_forward_s": base, "extra_s": extra, "extra_forwards": extra / base})
    for label, methods in (("old-policy probe (TW-GRPO)", ["tw_grpo"]), ("probe + update preview (CAPO)", ["capo"])):
        trainer = tiny_grpo_run(methods, train=False, model_config={"hidden_size": 64}, max_completion_length=width)
        trainer.model.train()
        trainer.create_optimizer()
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)

        def trl_forward():
            with torch.no_grad():
                trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, width, batch_size=4)

        base = timed(trl_forward)
        with_method = timed(lambda: probe_stage(trainer, out, trainer.composition))
        without = timed(lambda: probe_stage(trainer, out, Composition()))
        extra = max(with_method - without, 0.0)
        rows.append({"case": label, "trl_forward_s": base, "extra_s": extra, "extra_forwards": extra / base})
    vocab, tokens, chunk = 151936, 512, 16
    bound = 2 * chunk * tokens * vocab * 4
    memory = [probe_memory(method) for method in ("tw_grpo", "capo")]
    result = {"batch": {"completions": n, "tokens": width, "prompt_tokens": prompt}, "rows": rows,
              "temperature_pass_bound_bytes": {"vocab": vocab, "tokens": tokens, "rows": chunk, "bytes": bound},
              "probe_memory": memory}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "statistics.json").write_text(json.dumps(result, indent=2))
    lines = ["# Old-policy statistics: extra forward work per generation batch (TRL adapter, CPU)", "",
             f"Tiny Qwen2 (hidden 64), {n} completions x {width} tokens; one TRL old-log-prob forward as the unit.", "",
             "| case | TRL forward (s) | extra (s) | extra forwards |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['trl_forward_s']:.4f} | {r['extra_s']:.4f} | {r['extra_forwards']:.2f} |" for r in rows]
    lines += ["", f"Temperature pass memory bound (float32 logits and log-softmax of one chunk): {chunk} rows x {tokens} "
              f"tokens x {vocab} vocabulary -> {bound / 2**30:.1f} GiB; set per_device_train_batch_size to bound it.", "",
              "## Old-policy probe memory (CPU, vocabulary 151,936, T = 512, one group of G = 16)", "",
              "Peak resident memory the method's `mask_tokens` adds (fresh process, `ru_maxrss`), against the stated "
              "bound; the whole group's distributions would be G x T x V floats = "
              f"{16 * 512 * 151936 * 4 / 2**30:.1f} GiB.", "",
              "| method | logits block (elements) | positions per block | peak added (MiB) | bound (MiB) | within | seconds |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {m['method']} | {m['logits_budget']} | {m['positions_per_block']} | {m['peak_added_bytes'] / 2**20:.0f} | "
              f"{m['bound_bytes'] / 2**20:.0f} | {'yes' if m['within_bound'] else 'NO'} | {m['seconds']:.1f} |" for m in memory]
    (RESULTS / "statistics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def probe_stage(trainer, out: dict, composition) -> None:
    """The advantage stage of ``composition`` on ``out`` with the probe's fields (what a probe method adds)."""
    from grpo_plugins import GRPOBatch
    from grpo_plugins_trl import probe

    n = out["completion_ids"].shape[0]
    prompt_ids = torch.arange(n) // 4
    previous, trainer.composition = trainer.composition, composition
    try:
        batch = GRPOBatch(prompt_ids=prompt_ids, rewards=(torch.arange(n) % 3).float(), completion_ids=out["completion_ids"],
                          completion_mask=out["completion_mask"].float(), **probe.batch_fields(trainer, out, prompt_ids))
        composition.run_advantage_stage(batch)
    finally:
        trainer.composition = previous


def probe_memory(method: str) -> dict:
    """Run :func:`measure_probe_memory` for ``method`` in a fresh process (its own ``ru_maxrss``)."""
    code = f"import json, statistics_cost as s; print(json.dumps(s.measure_probe_memory({method!r})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_probe_memory(method: str, vocab: int = 151936, tokens: int = 512, group: int = 16, hidden: int = 64) -> dict:
    """Peak resident memory ``method``'s ``mask_tokens`` adds over the old-policy probe of one group of
    ``group`` completions of ``tokens`` tokens on a ``vocab``-word reference model, and the stated bound."""
    from grpo_plugins import Composition, GRPOBatch
    from grpo_plugins.probe import LinearProbe

    composition = Composition([method])
    request = next(iter(composition.needs()[method].probes.values()))
    gen = torch.Generator().manual_seed(0)
    batch = GRPOBatch(prompt_ids=torch.zeros(group, dtype=torch.long), rewards=(torch.arange(group) % 2).float(),
                      completion_ids=torch.randint(0, vocab, (group, tokens), generator=gen),
                      completion_mask=torch.ones(group, tokens))
    model = LinearProbe(vocab_size=vocab, hidden_size=hidden, max_positions=tokens)
    model.attach(batch, composition.needs()[method].probes, default_rows=group, learning_rate=1e-3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    composition.run_advantage_stage(batch)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    block = request.logits_budget
    bound = 8 * block * 4 + group * tokens * hidden * 4 + (8 * vocab * hidden * 4 if request.update_preview else 0)
    return {"method": method, "vocab": vocab, "tokens": tokens, "group": group, "hidden": hidden, "logits_budget": block,
            "positions_per_block": max(1, block // (group * vocab)), "peak_added_bytes": peak, "bound_bytes": bound,
            "within_bound": peak <= bound, "seconds": seconds}


if __name__ == "__main__":
    if "--memory" in sys.argv:
        for name in ("tw_grpo", "capo"):
            print(json.dumps(probe_memory(name)))
    else:
        main()
