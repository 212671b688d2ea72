"""Helpers for tests of the verl adapter: verl-shaped batches, actor configs, throw-away method distributions."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch


def verl_batch(
    group_sizes: Sequence[int] = (3, 5, 2, 4),
    num_tokens: int = 7,
    seed: int = 0,
    num_padding: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``(token_level_rewards (B, T), response_mask (B, T) int64, uid (B,) object)`` as verl builds them.

    Rows of a group are scattered through the batch (verl reorders rows by sequence length);
    responses have random lengths; the score sits on the last response token; ``num_padding``
    synthetic rows (uid ``pad<hex>``, empty mask, zero reward) are appended like
    ``upsample_batch_to_divisible_size`` does.
    """
    gen = torch.Generator().manual_seed(seed)
    uids = np.concatenate([[f"uid-{seed}-{g}"] * size for g, size in enumerate(group_sizes)])
    uids = uids[torch.randperm(len(uids), generator=gen).numpy()]
    n = len(uids)
    lengths = torch.randint(1, num_tokens + 1, (n,), generator=gen)
    mask = (torch.arange(num_tokens) < lengths[:, None]).long()
    scores = torch.randn(n, generator=gen) * 2 + torch.randint(0, 2, (n,), generator=gen).float()
    rewards = torch.zeros(n, num_tokens)
    rewards[torch.arange(n), lengths - 1] = scores
    if num_padding:
        rewards = torch.cat([rewards, torch.zeros(num_padding, num_tokens)])
        mask = torch.cat([mask, torch.zeros(num_padding, num_tokens, dtype=torch.long)])
        uids = np.concatenate([uids, ["pad0123abcd"] * num_padding])
    return rewards, mask, np.array(uids, dtype=object)


def actor_config(loss_mode: str = "vanilla", loss_agg_mode: str = "token-mean", **fields):
    """A real verl ``ActorConfig`` (fsdp strategy) for calling policy losses on CPU."""
    from verl.workers.config import ActorConfig, PolicyLossConfig

    values = dict(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=4, loss_agg_mode=loss_agg_mode)
    values.update(fields)
    return ActorConfig(policy_loss=PolicyLossConfig(loss_mode=loss_mode), **values)


def install_fake_methods(root: Path, module: str, source: str, entry_points: Mapping[str, str]) -> Path:
    """Write module ``module`` and a dist-info declaring ``grpo_plugins`` entry points under ``root``.

    Puts ``root`` on ``sys.path`` (remove it when done) so that ``importlib.metadata`` discovers the
    methods; pass ``root`` in ``PYTHONPATH`` to a subprocess for the same effect there.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist = root / f"{module.replace('_', '-')}-0.0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[grpo_plugins]\n{lines}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def isolate(monkeypatch) -> None:
    """Start a test with no method list in the environment and none configured; both are restored after.

    (``setenv`` first so that pytest records the variable's original absence and removes anything a
    test, e.g. ``prepare_config``, writes to it.)
    """
    from grpo_plugins_verl.runtime import configure
    from grpo_plugins_verl.settings import ENV_VAR

    monkeypatch.setenv(ENV_VAR, "")
    monkeypatch.delenv(ENV_VAR)
    configure(None)
