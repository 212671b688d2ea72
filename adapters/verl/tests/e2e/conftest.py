"""Session fixtures of the verl CPU loop: the tiny assets and one local Ray cluster (2 CPUs)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[4] / "examples" / "verl"
REQUIRED = ("transfer_queue", "ray", "verl")
collect_ignore_glob = [] if all(importlib.util.find_spec(name) for name in REQUIRED) else ["test_*.py"]
"""Without the packages of verl's CPU loop these tests are not collected (they import them at module top)."""


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """The example's tiny model, tokenizer and datasets (``make_tiny_assets.py``)."""
    pd = pytest.importorskip("pandas")
    assets = _load("make_tiny_assets", EXAMPLE / "make_tiny_assets.py")
    work = tmp_path_factory.mktemp("verl_cpu_assets")
    tokenizer = assets.build_tokenizer()
    assets.build_model(tokenizer, work / "model")
    for name, rows in (("train", assets.build_rows(32, seed=1)), ("val", assets.build_rows(8, seed=2, offset=32))):
        pd.DataFrame(rows).to_parquet(work / f"{name}.parquet")
    return work


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test run, shut down at the end."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
