"""mask_tokens weights multiply each token's policy loss and never change the normaliser (the token
counts come from TRL's completion mask), on both of the adapter's loss paths: checked with GTPO's
conflict weights on one hand-computed batch, loss and gradient."""

from __future__ import annotations

import pytest
import torch

from grpo_plugins_trl.testing import trl_loss_on_batch

# One group of four: rewards [1, 0, 0, 1] -> GTPO's A = r - mean = [0.5, -0.5, -0.5, 0.5].
# Completions 0 (+) and 1 (-) share token 5 at position 0, completions 3 (+) and 2 (-) token 4:
# forward conflicts, weight 2 in the positives and 0 in the negatives. No suffix token is shared.
COMPLETIONS = torch.tensor([[5, 6, 7, 8], [5, 9, 3, 0], [4, 4, 0, 0], [4, 10, 11, 12]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
BATCH = dict(
    prompt_ids=torch.zeros(4, dtype=torch.long),
    rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]),
    completion_ids=COMPLETIONS,
    completion_mask=MASK,
    log_probs=-torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) * MASK,
)
ADVANTAGE = torch.tensor([0.5, -0.5, -0.5, 0.5])[:, None]
WEIGHTS = torch.tensor([[2.0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 0, 0], [2, 1, 1, 1]])
LENGTHS = MASK.sum(1, keepdim=True).float()  # |o| = [4, 3, 2, 4], conflicts included
# GTPO's own loss (unclipped, value -A w), or TRL's PPO-clip at ratio 1 (same value and gradient)
GTPO_OWN_LOSS = {"gtpo": {"entropy_filter": False}}
TRL_LOSS = {"gtpo": {"entropy_filter": False, "unclipped_loss": False}}


def expected(loss_type: str) -> tuple[float, torch.Tensor]:
    """The hand-computed loss and (N, T) gradient with respect to the log-probs."""
    per_token = -ADVANTAGE * WEIGHTS * MASK  # -A w on real tokens
    if loss_type == "grpo":  # per completion sum / |o|, then the mean over completions
        scale = 1.0 / (LENGTHS * 4)
    else:  # dapo: every token of the generation batch counts once: 13 tokens
        scale = torch.full_like(LENGTHS, 1.0 / 13)
    return float((per_token * scale).sum()), per_token * scale


@pytest.mark.parametrize("plugins", [GTPO_OWN_LOSS, TRL_LOSS], ids=["adapter_loss", "trl_loss"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_conflict_tokens_keep_the_completion_length_as_normaliser(plugins, loss_type):
    result = trl_loss_on_batch([plugins], loss_type=loss_type, **BATCH)
    loss, grad = expected(loss_type)
    # grpo: (-0.625 + 0.5 * 2/3 + 0.5 * 1/2 - 0.625) / 4 = -1/6 (dividing by |o| - conflicts would give -1/16)
    assert result.loss.item() == pytest.approx(loss, abs=1e-6)
    assert loss == pytest.approx(-1 / 6 if loss_type == "grpo" else -3.5 / 13, abs=1e-7)
    torch.testing.assert_close(result.grad, grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.per_token_loss, -ADVANTAGE * WEIGHTS * MASK, rtol=1e-6, atol=1e-7)


def test_no_weights_trl_and_adapter_paths_agree():
    """Without methods the helper runs GRPOTrainer's own loss; its numbers are TRL's advantage times -1."""
    result = trl_loss_on_batch(None, loss_type="grpo", **BATCH)
    tokens_advantage = result.advantages[:, None].expand(4, 4) * MASK
    torch.testing.assert_close(result.per_token_loss, -tokens_advantage)
    torch.testing.assert_close(result.grad, -tokens_advantage / (LENGTHS * 4))
