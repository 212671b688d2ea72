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
  ``per_device_train_batch_size`` rows at a time.

The memory bound of the temperature pass is analytic: one chunk's float32 logits and their
``log_softmax``, ``2 * rows * T * V * 4`` bytes, reported for ``V = 151936`` (Qwen2.5), ``T = 512`` and
chunks of 16 rows (a group of 16). Seconds: best of 7 after a warm-up (a shared machine). Writes
``benchmarks/results/statistics.{json,md}``.
"""

from __future__ import annotations

import json
import os

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
    vocab, tokens, chunk = 151936, 512, 16
    bound = 2 * chunk * tokens * vocab * 4
    result = {"batch": {"completions": n, "tokens": width, "prompt_tokens": prompt}, "rows": rows,
              "temperature_pass_bound_bytes": {"vocab": vocab, "tokens": tokens, "rows": chunk, "bytes": bound}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "statistics.json").write_text(json.dumps(result, indent=2))
    lines = ["# Old-policy statistics: extra forward work per generation batch (TRL adapter, CPU)", "",
             f"Tiny Qwen2 (hidden 64), {n} completions x {width} tokens; one TRL old-log-prob forward as the unit.", "",
             "| case | TRL forward (s) | extra (s) | extra forwards |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['trl_forward_s']:.4f} | {r['extra_s']:.4f} | {r['extra_forwards']:.2f} |" for r in rows]
    lines += ["", f"Temperature pass memory bound (float32 logits and log-softmax of one chunk): {chunk} rows x {tokens} "
              f"tokens x {vocab} vocabulary -> {bound / 2**30:.1f} GiB; set per_device_train_batch_size to bound it."]
    (RESULTS / "statistics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
