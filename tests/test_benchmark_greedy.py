"""The decoder's two accuracies (`--lm-metric`): exact match of greedy generation against a hand-run greedy decode."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch
import transformers

from benchmarks.continual import DecoderFamily, Prepared
from benchmarks.report import accuracy_meaning


class TinyDecoder(DecoderFamily):
    """The benchmark's decoder family on a tiny random Llama (no SmolLM2 download)."""

    def _load(self) -> torch.nn.Module:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        self.tok = SimpleNamespace(pad_token_id=0)
        return transformers.LlamaForCausalLM(config)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("answer_len", [1, 3])
def test_greedy_accuracy_is_exact_match_of_greedy_decoding(answer_len):
    fam = TinyDecoder(argparse.Namespace(eval_batch_size=3, lm_metric="greedy"))
    prompts = [[1 + (7 * i + j) % 49 for j in range(4 + i % 3)] for i in range(8)]  # ragged: padding is exercised
    with torch.no_grad():
        decoded = [greedy(fam.core, p, answer_len) for p in prompts]
    # label 0 is each prompt's own greedy answer where i is even; elsewhere it differs in its last token
    label_ids, test = [], []
    for i, (p, d) in enumerate(zip(prompts, decoded)):
        wrong = d[:-1] + [d[-1] % 49 + 1]
        label_ids += [d if i % 2 == 0 else wrong, wrong if i % 2 == 0 else d]
        test.append((p, 2 * i))  # label index 2i: its first word
    task = Prepared("t", [f"w{k}" for k in range(len(label_ids))], [], test, [], label_ids)
    assert fam.greedy_accuracy(task) == pytest.approx(0.5)  # a first-token-only or shifted check gives otherwise


def test_lm_metric_picks_the_accuracy(monkeypatch):
    fam = TinyDecoder(argparse.Namespace(eval_batch_size=4, lm_metric="greedy"))
    monkeypatch.setattr(fam, "greedy_accuracy", lambda task: -1.0)
    task = Prepared("t", ["a", "b"], [], [([1, 2, 3], 0), ([4, 5], 1)], [], [[6], [7]])
    assert fam.accuracy(task) == -1.0
    fam.args.lm_metric = "rank"
    assert 0.0 <= fam.accuracy(task) <= 1.0


def test_report_says_which_decoder_metric():
    assert "greedy" in accuracy_meaning({"model": "smollm2", "lm_metric": "greedy"})
    assert "rank" in accuracy_meaning({"model": "smollm2"})  # runs from before --lm-metric
    assert "head" in accuracy_meaning({"model": "minilm", "lm_metric": "greedy"})
