"""Classes of completions by their text: equal answers (or equal diversity keys) share a class.

For methods that compare completions by what they say rather than by their reward (answer entropy,
diversity of a set). Interning strings is one dict pass over the completions (hashing text has no
tensor form); everything after it is vectorised on the ``(N,)`` class ids.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from grpo_plugins.batch import GRPOBatch

SOURCES = ("reward", "completion")
"""The built-in key sources; any other value is a ``"module:function"`` applied to the text."""


def completion_text(completion: Any) -> str:
    """A completion's text (a string, or the last message of a chat list), whitespace collapsed."""
    if isinstance(completion, list):
        completion = completion[-1].get("content", "") if completion else ""
    return " ".join(str(completion).split())


def load_function(path: str) -> Callable[[str], Any]:
    """Import ``"package.module:function"``."""
    module, _, attribute = path.partition(":")
    function = getattr(importlib.import_module(module), attribute)
    if not callable(function):
        raise TypeError(f"{path} is not callable")
    return function


def extractor_for(source: str) -> Callable[[str], Any] | None:
    """The function a ``"module:function"`` source names, None for a built-in source."""
    return None if source in SOURCES else load_function(source)


def completion_classes(
    batch: GRPOBatch, source: str, extractor: Callable[[str], Any] | None = None, setting: str = "source"
) -> torch.Tensor:
    """``(N,)`` int64 class of each completion; completions with equal keys share a class.

    ``source``: ``"reward"`` (the reward value is the key: the binary fallback), ``"completion"`` (the
    whitespace-collapsed completion text) or ``"module:function"`` (``extractor`` applied to the text).
    ``setting`` names the method's option in the error raised when the batch has no completions.
    """
    if source == "reward":
        return torch.unique(batch.rewards, return_inverse=True)[1]
    if batch.completions is None:
        raise ValueError(f"{setting}='{source}' needs the decoded completions, but the batch carries none")
    texts: list[Any] = [completion_text(c) for c in batch.completions]
    if extractor is not None:
        texts = [extractor(text) for text in texts]
    classes: dict[Any, int] = {}
    ids = [classes.setdefault(text, len(classes)) for text in texts]
    return torch.tensor(ids, dtype=torch.long, device=batch.rewards.device)
