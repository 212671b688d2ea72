"""Method metrics reach the trainer's loggers (wandb, offline) under plugins/<method>/<key>."""

from __future__ import annotations

import time

import pytest

from grpo_plugins import Method, hookimpl
from grpo_plugins_trl.testing import tiny_grpo_run


class Ping(Method):
    name = "ping"

    @hookimpl
    def observe(self, batch, step):
        self.log_metric("echo", 0.5 + step)


def test_plugin_metrics_reach_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "grpo-plugins-test")
    trainer = tiny_grpo_run([Ping()], max_steps=2, report_to="wandb", output_dir=str(tmp_path / "out"))
    import wandb

    wandb.finish()
    assert [row.get("plugins/ping/echo") for row in trainer.state.log_history[:2]] == [1.5, 2.5]
    runs = list(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 1
    deadline = time.monotonic() + 60  # the wandb service may still be writing the run file
    while True:
        data = b"".join(path.read_bytes() for path in runs[0].rglob("*.wandb"))
        if b"plugins/ping/echo" in data or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert b"plugins/ping/echo" in data
    assert b"plugins/grpo/frac_zero_advantage" in data
