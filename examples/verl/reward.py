"""Exact-answer reward for the tiny arithmetic task (verl ``reward.custom_reward_function``)."""

from __future__ import annotations

import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """1.0 when the first number in the completion equals ``ground_truth``, else 0.0 (as a dict, so
    verl also records ``acc`` in ``reward_extra_info``)."""
    match = re.search(r"\d+", solution_str or "")
    correct = float(match is not None and match.group(0) == str(ground_truth).strip())
    return {"score": correct, "acc": correct}
