"""The shared-prefix forward (Prefix Grouper, arXiv:2506.05433) for TRL's log-prob passes.

GRPO's forward encodes a prompt once per completion. With ``PluginGRPOConfig(shared_prefix=True)``
the rows of a micro-batch that share a prompt are packed into one sequence, the prompt encoded once:

    plain:   G rows  [prompt | completion_i]                       G (P + L) token-forwards
    grouped: 1 row   [prompt[:-1] | last, c_1 | last, c_2 | ...]   (P - 1) + G (L + 1) token-forwards

Each suffix ``[last prompt token, completion_i]`` attends to the prefix's keys and values and,
causally, to its own tokens, never to another suffix: every completion token sees exactly the keys
and values of the plain forward, at the same positions (``position_ids`` restart after the prefix
for every suffix and equal the plain forward's, left padding included), so the log-probs are the
plain forward's up to float rounding and the gradient reaching the prefix is the sum over its
suffixes. The last prompt token goes with each suffix so that the position predicting a
completion's first token belongs to that completion (one next-token label per position, as TRL's
fused LM head scores them: ``shift_labels``).

The grouping, the attention split (prefix queries on prefix keys; suffix queries on the group's
prefix keys then their own) and the index maps in both directions, with their backward passes, come
from the paper's ``prefix-grouper`` package. Its own attention adapter hands the attention function
2-D key-padding masks, which only flash-attention reads as causal; here each half gets an explicit
``(b, 1, q, k)`` boolean mask (bottom-right-aligned causal AND key padding) and runs through
transformers' ``sdpa`` attention, so it is exact on CPU and GPU alike. The ``sdpa`` entry of
transformers' attention registry is wrapped once: a call that carries :data:`GROUPER_KWARG` runs
grouped, every other call (generation, plain forwards, other models) runs the original function
with the original arguments. The grouper travels in the forward's keyword arguments, so activation
checkpointing recomputes the grouped attention too.
"""

from __future__ import annotations

from typing import Any

import torch

GROUPER_KWARG = "grpo_plugins_prefix_grouper"
SUPPORTED_ATTENTION = ("sdpa",)


# ----------------------------------------------------------------------------- start-up checks
def shared_prefix_problems(args: Any, models: tuple[Any, ...] = ()) -> list[str]:
    """Every reason ``shared_prefix=True`` cannot run with these TRL settings (``args``) and models
    (the policy and the reference model, once loaded); empty when it can."""
    problems = []
    try:
        import prefix_grouper  # noqa: F401
    except ImportError:
        problems.append("shared_prefix=True needs the prefix-grouper package: pip install 'grpo-plugins-trl[prefix]'")
    for model in models:
        if model is None:
            continue
        model = getattr(model, "module", model)  # DDP wrapper
        config = model.config
        name = type(model).__name__
        if config.get_text_config() is not config:
            problems.append(f"shared_prefix=True supports text-only causal LMs; {name} is multimodal (image inputs "
                            "are not grouped)")
            continue
        attention = getattr(config, "_attn_implementation", None)
        if attention not in SUPPORTED_ATTENTION:
            problems.append(f"shared_prefix=True runs attention through transformers' 'sdpa'; {name} uses "
                            f"attn_implementation={attention!r} (load it with attn_implementation='sdpa')")
        layer_types = set(getattr(config, "layer_types", None) or ())
        if getattr(config, "sliding_window", None) is not None or layer_types - {"full_attention"}:
            problems.append(f"shared_prefix=True builds full causal masks; {name} has sliding-window or other "
                            f"non-full attention layers ({sorted(layer_types) or 'sliding_window'})")
        if hasattr(config, "output_router_logits") and getattr(args, "router_aux_loss_coef", 0.0) != 0.0:
            problems.append(f"shared_prefix=True: {name} is a mixture of experts whose router load-balancing loss "
                            "counts each prompt token once per completion in the plain forward; grouped, that "
                            "loss would change (set router_aux_loss_coef=0 or shared_prefix=False)")
    return problems


def refuse_shared_prefix(args: Any, models: tuple[Any, ...] = ()) -> None:
    """Raise ``CompositionError`` with every problem of :func:`shared_prefix_problems`."""
    from grpo_plugins.errors import CompositionError

    problems = shared_prefix_problems(args, models)
    if problems:
        raise CompositionError("; ".join(problems))


# ----------------------------------------------------------------------------- attention
def install_grouped_attention() -> None:
    """Wrap transformers' ``sdpa`` attention so that a call carrying :data:`GROUPER_KWARG` runs grouped
    (idempotent; every other call is passed to the original function unchanged)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(original, "grouped_attention_of", None) is not None:
        return

    def sdpa_or_grouped(module, query, key, value, attention_mask, *args, **kwargs):
        grouper = kwargs.pop(GROUPER_KWARG, None)
        if grouper is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        return grouped_attention(original, grouper, module, query, key, value, *args, **kwargs), None

    sdpa_or_grouped.grouped_attention_of = original
    AttentionInterface.register("sdpa", sdpa_or_grouped)


def causal_key_mask(key_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """``(b, S)`` key-padding mask -> ``(b, 1, Q, S)`` boolean attention mask: query ``q`` sees key ``k``
    when ``k <= q + S - Q`` (the queries are the last ``Q`` positions) and the key is not padding.
    A query row with no visible key (a padding query) sees its own position, so no row is empty."""
    num_keys = key_mask.shape[1]
    keys = torch.arange(num_keys, device=key_mask.device)
    last_visible = torch.arange(num_queries, device=key_mask.device)[:, None] + (num_keys - num_queries)
    causal = keys[None, :] <= last_visible
    return ((key_mask[:, None, None, :] & causal) | (keys[None, :] == last_visible))


def grouped_attention(attend, grouper, module, query, key, value, *args, **kwargs) -> torch.Tensor:
    """Prefix Grouper's two-part attention with ``attend`` (transformers' ``sdpa`` attention function).

    ``query``/``key``/``value``: ``(K, heads, S, d)`` in the grouped layout (``K`` groups). Returns
    ``(K, S, heads, d)``, as transformers' attention functions do.
    """
    masks = grouper.__dict__.get("_attention_masks")
    if masks is None:  # once per forward, shared by every layer
        prefix_mask, suffix_mask = grouper.prefix_attn_mask.to(query.device), grouper.suffix_attn_mask.to(query.device)
        masks = (causal_key_mask(prefix_mask, prefix_mask.shape[1]),
                 causal_key_mask(suffix_mask, grouper.ungrouped_suffix_mask.shape[1]))
        grouper._attention_masks = masks
    q_prefix, k_prefix, v_prefix, q_suffix, k_suffix, v_suffix = grouper.ungroup(query, key, value)
    out_prefix, _ = attend(module, q_prefix, k_prefix, v_prefix, masks[0], *args, **kwargs)
    k_both = grouper.batch_repeat_cat(k_prefix, k_suffix, cat_dim=2)
    v_both = grouper.batch_repeat_cat(v_prefix, v_suffix, cat_dim=2)
    out_suffix, _ = attend(module, q_suffix, k_both, v_both, masks[1], *args, **kwargs)
    return grouper.group(out_prefix, out_suffix)


# ----------------------------------------------------------------------------- the forward
def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` group of each row (rows with the same masked prompt) and ``(K,)`` the first row of each group."""
    keys = torch.where(prompt_mask.bool(), prompt_ids, -1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    rows = torch.arange(len(group), device=group.device)
    first = torch.full((int(group.max()) + 1,), len(group), device=group.device).scatter_reduce(0, group, rows, "amin")
    return group, first


def _check_padding(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> None:
    """Prompts must be left-padded and completions right-padded, without holes (TRL's layout)."""
    left = prompt_mask.flip(1).cumprod(1).flip(1)
    right = completion_mask.cumprod(1)
    if not (torch.equal(left, prompt_mask) and torch.equal(right, completion_mask)):
        raise ValueError("shared_prefix=True needs left-padded prompts and right-padded completions without "
                         "masked tokens in between (TRL's layout); set shared_prefix=False for this data")


def grouped_log_probs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, compute_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Per-token log-probs (and entropies) of the last ``logits_to_keep`` tokens of every row, with each
    prompt encoded once; None when no prompt has two tokens (nothing to share).

    Args:
        model: a causal LM patched with TRL's fused LM head (``fused_lm_head=True`` scores
            ``shift_labels``) whose attention is transformers' ``sdpa``.
        input_ids, attention_mask: ``(N, P + C)`` TRL's ``[prompt | completion]`` rows, the prompt
            left-padded, the completion right-padded; ``C = logits_to_keep``.

    Returns:
        ``(N, C)`` log-probs and ``(N, C)`` entropies (None unless ``compute_entropy``), 0 on padding,
        as TRL's ``_get_per_token_logps_and_entropies`` returns them.
    """
    from prefix_grouper import PrefixGrouper

    width = logits_to_keep
    prompt_ids, prompt_mask = input_ids[:, :-width], attention_mask[:, :-width]
    completion_ids, completion_mask = input_ids[:, -width:], attention_mask[:, -width:].bool()
    _check_padding(prompt_mask, attention_mask[:, -width:])
    n, p = prompt_ids.shape
    if p < 2 or not bool(prompt_mask[:, :-1].any()):
        return None
    device = input_ids.device
    group, first = prompt_groups(prompt_ids, prompt_mask)
    order = torch.argsort(group, stable=True)  # rows of a group side by side, groups in order
    sizes = torch.bincount(group).tolist()
    # Prefix: each group's prompt but its last token (left-padded). Suffix: the last prompt token, then
    # the completion (right-padded). Labels and positions follow the plain forward's.
    prefix_ids, prefix_mask = prompt_ids[first, :-1], prompt_mask[first, :-1].bool()
    suffix_ids = torch.cat([prompt_ids[order, -1:], completion_ids[order]], dim=1)
    suffix_mask = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=device), completion_mask[order]], dim=1)
    suffix_labels = torch.cat([torch.where(completion_mask[order], completion_ids[order], -100),
                               torch.full((n, 1), -100, dtype=completion_ids.dtype, device=device)], dim=1)
    grouper = PrefixGrouper.from_ungrouped_masks(prefix_mask, suffix_mask, sizes, device=device)

    def pack(prefix: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
        return grouper.concat_input(prefix, prefix_mask, suffix, suffix_mask)

    packed_ids = pack(prefix_ids, suffix_ids)
    positions = pack(torch.arange(p - 1, device=device).expand(len(first), -1),
                     torch.arange(p - 1, p + width, device=device).expand(n, -1))
    labels = pack(torch.full_like(prefix_ids, -100), suffix_labels)
    labels = torch.where(grouper.padding_mask.to(device), labels, -100)
    # A 4-D mask is passed through by transformers' mask builder untouched (the grouped attention
    # builds its own), which keeps the (K, S, S) causal mask of the packed rows from being allocated.
    placeholder = torch.ones(packed_ids.shape[0], 1, 1, 1, dtype=torch.bool, device=device)
    out = model(input_ids=packed_ids, attention_mask=placeholder, position_ids=positions, shift_labels=labels,
                fused_lm_head=True, **{GROUPER_KWARG: grouper})
    restore = torch.argsort(order)

    def unpack(per_position: torch.Tensor) -> torch.Tensor:
        _, _, suffix, _ = grouper.split_output(per_position)  # (N, max suffix length)
        suffix = suffix[:, :width]
        return torch.nn.functional.pad(suffix, (0, width - suffix.shape[1]))[restore]

    log_probs = unpack(out.log_probs)
    entropies = unpack(out.entropy) if compute_entropy else None
    return log_probs, entropies


def shared_prefix_log_probs(
    trainer: Any, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
    batch_size: int | None = None, compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """``GRPOTrainer._get_per_token_logps_and_entropies`` with the shared-prefix forward: the same
    chunks of ``batch_size`` rows, the same autocast; a chunk with nothing to share runs TRL's forward."""
    from trl import GRPOTrainer

    batch_size = batch_size or input_ids.size(0)
    log_probs, entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        with trainer.accelerator.autocast():
            out = grouped_log_probs(model, ids, mask, logits_to_keep, compute_entropy)
        if out is None:
            out = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, model, ids, mask, logits_to_keep, compute_entropy=compute_entropy
            )[:2]
        log_probs.append(out[0])
        entropies.append(out[1])
    return torch.cat(log_probs), (torch.cat(entropies) if compute_entropy else None), None
