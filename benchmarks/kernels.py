"""Hook throughput: every installed method's hooks on a large batch, against a plain-torch floor.

    python benchmarks/kernels.py --quick      # 10^5 completions x 16 tokens
    python benchmarks/kernels.py              # 10^6 completions x 16 tokens = 1.6 x 10^7 tokens

For each method, in a fresh subprocess (so peak memory is its own): build a global batch of ``N``
completions in groups of 8 with 0/1 rewards, run the advantage stage (shape -> estimate -> adjust ->
mask), ``observe``, and the loss stage (surrogate, gates, terms; forward and backward) through the
real ``Composition``. A method without loss hooks still pays for the trainer's PPO-clip loss, as in
training. The floor, measured in the same subprocess on the same tensors, is what plain GRPO costs
in plain torch: group mean/std of the rewards (``view(-1, G)``), the PPO-clip per-token loss and its
masked mean, forward and backward.

Both sides do the same non-method work: the batch's group index (``torch.unique`` of the prompt
ids, which an adapter builds once per batch) is computed once outside the timed region and shared;
the time spent in the core's contract checks (``validate_batch``, ``check_output``), which the
floor does not do, is measured and reported separately (``checks (s)``), not in ``hooks (s)``.
Floor and method runs alternate, five times after one warm-up each; seconds are the best run and
the ratio is the median over the five of each method run divided by the floor run just before it
(adjacent runs see the same load from other processes on a shared machine). Reported: hook seconds,
checks seconds, floor seconds, ratio (target <= 3) and peak resident memory. Writes
``benchmarks/results/kernels.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import resource
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GROUP = 8
TOKENS = 16


def make_inputs(n: int, seed: int = 0):
    from grpo_plugins import GRPOBatch

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, TOKENS + 1, (n,), generator=gen)
    mask = (torch.arange(TOKENS) < lengths[:, None]).float()
    rewards = torch.randint(0, 2, (n,), generator=gen).float()
    batch = GRPOBatch(
        prompt_ids=torch.arange(n) // GROUP,
        rewards=rewards,
        reward_components=rewards[:, None].clone(),
        reward_names=("correct",),
        reward_weights=torch.ones(1),
        completion_ids=torch.randint(4, 16, (n, TOKENS), generator=gen) * mask.long(),
        completion_mask=mask,
        old_log_probs=-torch.rand(n, TOKENS, generator=gen) * mask,
        ref_log_probs=-torch.rand(n, TOKENS, generator=gen) * mask,
        rows=None,
    )
    return batch, -torch.rand(n, TOKENS, generator=gen) * mask


class CheckTimer:
    """Wraps the core's contract checks, as the composition calls them, and sums the time spent in them."""

    def __init__(self) -> None:
        import grpo_plugins.dispatch as dispatch_module
        import grpo_plugins.stages as stages_module

        self.seconds = 0.0
        for module, name in ((stages_module, "validate_batch"), (dispatch_module, "check_contract")):
            setattr(module, name, self._timed(getattr(module, name)))

    def _timed(self, check):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return check(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper


def best_of(floor_fn, method_fn, checks: CheckTimer, repeats: int) -> dict:
    """Floor and method (checks excluded) run alternately ``repeats`` times after a warm-up each.

    Returns the best floor seconds, the best method seconds with the checks' seconds of that run, and
    the median over the repeats of the ratio of each method run to the floor run just before it (the
    two see the same load from other processes, so the ratio is steadier than a ratio of bests).
    """
    floor_fn()  # warm-up
    method_fn()
    floors, methods, checked = [], [], []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        floor_fn()
        floors.append(time.perf_counter() - start)
        gc.collect()
        checks.seconds = 0.0
        start = time.perf_counter()
        method_fn()
        methods.append(time.perf_counter() - start - checks.seconds)
        checked.append(checks.seconds)
    best = min(range(repeats), key=methods.__getitem__)
    ratios = sorted(m / f for m, f in zip(methods, floors))
    middle = len(ratios) // 2
    median = ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2
    return {"seconds": methods[best], "checks_seconds": checked[best], "floor_seconds": min(floors), "ratio": median}


def floor_step(batch, current) -> None:
    rewards = batch.rewards.view(-1, GROUP)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).reshape(-1)
    log_probs = current.clone().requires_grad_(True)
    ratio = torch.exp(log_probs - batch.old_log_probs)
    a = adv[:, None]
    loss = -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a)
    mask = batch.completion_mask
    ((loss * mask).sum() / mask.sum()).backward()


def ppo_clip(x):
    """The trainer's own per-token PPO-clip loss, as in the floor."""
    ratio = x.ratio
    return -torch.min(ratio * x.advantages, ratio.clamp(1 - x.clip_low, 1 + x.clip_high) * x.advantages)


def method_step(composition, batch, current) -> None:
    from grpo_plugins import LossInputs

    work = type(batch)(**{k: getattr(batch, k) for k in batch.__dataclass_fields__})
    work.row_data = {}
    if "_groups" in batch.__dict__:  # the group index is built once per batch (by the adapter), not per method
        work.__dict__["_groups"] = batch.__dict__["_groups"]
    composition.run_advantage_stage(work)
    composition.run_observe(work, step=1)
    weights = work.token_weights
    mask = work.completion_mask if weights is None else work.completion_mask * (weights > 0).to(work.completion_mask.dtype)
    adv = work.advantages if work.advantages.dim() == 2 else work.advantages[:, None].expand_as(mask)
    log_probs = current.clone().requires_grad_(True)
    inputs = LossInputs(log_probs=log_probs, old_log_probs=work.old_log_probs, advantages=adv, mask=mask,
                        ref_log_probs=work.ref_log_probs, row_data=work.row_data)
    parts = composition.run_loss_stage(inputs, ppo_clip)
    total = parts.policy + sum(parts.terms.values()) if parts.terms else parts.policy
    if weights is not None and not bool(((weights == 0) | (weights == 1)).all()):
        total = total * weights  # non-binary token weights scale the per-token loss
    ((total * mask).sum() / mask.sum()).backward()


def measure(name: str, n: int, repeats: int, queue) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from grpo_plugins import Composition

    checks = CheckTimer()
    config = {"scaf_grpo": {"total_steps": 100}}.get(name, {})
    composition = Composition([{name: config}] if name != "grpo" else [])
    batch, current = make_inputs(n)
    batch.group_index  # noqa: B018 -- built once, shared by every run (see method_step)
    timing = best_of(
        lambda: floor_step(batch, current), lambda: method_step(composition, batch, current), checks, repeats
    )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"method": name, "hooks": composition.describe().splitlines()[0], **timing, "peak_rss_mib": peak_mib})


def main() -> None:
    parser = argparse.ArgumentParser(description="Throughput of every installed method's hooks.")
    parser.add_argument("--quick", action="store_true", help="10^5 completions instead of 10^6")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    from grpo_plugins.registry import discover

    names = args.methods or sorted(discover()[0])
    n = 100_000 if args.quick else 1_000_000
    repeats = 5
    context = mp.get_context("spawn")
    load_before = os.getloadavg()[0]
    rows = []
    for name in names:
        queue = context.Queue()
        process = context.Process(target=measure, args=(name, n, repeats, queue))
        process.start()
        process.join()
        if process.exitcode != 0:
            rows.append({"method": name, "error": f"exit code {process.exitcode}"})
            continue
        row = queue.get()
        rows.append(row)
        print(f"{name:<16} {row['seconds']:.3f} s  checks {row['checks_seconds']:.3f} s  floor {row['floor_seconds']:.3f} s  "
              f"ratio {row['ratio']:.2f}  "
              f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)
    os.makedirs(args.out, exist_ok=True)
    settings = {"completions": n, "tokens": n * TOKENS, "group_size": GROUP, "repeats": repeats,
                "threads": int(os.environ.get("BENCH_THREADS", "2")), "cpus": os.cpu_count(),
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    with open(os.path.join(args.out, "kernels.json"), "w") as handle:
        json.dump({"settings": settings, "rows": rows}, handle, indent=1)
    lines = [f"Hook throughput on {n:,} completions x {TOKENS} tokens (groups of {GROUP}), "
             f"{settings['threads']} CPU threads of {settings['cpus']} (1-minute load average {settings['load_average_1min'][0]} "
             f"at the start, {settings['load_average_1min'][1]} at the end), torch {torch.__version__}. Floor = plain-torch GRPO advantage + PPO-clip "
             "loss, fwd+bwd; hooks = the method's step (advantage stage, observe, loss fwd+bwd) without the core's "
             "contract checks, which are listed apart. Floor and method alternate "
             f"{repeats} times after a warm-up: seconds are the best run, ratio the median of method/floor over "
             "adjacent pairs.", "",
             "| method | hooks (s) | checks (s) | floor (s) | ratio | peak RSS (MiB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['seconds']:.3f} | {r['checks_seconds']:.3f} | {r['floor_seconds']:.3f} | "
                         f"{r['ratio']:.2f} | "
                         f"{r['peak_rss_mib']:.0f} |")
    with open(os.path.join(args.out, "kernels.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    ok = [r for r in rows if "ratio" in r]
    print(json.dumps({"benchmark": "kernels", "completions": n, "max_ratio": max(r["ratio"] for r in ok),
                      "ratios": {r["method"]: round(r["ratio"], 2) for r in ok}}))


if __name__ == "__main__":
    main()
