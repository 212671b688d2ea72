"""Build local stand-ins of the hub repos TRL's GRPO tests load, in an offline HF hub cache layout.

Run once (run.sh does it when the cache is missing):  python build_hub.py <hub_cache_dir>

Tokenizer: byte-level BPE whose ids follow Qwen2.5's layout (ids 0..255 the GPT-2 byte alphabet,
the multi-character tokens the tests hard-code at their Qwen ids, fillers elsewhere, Qwen's special
tokens at 151643..151668), with TRL's stored Qwen2.5 / Qwen3 chat templates, so that the tests' hard-coded
token ids (pad 151643, eos 151645, <tool_call> 151657, '{"' 4913, ...) decode as they do on the Hub.
Models: random tiny configs of each architecture, vocab 151669.
"""

import json
import os
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

import trl

TEMPLATES = Path(trl.__file__).parent / "chat_templates"
VOCAB_SIZE = 151669


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs], dict(zip(bs, [chr(c) for c in cs]))


ALPHABET, BYTE2CHAR = bytes_to_unicode()


def bl(text):  # text in byte-level unicode form
    return "".join(BYTE2CHAR[b] for b in text.encode("utf-8"))


KNOWN = {  # Qwen2.5 ids the tests hard-code
    4913: '{"', 606: "name", 788: '":', 330: ' "', 64648: "multiply", 22785: "_tool", 497: '",', 16370: "arguments",
    5212: ' {"', 11248: "}}\n", 7692: "async", 93054: "_multiply", 1513: " don", 944: "'t", 1414: " know",
    894: " any", 5392: " tool", 17453: "Done",
}
SPECIALS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]


CORPUS = [  # what the tests tokenize: learned merges keep sequences short (the real Qwen vocab does too)
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "<|im_start|>system\n",
    "<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "What comes after '",
    "# Tools\n\nYou may call one or more functions to assist with the user query.",
    "You are provided with function signatures within <tools></tools> XML tags:",
    "For each function call, return a json object with function name and arguments within",
    '{"type": "function", "function": {"name": "multiply_tool", "description": "Multiplies two integers.", '
    '"parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "The first integer."}, '
    '"b": {"type": "integer", "description": "The second integer."}}, "required": ["a", "b"]}}',
    "<tool_response>\n12\n</tool_response>", "Done!", "I don't know any tool",
] + [line for line in open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "zen.txt")).read().splitlines()]


def learned_merges():
    """Train a small byte-level BPE on CORPUS; return its merges (pairs of byte-level strings)."""
    from tokenizers import trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=1200, initial_alphabet=ALPHABET,
                                                          show_progress=False, min_frequency=2))
    return json.loads(t.to_str())["model"]["merges"]


def build_tokenizer(template_name):
    vocab = {ch: i for i, ch in enumerate(ALPHABET)}
    for i, text in KNOWN.items():
        vocab[bl(text)] = i
    used = set(vocab.values())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned_merges()]
    free = (i for i in range(256, 151643) if i not in used)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = next(free)
    for i in free:
        vocab[bl(f" w{i}")] = i
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    core.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in SPECIALS])
    assert core.token_to_id("<|endoftext|>") == 151643 and core.token_to_id("</think>") == 151668
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = (TEMPLATES / f"{template_name}.jinja").read_text()
    tok.model_max_length = 32768
    return tok


SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB_SIZE, max_position_embeddings=2048, pad_token_id=151643, eos_token_id=151645,
             bos_token_id=151643)
ARCH = {  # repo name -> (model_type, head, template, extra config)
    "tiny-Qwen2ForCausalLM-2.5": ("qwen2", "lm", "qwen2_5", {}),
    "tiny-Qwen2ForSequenceClassification-2.5": ("qwen2", "cls", "qwen2_5", {}),
    "tiny-Qwen3ForCausalLM": ("qwen3", "lm", "qwen3", dict(head_dim=4, tie_word_embeddings=False)),
    "tiny-Qwen3ForSequenceClassification": ("qwen3", "cls", "qwen3", dict(head_dim=4)),
    "tiny-Qwen3MoeForCausalLM": ("qwen3_moe", "lm", "qwen3",
                                 dict(head_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    "tiny-LlamaForCausalLM-3.2": ("llama", "lm", "qwen2_5", {}),
    "tiny-LlamaForSequenceClassification-3.2": ("llama", "cls", "qwen2_5", {}),
    "tiny-MistralForCausalLM-0.2": ("mistral", "lm", "qwen2_5", {}),
    "tiny-Gemma2ForCausalLM": ("gemma2", "lm", "qwen2_5", dict(head_dim=4, tie_word_embeddings=True)),
    "tiny-Cohere2ForCausalLM": ("cohere2", "lm", "qwen2_5", {}),
    "tiny-GptOssForCausalLM": ("gpt_oss", "lm", "qwen2_5",
                               dict(head_dim=4, num_local_experts=4, num_experts_per_tok=2)),
    "tiny-Glm4MoeForCausalLM": ("glm4_moe", "lm", "qwen2_5",
                                dict(head_dim=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                     first_k_dense_replace=1, n_group=1, topk_group=1)),
}


def write_repo(cache, repo_id, save):
    folder = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    save(str(snap))


def main(cache):
    torch.manual_seed(0)
    tokenizers = {}
    for name, (model_type, head, template, extra) in ARCH.items():
        tok = tokenizers.setdefault(template, build_tokenizer(template))
        try:
            config = AutoConfig.for_model(model_type, **{**SMALL, **extra})
            if head == "cls":
                config.num_labels = 1
                model = AutoModelForSequenceClassification.from_config(config)
            else:
                model = AutoModelForCausalLM.from_config(config)
                model.generation_config.eos_token_id = 151645
                model.generation_config.pad_token_id = 151643

            def save(path, model=model, tok=tok):
                model.save_pretrained(path)
                tok.save_pretrained(path)

            write_repo(cache, f"trl-internal-testing/{name}", save)
            print("built", name, sum(p.numel() for p in model.parameters()))
        except Exception as error:  # an architecture this transformers cannot build small: tests using it fail
            print("SKIPPED", name, type(error).__name__, error)


if __name__ == "__main__":
    main(sys.argv[1])
