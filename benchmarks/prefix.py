"""The shared-prefix forward (``PluginGRPOConfig(shared_prefix=True)``, Prefix Grouper) against TRL's plain forward.

One GRPO training step on one micro-batch of ``G`` completions of one prompt, on CPU in fp32: the
log-prob forward through TRL's fused LM head (``GRPOTrainer._get_per_token_logps_and_entropies``, or
the adapter's grouped forward), a GRPO-style loss on the log-probs, the backward pass and an AdamW
step. Generation is left out: the option does not change it. The model is the test suite's tiny
Qwen2 scaled to a few million parameters.

Reported, shared / plain:

- ``step_time_ratio``: median step time (the two forwards run interleaved, A, B, A, B, ..., so machine
  noise hits both alike; the first step of each is a warm-up);
- ``peak_memory_ratio``: the first step's peak resident memory above the resident set before it (AdamW's
  states included, equal in both), each configuration in a fresh process (Linux ``VmHWM``, reset
  before the step), and the bytes of the tensors autograd holds for the backward
  pass (unique storages, in-process; weights included);
- the crossover: the step-time ratio for prompt / completion length ratios from 1/4 to the headline's,
  and the smallest ratio at which the shared forward is faster.

Writes ``benchmarks/results/prefix.json`` and ``prefix.md`` (``prefix.quick.*`` with ``--quick``) and
prints the headline as one JSON line.

    python benchmarks/prefix.py            # hidden 256, 4 layers (2.4 M parameters), G = 16, completion 32, prompt 256
    python benchmarks/prefix.py --quick    # hidden 64, 2 layers, completion 8, prompt 64, 2 repetitions
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def build(hidden: int, layers: int, prompt: int, completion: int, group: int, seed: int = 0):
    """The model with TRL's fused head, AdamW, and one micro-batch: ``group`` completions of one
    prompt, left-padded by 1 token, completion lengths spread from half to full (right-padded)."""
    from trl.trainer.utils import add_fused_lm_head

    from grpo_plugins_trl.prefix import install_grouped_attention
    from grpo_plugins_trl.testing import tiny_model

    install_grouped_attention()
    model = tiny_model(seed, hidden_size=hidden, num_layers=layers, max_positions=prompt + completion + 8)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(4, vocab, (1, prompt), generator=g).expand(group, -1).clone()
    prompt_mask = torch.ones(group, prompt, dtype=torch.long)
    prompt_mask[:, 0] = 0
    lengths = torch.linspace(completion // 2, completion, group).round().long()
    completion_mask = (torch.arange(completion)[None, :] < lengths[:, None]).long()
    completion_ids = torch.where(completion_mask.bool(), torch.randint(4, vocab, (group, completion), generator=g), 0)
    batch = (torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), completion)
    advantages = torch.randn(group, 1, generator=g)
    return model, optimizer, batch, advantages


def forward(model, batch, shared: bool):
    from grpo_plugins_trl.prefix import grouped_log_probs

    input_ids, attention_mask, width = batch
    if shared:
        out = grouped_log_probs(model, input_ids, attention_mask, width, compute_entropy=True)
        if out is not None:  # None: no prompt token to share (the trainer then runs the plain forward)
            return out
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-width] = -100
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    return out.log_probs[:, -width:], out.entropy[:, -width:]


def step(model, optimizer, batch, advantages, shared: bool) -> None:
    """Forward, a GRPO loss (ratio to the detached log-probs times the advantage, token mean), backward, AdamW."""
    log_probs, _ = forward(model, batch, shared)
    mask = batch[1][:, -batch[2]:].float()
    ratio = torch.exp(log_probs - log_probs.detach())
    loss = -((ratio * advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_pair(settings: dict, repeats: int) -> dict:
    """Median step seconds of the plain and the shared forward, interleaved."""
    model, optimizer, batch, advantages = build(**settings)
    times: dict[str, list[float]] = {"plain": [], "shared": []}
    for r in range(repeats + 1):
        for name in ("plain", "shared"):
            start = time.perf_counter()
            step(model, optimizer, batch, advantages, name == "shared")
            if r > 0:
                times[name].append(time.perf_counter() - start)
    plain, shared = statistics.median(times["plain"]), statistics.median(times["shared"])
    return {"plain_s": plain, "shared_s": shared, "step_time_ratio": shared / plain}


def saved_bytes(settings: dict, shared: bool) -> int:
    """Bytes of the unique storages autograd saves for the backward pass of one step's forward."""
    model, _, batch, advantages = build(**settings)
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        log_probs, _ = forward(model, batch, shared)
    del log_probs
    return sum(storages.values())


def _rss_child(settings: dict, shared: bool, queue) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, optimizer, batch, advantages = build(**settings)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM): the imports' transient peak is higher
        f.write("5")
    before = _status_kib("VmRSS")
    step(model, optimizer, batch, advantages, shared)  # the first step: nothing cached by the allocator yet
    peak = _status_kib("VmHWM")
    queue.put({"rss_before": before, "peak": peak, "step_peak": peak - before})


def _status_kib(field: str) -> int:
    """A memory field of ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":"))) * 1024


def peak_rss(settings: dict, shared: bool) -> dict:
    """The step's peak resident memory above the resident set before it, in a fresh process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_rss_child, args=(settings, shared, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def markdown(report: dict) -> str:
    s, h = report["settings"], report["headline"]
    lines = [
        "# Shared-prefix forward (Prefix Grouper) against TRL's plain forward",
        "",
        f"One training step (log-prob forward through TRL's fused head, GRPO loss, backward, AdamW) on one micro-batch "
        f"of G = {s['group']} completions of one prompt; tiny Qwen2 with hidden {s['hidden']}, {s['layers']} layers "
        f"({report['parameters'] / 1e6:.1f} M parameters), CPU fp32, {report['threads']} thread(s), median of "
        f"{s['repeats']} interleaved repetitions. Generation is not part of the step (the option does not change it).",
        "",
        "| prompt / completion | prompt | completion | plain step (s) | shared step (s) | step-time ratio shared / plain |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["crossover"]:
        lines.append(f"| {row['ratio']:g} | {row['prompt']} | {row['completion']} | {row['plain_s']:.4f} | "
                     f"{row['shared_s']:.4f} | {row['step_time_ratio']:.3f} |")
    mem = report["memory"]
    lines += [
        "",
        f"**Headline** (prompt {s['prompt']} = {s['prompt'] // s['completion']} x completion {s['completion']}): "
        f"step-time ratio **{h['step_time_ratio']:.3f}** ({1 / h['step_time_ratio']:.2f}x faster), peak-memory ratio "
        f"**{h['peak_memory_ratio']:.3f}** (step's peak RSS above the resident set: plain "
        f"{mem['plain_rss']['step_peak'] / 2**20:.0f} MiB, shared {mem['shared_rss']['step_peak'] / 2**20:.0f} MiB); "
        f"tensors held for backward: plain {mem['plain_saved'] / 2**20:.0f} MiB, shared "
        f"{mem['shared_saved'] / 2**20:.0f} MiB (ratio {h['saved_memory_ratio']:.3f}).",
        "",
        f"Crossover: the shared forward is faster from a prompt / completion length ratio of "
        f"**{report['crossover_ratio']}** on (the smallest measured ratio from which every larger one has a "
        f"step-time ratio below 1"
        + (", i.e. at every measured ratio" if report["crossover_ratio"] == report["crossover"][0]["ratio"] else "")
        + ").",
        "",
        "Token-forwards per step: plain G (P + L), shared (P - 1) + G (L' + 1) with L' the completion's real "
        "length: the packed rows also drop the completions' right padding (here lengths spread from L/2 to L), "
        "which is what it saves when prompts are short. Attention: plain G (P + L)^2, shared P^2 + G (L' + 1)(P + L'). "
        "The shared forward's fixed cost (grouping the rows, building the index maps and masks, the gathers and "
        "scatters around every attention call) dominates on very small models (see the quick mode). "
        "In a real run the rows of a group must share a micro-batch for the "
        "prefix to be shared: TRL shuffles the generation batch before cutting it into micro-batches, so a "
        "micro-batch of B rows drawn from a generation batch of several prompts holds fewer rows per prompt "
        "(see adapters/trl/README.md).",
        "",
        f"Machine: {report['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and lengths, 2 repetitions (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    if args.quick:
        settings = dict(hidden=64, layers=2, prompt=64, completion=8, group=16)
        repeats = args.repeats or 2
    else:
        settings = dict(hidden=256, layers=4, prompt=256, completion=32, group=16)
        repeats = args.repeats or 5
    ratios = [0.25, 0.5, 1, 2, 4, settings["prompt"] // settings["completion"]]
    crossover = []
    for ratio in ratios:
        row_settings = {**settings, "prompt": max(3, int(ratio * settings["completion"]))}
        row = timed_pair(row_settings, repeats if ratio == ratios[-1] else max(1, repeats // 2 + 1))
        crossover.append({"ratio": ratio, "prompt": row_settings["prompt"], "completion": settings["completion"], **row})
        print(json.dumps(crossover[-1]), file=sys.stderr, flush=True)
    headline_time = crossover[-1]
    memory = {
        "plain_saved": saved_bytes(settings, False), "shared_saved": saved_bytes(settings, True),
        "plain_rss": peak_rss(settings, False), "shared_rss": peak_rss(settings, True),
    }
    crossover_ratio = None  # the smallest ratio from which on every measured ratio is faster
    for row in reversed(crossover):
        if row["step_time_ratio"] >= 1:
            break
        crossover_ratio = row["ratio"]
    model, *_ = build(**settings)
    report = {
        "benchmark": "prefix", "quick": args.quick, "threads": threads,
        "settings": {**settings, "repeats": repeats},
        "parameters": sum(p.numel() for p in model.parameters()),
        "headline": {
            "step_time_ratio": headline_time["step_time_ratio"],
            "peak_memory_ratio": memory["shared_rss"]["step_peak"] / memory["plain_rss"]["step_peak"],
            "saved_memory_ratio": memory["shared_saved"] / memory["plain_saved"],
        },
        "crossover": crossover,
        "crossover_ratio": crossover_ratio,
        "memory": memory,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    RESULTS.mkdir(exist_ok=True)
    name = "prefix.quick" if args.quick else "prefix"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(report))
    print(json.dumps({"benchmark": "prefix", **report["headline"], "crossover_ratio": report["crossover_ratio"]}))
    return report


if __name__ == "__main__":
    main()
