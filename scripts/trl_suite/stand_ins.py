"""Offline stand-ins for TRL's GRPO test suite (``run.sh`` copies this file in as the run's ``conftest.py``).

* Models / tokenizers: run.sh points HF_HUB_CACHE at ./hf_cache (built by build_hub.py) with HF_HUB_OFFLINE=1,
  so `from_pretrained("trl-internal-testing/...")` resolves locally through huggingface_hub's own cache logic.
* Datasets: `datasets.load_dataset("trl-internal-testing/zen", <config>, ...)` is replaced (before the test
  module imports it) by an in-memory build of the zen dataset (Zen of Python lines).
* The adapter: run.sh's copies of the test module import PluginGRPOTrainer as GRPOTrainer (``plugin``), and
  also PluginGRPOConfig as GRPOConfig (``plugin_config``).
"""

import os
from pathlib import Path

import datasets

ZEN = (Path(__file__).parent / "zen.txt").read_text().splitlines()  # the Zen of Python, one line a row
TRAIN, TEST = ZEN[: int(os.environ.get("ZEN_TRAIN_ROWS", 6))], ZEN[17:]  # fewer train rows than the Hub split (17) to fit the CPU budget


def _prompts(lines):
    return [" ".join(line.split()[:3]) for line in lines]


def _build(config, lines):
    prompts = _prompts(lines)
    completions = [line[len(p):] for line, p in zip(lines, prompts)]
    if config == "standard_prompt_only":
        return {"prompt": prompts}
    if config == "conversational_prompt_only":
        return {"prompt": [[{"role": "user", "content": f"What comes after '{p}'?"}] for p in prompts]}
    if config == "standard_prompt_completion":
        return {"prompt": prompts, "completion": completions}
    if config == "conversational_prompt_completion":
        return {"prompt": [[{"role": "user", "content": f"What comes after '{p}'?"}] for p in prompts],
                "completion": [[{"role": "assistant", "content": c}] for c in completions]}
    raise ValueError(f"stand-in zen: unknown config {config!r}")


def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
    if path != "trl-internal-testing/zen":
        raise RuntimeError(f"no offline stand-in for dataset {path!r}")
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(_build(name, TRAIN)), "test": datasets.Dataset.from_dict(_build(name, TEST))}
    )
    if streaming:
        dd = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dd.items()})
    return dd if split is None else dd[split]


datasets.load_dataset = load_dataset
