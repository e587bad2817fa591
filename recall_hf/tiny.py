"""Tiny models built from config, with a word-level tokenizer, for offline examples and tests (no hub access)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
BASIC_WORDS = (
    "the a an of to and in is it that this for on with as was be at by not are from or have but "
    "task text answer options label yes no good bad positive negative review movie email spam ham "
).split()


def word_tokenizer(texts: list[str] | None = None, vocab_size: int = 512) -> transformers.PreTrainedTokenizerFast:
    """A whitespace/punctuation word tokenizer over the most frequent words of `texts` (plus a basic vocabulary)."""
    counts: dict[str, int] = {}
    for t in texts or []:
        for w in re.findall(r"\w+|[^\w\s]", t.lower()):
            counts[w] = counts.get(w, 0) + 1
    words = list(dict.fromkeys(BASIC_WORDS + sorted(counts, key=lambda w: (-counts[w], w))))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words[: max(0, vocab_size - len(SPECIAL))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 4, num_labels: int = 2):
    """Config of a tiny model: `llama`, `qwen2`, `gpt2` (causal LMs) or `bert` (sequence classifier)."""
    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch in ("llama", "qwen2"):
        cls, name = (
            (transformers.LlamaConfig, "LlamaForCausalLM")
            if arch == "llama"
            else (transformers.Qwen2Config, "Qwen2ForCausalLM")
        )
        return cls(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=arch == "qwen2",
            architectures=[name],
            **common,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, architectures=["GPT2LMHeadModel"], **common
        )
    if arch == "bert":
        return transformers.BertConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            max_position_embeddings=512,
            num_labels=num_labels,
            architectures=["BertForSequenceClassification"],
            **common,
        )
    raise ValueError(f"Unknown tiny architecture {arch!r}; choose llama, qwen2, gpt2 or bert.")


TINY_ARCHS = ("llama", "qwen2", "gpt2", "bert")


def build_tiny_model(
    arch: str,
    out_dir: str | Path | None = None,
    texts: list[str] | None = None,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 4,
    num_labels: int = 2,
    vocab_size: int = 512,
):
    """Build a randomly initialised tiny model and tokenizer; save both to `out_dir` when given.

    Returns:
        `(model, tokenizer)`.
    """
    tokenizer = word_tokenizer(texts, vocab_size)
    config = tiny_config(arch, len(tokenizer), hidden, layers, num_labels)
    torch.manual_seed(seed)
    cls = getattr(transformers, config.architectures[0])
    model = cls(config)
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model, tokenizer
