"""Continual-learning benchmark: RECALL vs sequential fine-tuning, interpolation and merging baselines.

Real models and tasks (``benchmarks/assets.py``, BENCHMARK.md), everything kept in memory (state dicts, no disk
merges). RECALL weights come from the library's public in-memory entry points (``recall_hf.select_typical_samples``,
``recall_hf.represent``, ``recall_hf.merge_coefficients``, ``recall_hf.layers.LayerMap``,
``recall_hf.fusion.fuse_tensor``), so the numbers measure the library.

Models:

* ``--model minilm``: all-MiniLM-L6-v2 as ``AutoModelForSequenceClassification`` with ONE head per task (a linear
  layer on the pooled output, kept in a dict). The head belongs to layer L. Merges act on the shared encoder
  (embeddings, blocks, pooler); each task keeps the head it was trained with. In the chain protocol every task trains
  a fresh head (same seeded init for every method) together with the encoder it starts from.
* ``--model smollm2``: SmolLM2-135M-Instruct, SFT on label words: prompt ``prompt_for(task, text)`` (the text is
  truncated so the prompt fits ``--max-length`` tokens), target ``target_for(task, label)``; the loss covers only the
  answer tokens. Accuracy by rank classification: the label word with the lowest mean token loss after the prompt
  (``--lm-metric greedy``: exact match of greedy generation over the whole vocabulary instead).

Fine-tuning: a plain torch loop (AdamW, linear warmup then linear decay, seeded data order and head init). With
``--lora`` a PEFT LoRA (r=8, attention + MLP projections; heads trained fully) is trained and folded into full
weights (``merge_and_unload``) before any merge: every method then merges full weights (the delta ``s * B @ A``).

Protocols and metrics: see ``--help`` and ``benchmarks/methods.py``. ACC = mean final accuracy over all tasks; BWT =
mean over earlier tasks of (final - just-learned) accuracy; plasticity = mean over steps of the new task's accuracy
right after its step.

Run ``python -m benchmarks.continual --quick`` for a smoke run (minutes on 2 cores); results go to
``benchmarks/results/<run-name>/`` (``results.json``, ``results.md``, plots).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks import methods as M  # noqa: E402
from benchmarks.assets import LONG_TASKS  # noqa: E402

log = logging.getLogger("benchmarks.continual")

DEFAULT_TASKS = ("sentiment", "spam", "wordnet-category", "health-source")
QUICK_TASKS = ("sentiment", "spam", "wordnet-category")
TASK_PRESETS = {"long": LONG_TASKS}  # --tasks long: the long stream (BENCHMARK.md, "A long stream")
HELDOUT_N = 64  # unused training examples kept per task for the calibrated fold's diagnostics (diag=1)
DEFAULT_CHAIN = "seqft,interp:alpha=0.3|0.5|0.7,recall:tau=0.05|0.5,recall-noprior,recall-norm"
DEFAULT_FROM_BASE = (
    "mean,interp:alpha=0.3|0.5|0.7,ta:lam=0.3|0.5|1.0,ties:lam=0.5|1.0,dare:lam=0.3|0.5,lines,"
    "recall:tau=0.05|0.1|0.5|1.0,recall-noprior,recall-norm,recall-multi,recall-base,recall-cka,recall-cos,"
    "recall-tv,recall:tv=1,tau=0.05,recall:tv=1,prior=0"
)
QUICK_CHAIN = "seqft,interp-0.5,recall"
QUICK_FROM_BASE = "mean,ta,ties,dare,lines,recall,recall:tau=0.05,recall-tv"
MODEL_DEFAULTS = {
    # lr, batch, eval batch, max length
    "minilm": {"lr": 1e-4, "batch_size": 16, "eval_batch_size": 64, "max_length": 128},
    "smollm2": {"lr": 3e-5, "batch_size": 8, "eval_batch_size": 16, "max_length": 128},
}
GENERIC_PROMPTS = [
    "The",
    "Here is a short text:",
    "Question:",
    "Once upon a time",
    "In the news today,",
    "Dear customer,",
    "I think that",
    "Definition:",
]

State = dict[str, torch.Tensor]


def stable_seed(*parts: Any) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


def fingerprint(*states: State | None) -> str:
    """blake2b of the tensors (names, shapes, bytes) of the given states: equal models share evaluation results."""
    h = hashlib.blake2b(digest_size=16)
    for s in states:
        if s is None:
            h.update(b"none")
            continue
        for name in sorted(s):
            t = s[name].detach().contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def clone_state(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AMX or AVX512-BF16): autocast then speeds up forward passes 2-3x."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return " amx_bf16" in flags or " avx512_bf16" in flags
    return False


def autocast(args: argparse.Namespace):
    """bf16 autocast for fine-tuning and evaluation forward passes (weights and merges stay fp32)."""
    if args.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------------ model families


@dataclass
class Prepared:
    """A task's tokenised data for one family."""

    name: str
    labels: list[str]
    train: list[tuple[list[int], Any]]  # (input ids, label) / (prompt ids, target ids)
    test: list[tuple[list[int], int]]
    probe_texts: list[str]  # texts for typical-sample selection (encoder: text; decoder: prompt)
    label_ids: list[list[int]] = field(default_factory=list)  # decoder: token ids of each label word
    heldout_texts: list[str] = field(default_factory=list)  # unused training examples (calibrated diag=1)


class FamilyBase:
    """A model family: one reusable ``nn.Module`` into which shared states (and heads) are loaded."""

    kind = ""
    has_heads = False

    def __init__(self, args: argparse.Namespace):
        from recall_hf.layers import LayerMap

        self.args = args
        self.core = self._load()
        self.core.eval()
        self.layer_map = LayerMap.from_model(self.core)
        self.shared_keys = self._shared_keys()
        self.base = self.shared_state()
        self.pad_id = self.tok.pad_token_id

    # --- states
    def _shared_keys(self) -> list[str]:
        seen, keys = set(), []
        for name, t in self.core.state_dict(keep_vars=True).items():
            if self._is_head(name) or t.data_ptr() in seen:  # drop heads and tied duplicates (lm_head = embeddings)
                continue
            seen.add(t.data_ptr())
            keys.append(name)
        return keys

    def _is_head(self, name: str) -> bool:
        return False

    def shared_state(self) -> State:
        sd = self.core.state_dict()
        return {
            k: sd[k].detach().clone().float() if sd[k].is_floating_point() else sd[k].clone() for k in self.shared_keys
        }

    def load(self, shared: State) -> None:
        missing, unexpected = self.core.load_state_dict(shared, strict=False)
        bad = [k for k in missing if not self._is_head(k) and k not in self._tied_names()] + list(unexpected)
        if bad:
            raise RuntimeError(f"state does not match the model: {bad[:5]}")

    def _tied_names(self) -> set[str]:
        return set(self.core.state_dict(keep_vars=True)) - set(self.shared_keys)

    def layer_of(self, name: str) -> int:
        return self.layer_map.layer_of(name)

    def backbone(self) -> torch.nn.Module:
        """The module that returns ``hidden_states`` (no LM / classification head: cheaper forward passes)."""
        return self.core.base_model

    def collate(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask

    def lora_targets(self) -> Any:
        raise NotImplementedError


class EncoderFamily(FamilyBase):
    """all-MiniLM-L6-v2 as ``AutoModelForSequenceClassification``; heads swapped in per task (``core.classifier``)."""

    kind = "encoder"
    has_heads = True

    def _load(self) -> torch.nn.Module:
        import transformers

        from benchmarks.assets import minilm_dir
        from recall_hf.models import quiet_transformers

        path = minilm_dir()
        self.model_path = str(path)
        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        with quiet_transformers():
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=2, dtype=torch.float32
            )
        self.dropout_p = model.config.hidden_dropout_prob
        return model

    def _is_head(self, name: str) -> bool:
        return name.startswith("classifier.")

    def new_head(self, task: Prepared, seed: int) -> State:
        """A fresh head, initialised like BERT's (normal(0, initializer_range), zero bias), seeded per task."""
        g = torch.Generator().manual_seed(stable_seed(seed, "head", task.name))
        hidden = self.core.config.hidden_size
        std = self.core.config.initializer_range
        return {
            "weight": torch.randn(len(task.labels), hidden, generator=g) * std,
            "bias": torch.zeros(len(task.labels)),
        }

    def head_module(self, head: State) -> torch.nn.Linear:
        lin = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
        with torch.no_grad():
            lin.weight.copy_(head["weight"])
            lin.bias.copy_(head["bias"])
        return lin

    def prepare(self, task: Any, train_n: int, test_n: int) -> Prepared:
        L = self.args.max_length

        def enc(items):
            texts = [t for t, _ in items]
            ids = self.tok(texts, truncation=True, max_length=L).input_ids
            return [(i, y) for i, (_, y) in zip(ids, items)]

        return Prepared(
            name=task.name,
            labels=task.labels,
            train=enc(task.train[:train_n]),
            test=enc(task.test[:test_n]),
            probe_texts=[t for t, _ in task.train[:train_n]],
            heldout_texts=[t for t, _ in task.train[train_n : train_n + HELDOUT_N]],
        )

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.core(input_ids=ids, attention_mask=mask).logits

    def batch_loss(self, batch: list[tuple[list[int], int]], task: Prepared) -> torch.Tensor:
        ids, mask = self.collate([b[0] for b in batch])
        y = torch.tensor([b[1] for b in batch])
        return torch.nn.functional.cross_entropy(self.logits(ids, mask), y)

    @torch.no_grad()
    def accuracy(self, task: Prepared, head: State | None) -> float:
        self.core.classifier = self.head_module(head)
        self.core.eval()
        order = sorted(range(len(task.test)), key=lambda i: len(task.test[i][0]))
        correct = 0
        bs = self.args.eval_batch_size
        for start in range(0, len(order), bs):
            batch = [task.test[i] for i in order[start : start + bs]]
            ids, mask = self.collate([b[0] for b in batch])
            pred = self.logits(ids, mask).argmax(-1)
            correct += int((pred == torch.tensor([b[1] for b in batch])).sum())
        return correct / len(task.test)

    def lora_targets(self) -> str:
        return (
            r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
            r"intermediate\.dense|output\.dense)"
        )

    @torch.no_grad()
    def linear_probe(self, task: Prepared, seed: int) -> float:
        """Zero-shot stand-in for an encoder (no head exists): logistic regression on the frozen base's pooled
        output (what the task heads read)."""
        from sklearn.linear_model import LogisticRegression

        def feats(items):
            out = []
            bs = self.args.eval_batch_size
            for s in range(0, len(items), bs):
                ids, mask = self.collate([x[0] for x in items[s : s + bs]])
                out.append(self.core.base_model(input_ids=ids, attention_mask=mask).pooler_output.float())
            return torch.cat(out).numpy()

        self.core.eval()
        clf = LogisticRegression(max_iter=2000, random_state=seed)
        clf.fit(feats(task.train), [y for _, y in task.train])
        pred = clf.predict(feats(task.test))
        return float(sum(int(p == y) for p, (_, y) in zip(pred, task.test)) / len(task.test))


class DecoderFamily(FamilyBase):
    """SmolLM2-135M-Instruct (Llama) for SFT on label words and rank classification."""

    kind = "decoder"

    def _load(self) -> torch.nn.Module:
        import transformers

        from benchmarks.assets import smollm2_dir
        from recall_hf.models import load_tokenizer, quiet_transformers

        path = smollm2_dir()
        self.model_path = str(path)
        self.tok = load_tokenizer(path)
        with quiet_transformers():
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def prepare(self, task: Any, train_n: int, test_n: int) -> Prepared:
        from benchmarks.assets import prompt_for, target_for

        L = self.args.max_length
        budget = max(8, L - len(self.tok(prompt_for(task, ""), add_special_tokens=False).input_ids) - 1)
        prompts_cache: dict[str, tuple[str, list[int]]] = {}

        def prompt(text: str) -> tuple[str, list[int]]:
            if text not in prompts_cache:
                ids = self.tok(text, add_special_tokens=False).input_ids
                if len(ids) > budget:
                    text = self.tok.decode(ids[:budget])
                p = prompt_for(task, text)
                prompts_cache[text] = (p, self.tok(p, add_special_tokens=False).input_ids[-L:])
            return prompts_cache[text]

        label_ids = [
            self.tok(target_for(task, i), add_special_tokens=False).input_ids for i in range(len(task.labels))
        ]
        train = [(prompt(t)[1], label_ids[y]) for t, y in task.train[:train_n]]
        test = [(prompt(t)[1], y) for t, y in task.test[:test_n]]
        probes = [prompt(t)[0] for t, _ in task.train[:train_n]]
        heldout = [prompt(t)[0] for t, _ in task.train[train_n : train_n + HELDOUT_N]]
        return Prepared(task.name, task.labels, train, test, probes, label_ids, heldout)

    def backbone(self) -> torch.nn.Module:
        return self.core.model

    def _answer_logits(self, seqs: list[list[int]], starts: list[int]) -> tuple[torch.Tensor, list[slice]]:
        """Logits predicting tokens ``seq[start:]`` for each sequence (the LM head only runs on those positions)."""
        ids, mask = self.collate(seqs)
        hidden = self.core.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows, cols, spans = [], [], []
        for i, (s, st) in enumerate(zip(seqs, starts)):
            n0 = len(rows)
            for p in range(st, len(s)):
                rows.append(i)
                cols.append(p - 1)
            spans.append(slice(n0, len(rows)))
        return self.core.lm_head(hidden[rows, cols]), spans

    def batch_loss(self, batch: list[tuple[list[int], list[int]]], task: Prepared) -> torch.Tensor:
        seqs = [p + t for p, t in batch]
        logits, _ = self._answer_logits(seqs, [len(p) for p, _ in batch])
        targets = torch.tensor([tok for _, t in batch for tok in t])
        return torch.nn.functional.cross_entropy(logits, targets)

    @torch.no_grad()
    def accuracy(self, task: Prepared, head: State | None = None) -> float:
        """``--lm-metric rank``: rank classification, the label word with the lowest mean token NLL after the prompt;
        ``greedy``: exact match of greedy generation (``greedy_accuracy``)."""
        if self.args.lm_metric == "greedy":
            return self.greedy_accuracy(task)
        self.core.eval()
        bs = self.args.eval_batch_size
        single = all(len(ids) == 1 for ids in task.label_ids)
        order = sorted(range(len(task.test)), key=lambda i: len(task.test[i][0]))
        correct = 0
        for start in range(0, len(order), bs if single else max(1, bs // len(task.labels))):
            batch = [task.test[i] for i in order[start : start + (bs if single else max(1, bs // len(task.labels)))]]
            if single:  # one forward per prompt; the first answer token decides
                ids, mask = self.collate([p for p, _ in batch])
                hidden = self.core.model(input_ids=ids, attention_mask=mask).last_hidden_state
                last = hidden[torch.arange(len(batch)), mask.sum(1) - 1]
                logp = torch.log_softmax(self.core.lm_head(last), -1)
                cand = torch.tensor([ids_[0] for ids_ in task.label_ids])
                pred = logp[:, cand].argmax(-1).tolist()
            else:
                seqs = [p + lab for p, _ in batch for lab in task.label_ids]
                starts = [len(p) for p, _ in batch for _ in task.label_ids]
                logits, spans = self._answer_logits(seqs, starts)
                targets = torch.tensor([t for p, _ in batch for lab in task.label_ids for t in lab])
                nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
                scores = torch.tensor([float(nll[sp].mean()) for sp in spans]).view(len(batch), -1)
                pred = scores.argmin(-1).tolist()
            correct += sum(int(p == y) for p, (_, y) in zip(pred, batch))
        return correct / len(task.test)

    @torch.no_grad()
    def greedy_accuracy(self, task: Prepared) -> float:
        """The share of test prompts whose greedy continuation starts with the right label word's tokens: every answer
        token is the argmax over the whole vocabulary given the ones before (teacher forcing the right label equals
        greedy decoding while they match). What a deployed model answers, where rank classification only compares
        the task's label words with each other."""
        self.core.eval()
        bs = self.args.eval_batch_size
        order = sorted(range(len(task.test)), key=lambda i: len(task.test[i][0]))
        correct = 0
        for start in range(0, len(order), bs):
            batch = [task.test[i] for i in order[start : start + bs]]
            answers = [task.label_ids[y] for _, y in batch]
            logits, spans = self._answer_logits([p + a for (p, _), a in zip(batch, answers)],
                                                [len(p) for p, _ in batch])
            top = logits.argmax(-1)
            correct += sum(int(top[sp].tolist() == a) for sp, a in zip(spans, answers))
        return correct / len(task.test)

    def lora_targets(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    @torch.no_grad()
    def self_probes(self, state: State, n: int, seed: int, max_new_tokens: int = 32) -> list[str]:
        """Texts the deployed model generates itself from short generic prompts (sampled, seeded): probes that
        stand for its knowledge without stored data."""
        self.load(state)
        self.core.eval()
        prompts = [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(n)]
        self.tok.padding_side = "left"
        try:
            enc = self.tok(prompts, return_tensors="pt", padding=True)
            torch.manual_seed(seed)
            out = self.core.generate(
                **enc,
                do_sample=True,
                top_p=0.9,
                temperature=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
            )
        finally:
            self.tok.padding_side = "right"
        texts = self.tok.batch_decode(out, skip_special_tokens=True)
        return [t.strip() for t in texts if t.strip()]


FAMILY_CLASSES = {"minilm": EncoderFamily, "smollm2": DecoderFamily}


# ------------------------------------------------------------------------------------------------------ fine-tuning


@dataclass
class TaskModel:
    """A model as the benchmark keeps it: shared weights plus one head per task (encoder only)."""

    shared: State
    heads: dict[str, State] = field(default_factory=dict)


def finetune(
    fam: FamilyBase,
    start: State,
    tasks: list[Prepared],
    seed: int,
    args: argparse.Namespace,
    desc: str,
    heads: dict[str, State] | None = None,
) -> TaskModel:
    """Fine-tune ``start`` on ``tasks`` (one task, or several for joint training with per-task batches).

    Seeded: data order and head init depend only on (seed, task names). With ``args.lora`` a LoRA is trained and
    folded into full weights. Returns the new shared weights and one head per task (encoder).
    """
    import peft

    fam.load(start)
    gen = torch.Generator().manual_seed(stable_seed(seed, "order", *[t.name for t in tasks]))
    torch.manual_seed(stable_seed(seed, "dropout", *[t.name for t in tasks]))
    head_mods: dict[str, torch.nn.Linear] = {}
    if fam.has_heads:
        for t in tasks:
            init = (heads or {}).get(t.name) or fam.new_head(t, seed)
            head_mods[t.name] = fam.head_module(init)
    model = fam.core
    if args.lora:
        cfg = peft.LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=fam.lora_targets()
        )
        model = peft.get_peft_model(fam.core, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = [p for n, p in fam.core.named_parameters() if not fam._is_head(n)]
        for p in params:
            p.requires_grad_(True)
    for h in head_mods.values():
        params += list(h.parameters())
    batches: list[tuple[Prepared, list]] = []
    for _ in range(args.epochs):
        epoch = []
        for t in tasks:
            perm = torch.randperm(len(t.train), generator=gen).tolist()
            epoch += [
                (t, [t.train[i] for i in perm[s : s + args.batch_size]]) for s in range(0, len(perm), args.batch_size)
            ]
        if len(tasks) > 1:
            order = torch.randperm(len(epoch), generator=gen).tolist()
            epoch = [epoch[i] for i in order]
        batches += epoch
    total = len(batches)
    warmup = max(1, int(args.warmup * total))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    fam.core.train()
    losses = []
    bar = tqdm(batches, desc=desc, unit="step", leave=False, disable=not args.progress)
    for task, batch in bar:
        if fam.has_heads:
            fam.core.classifier = head_mods[task.name]
        with autocast(args):
            loss = fam.batch_loss(batch, task)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    fam.core.eval()
    if args.lora:
        fam.core = model.merge_and_unload()
    for p in fam.core.parameters():
        p.requires_grad_(False)
    shared = fam.shared_state()
    out_heads = {name: {k: v.detach().clone() for k, v in h.state_dict().items()} for name, h in head_mods.items()}
    log.debug("%s: %d steps, loss %.3f -> %.3f", desc, total, losses[0], sum(losses[-5:]) / len(losses[-5:]))
    return TaskModel(shared, out_heads)


# ------------------------------------------------------------------------------------------------------ evaluation


class Evaluator:
    """Accuracy of a (shared state, head) on a task, cached by weight fingerprint (identical models share results)."""

    def __init__(self, fam: FamilyBase, tasks: dict[str, Prepared]):
        self.fam, self.tasks = fam, tasks
        self.cache: dict[tuple, float] = {}
        self.seconds = 0.0
        self.calls = self.hits = 0

    def row(self, model: TaskModel, names: list[str]) -> dict[str, float]:
        fp = fingerprint(model.shared)
        out, loaded = {}, False
        for name in names:
            head = model.heads.get(name) if self.fam.has_heads else None
            if self.fam.has_heads and head is None:
                continue  # an encoder cannot answer a task it has no head for
            key = (fp, fingerprint(head) if head is not None else "", name)
            self.calls += 1
            if key not in self.cache:
                if not loaded:
                    self.fam.load(model.shared)
                    loaded = True
                t = time.perf_counter()
                with autocast(self.fam.args):
                    self.cache[key] = self.fam.accuracy(self.tasks[name], head)
                self.seconds += time.perf_counter() - t
            else:
                self.hits += 1
            out[name] = self.cache[key]
        return out


# ---------------------------------------------------------------------------------------------- RECALL in memory


class RecallEngine:
    """RECALL weights for in-memory states with the library's functions; typical samples cached per task model."""

    def __init__(self, fam: FamilyBase, args: argparse.Namespace):
        self.fam, self.args = fam, args
        self.samples: dict[tuple, list[str]] = {}
        self.seconds = collections.Counter()

    def typical_samples(self, new: State, task: Prepared, k: int, seed: int) -> list[str]:
        from recall_hf import RecallConfig, select_typical_samples

        key = (fingerprint(new), task.name, k, seed)
        if key not in self.samples:
            t = time.perf_counter()
            self.fam.load(new)
            cfg = RecallConfig(
                k=k,
                seed=seed,
                batch_size=self.args.eval_batch_size,
                max_length=self.args.max_length,
                max_candidates=max(k, 2000),
            )
            picks = select_typical_samples(task.probe_texts, self.fam.backbone(), self.fam.tok, cfg, progress=False)
            self.samples[key] = [p["text"] for p in picks]
            self.seconds["typical_samples"] += time.perf_counter() - t
        return self.samples[key]

    def representations(self, state: State, probes: list[str]) -> torch.Tensor:
        from recall_hf import RecallConfig, represent

        t = time.perf_counter()
        self.fam.load(state)
        config = RecallConfig(batch_size=self.args.eval_batch_size, max_length=self.args.max_length)
        reps = represent(self.fam.backbone(), self.fam.tok, probes, config)
        self.seconds["representations"] += time.perf_counter() - t
        return reps

    def merge(
        self,
        opts: dict,
        step: int,
        base: State,
        deployed: State,
        new: State,
        task: Prepared,
        seed: int,
        tv_base: State | None,
        old_probes: list[list[str]] | None = None,
    ) -> tuple[State, dict]:
        probes = list(self.typical_samples(new, task, opts["k"], seed))
        n_typical = len(probes)
        own: list[str] = []
        if opts["self"]:
            if self.fam.kind != "decoder":
                raise ValueError("recall self-probes need a decoder (--model smollm2).")
            t = time.perf_counter()
            own = self.fam.self_probes(deployed, int(opts["self"]), stable_seed(seed, "self", step))
            self.seconds["self_probes"] += time.perf_counter() - t
        if opts["old"]:
            # The typical samples each earlier task's model picked: what its drop carried (SPEC 3), no raw data.
            own += [text for picked in old_probes or [] for text in picked]
        states = ([base] if opts["base"] else []) + [deployed, new]
        counts = ([0] if opts["base"] else []) + [step - 1, 1]
        two_sided = bool(opts["two_sided"]) and bool(own)
        if two_sided:
            # Task probes are judged against the new model, self-probes against the deployed one.
            reps = [self.representations(s, probes) for s in states]
            own_reps = [self.representations(s, own) for s in states]
            t = time.perf_counter()
            sims, weights = M.recall_two_sided_weights(reps, own_reps, opts, counts, deployed_index=len(states) - 2)
        else:
            probes += own
            reps = [self.representations(s, probes) for s in states]
            t = time.perf_counter()
            sims, weights = M.recall_layer_weights(reps, opts, counts)
        if opts["tv"]:
            if tv_base is None:
                raise ValueError("recall tv=1 (task-vector scaling) needs the from-base protocol.")
            if opts["lam"] > 0:
                coeffs = M.recall_ta_coefficients(weights, counts, opts["lam"])
            else:
                coeffs = M.recall_tv_coefficients(weights, counts if opts["prior"] else None)
            merged = M.layerwise_task_vectors(tv_base, states, coeffs, self.fam.layer_of)
        else:
            coeffs = weights
            merged = M.layerwise_fuse(states, weights.float(), self.fam.layer_of)
        self.seconds["fusion"] += time.perf_counter() - t
        record = {
            "step": step,
            "models": (["base"] if opts["base"] else []) + ["deployed", "new"],
            "task_counts": counts,
            "n_probes": len(probes),
            "n_typical": n_typical,
            "self_probes": own,
            "similarities": sims.tolist(),
            "weights": weights.tolist(),
            "coefficients": coeffs.tolist(),
        }
        return merged, record


class CalibratedEngine:
    """The calibrated fold (`recall_hf.calibrate`) on in-memory states: one fingerprint per task model (with its
    own head for the encoder), candidates scored in the family's model moved in place."""

    def __init__(self, fam: FamilyBase, args: argparse.Namespace, recall: RecallEngine):
        self.fam, self.args, self.recall = fam, args, recall
        self.seconds = collections.Counter()

    def _use_head(self, head: State | None) -> None:
        if self.fam.has_heads:
            self.fam.core.classifier = self.fam.head_module(head)

    def _fingerprint_on(self, new: State, head: State | None, texts: list[str], task: str, steps: int):
        """The task model's (``new`` with its ``head``) fingerprint on ``texts`` (LMs: ``steps`` positions each)."""
        from recall_hf.fingerprint import FingerprintConfig, compute_fingerprint

        self.fam.load(new)
        self._use_head(head)
        cfg = FingerprintConfig(steps=steps, max_length=self.args.max_length, batch_size=self.args.eval_batch_size)
        return compute_fingerprint(self.fam.core, self.fam.tok, texts, task, cfg)

    def fingerprint(self, new: State, head: State | None, task: Prepared, opts: dict, seed: int):
        samples = self.recall.typical_samples(new, task, opts["k"], seed)
        t = time.perf_counter()
        fp = self._fingerprint_on(new, head, samples, task.name, int(opts["steps"]))
        self.seconds["fingerprints"] += time.perf_counter() - t
        return fp

    def heldout_fingerprint(self, new: State, head: State | None, task: Prepared, opts: dict):
        """The task model's fingerprint on ``k`` training examples it never saw (diag=1): typical samples come from
        the training data, on which the task model is surer than on test."""
        k = opts["k"]
        if len(task.heldout_texts) < k:
            raise ValueError(f"calibrated diag=1 needs {k} unused training examples of {task.name}; lower --train-n.")
        return self._fingerprint_on(new, head, task.heldout_texts[:k], task.name, int(opts["steps"]))

    @torch.no_grad()
    def agreement(self, fp, head: State | None) -> float:
        """The share of a fingerprint's samples on which the loaded model's top prediction (class, or first next
        token for LMs) is the task model's."""
        self._use_head(head)
        self.fam.core.eval()
        rows = fp.rows(list(range(fp.num_samples)))
        ids, mask = self.fam.collate(rows)
        if fp.kind == "classifier":
            top, want = self.fam.logits(ids, mask).argmax(-1), fp.logits.argmax(-1)
        else:
            logits = self.fam.core(input_ids=ids, attention_mask=mask).logits
            top = logits[torch.arange(len(rows)), fp.prompt_lengths - 1].argmax(-1)
            want = fp.topk_ids[:, 0, 0]
        return float((top == want).double().mean())

    def diagnose(self, search, new: State, fps: dict, heldout: dict, heads: dict, ev: Evaluator) -> dict:
        """Every candidate's test accuracy, held-out divergence and top-1 agreement per task (diag=1): what the
        objective could have been, measured against what it should predict."""
        out = {}
        for c in search.candidates:
            here = None
            if c.coefficients is None:  # the new model as it is (from-base): the search's model comes back after
                here = self.fam.shared_state()
                self.fam.load(new)
            else:
                search.move_to(torch.tensor(c.coefficients, dtype=torch.float64))
            state = self.fam.shared_state()
            out[c.name] = {
                "acc": ev.row(TaskModel(state, heads), list(fps)),
                "heldout": {t: v.divergence for t, v in self.scores(self.fam.core, heldout, heads).items()},
                "agree": {t: self.agreement(fp, heads.get(t)) for t, fp in fps.items()},
                "agree_heldout": {t: self.agreement(fp, heads.get(t)) for t, fp in heldout.items()},
            }
            if here is not None:
                self.fam.load(here)
        return out

    def scores(self, model: torch.nn.Module, fps: dict, heads: dict) -> dict:
        from recall_hf.fingerprint import fingerprint_divergence

        out = {}
        for name, fp in fps.items():
            self._use_head(heads.get(name))
            out[name] = fingerprint_divergence(model, fp, self.args.eval_batch_size)
        return out

    def fold(self, coefficients: list[float], deployed: State, new: State, parent: State, from_base: bool) -> State:
        """The chosen fold computed afresh from the three states with the library's fusion weights (in float64, cast
        back), not the search's working model: its in-place moves leave float rounding that depends on the order the
        candidates were visited, which later fine-tunes amplify."""
        from recall_hf.calibrate import merge_weights

        w = merge_weights(torch.tensor(coefficients, dtype=torch.float64), len(coefficients), from_base).tolist()
        out = {}
        for k, d in deployed.items():
            if not d.is_floating_point() or k not in new:
                out[k] = d
                continue
            inputs = (parent[k], d, new[k]) if from_base else (d, new[k])
            out[k] = sum(c * t.double() for c, t in zip(w[self.fam.layer_of(k)], inputs)).to(d.dtype)
        return out

    def merge(self, opts: dict, deployed: State, new: State, parent: State, from_base: bool, fps: dict,
              heads: dict, new_task: str, diag: tuple | None = None) -> tuple[State, dict]:
        from dataclasses import asdict

        from recall_hf import calibrate as C

        t = time.perf_counter()
        n = self.fam.layer_map.num_layers + 1
        grid = {"alphas": tuple(i / 8 for i in range(1, 8)), "refine": False} if opts["grid"] else {}
        cfg = C.CalibrationConfig(scales=(), new_task_weight=opts["new"] or None, normalize=bool(opts["norm"]),
                                  rule=opts["rule"], **grid)
        weights = C.build_objective(fps, new_task, cfg, None, self.fam.core)
        scorer = lambda m, f: self.scores(m, f, heads)  # noqa: E731
        new_cand = None
        if from_base:  # the new model as it is lies outside D + a (N - base): score it on its own
            self.fam.load(new)
            s = scorer(self.fam.core, fps)
            new_cand = C.Candidate("new", "new", None, None, {k: asdict(v) for k, v in s.items()},
                                   weights.value(s))
        self.fam.load(deployed)
        params = dict(self.fam.core.named_parameters())
        delta = {k: (new[k] - parent[k]).to(params[k].device) for k in params if k in new}
        search = C.FoldSearch(self.fam.core, delta, {k: self.fam.layer_of(k) for k in delta}, n, fps, weights,
                              scorer=scorer)
        if new_cand is not None:
            search.register(new_cand, None)
        chosen = C.search_fold(search, None, cfg, n)
        diagnosis = self.diagnose(search, new, fps, diag[0], heads, diag[1]) if diag else None
        merged = new if chosen.coefficients is None else self.fold(chosen.coefficients, deployed, new, parent,
                                                                   from_base)
        self.seconds["search"] += time.perf_counter() - t
        record = {"chosen": chosen.name, "objective": chosen.objective,
                  "candidates": {c.name: c.objective for c in search.candidates}, "scales": weights.scales,
                  "divergence": {c.name: {t: v["divergence"] for t, v in c.scores.items()} for c in search.candidates}}
        if diagnosis is not None:
            record["diag"] = diagnosis
            record["diag_scales"] = C.build_objective(diag[0], new_task, cfg, None, self.fam.core).scales
        return merged, record


# ------------------------------------------------------------------------------------------------------ protocols


def fold(
    spec: M.MethodSpec, step: int, ctx: dict, deployed: State | None, new: State, task: Prepared
) -> tuple[State, dict | None]:
    """One step of a method: the new deployed shared state (and a RECALL record)."""
    o, fam, base = spec.options, ctx["fam"], ctx["base"]
    vectors = ctx.get("vectors")
    if spec.family in ("ta", "ties", "dare", "lines"):
        if spec.family == "ta":
            return M.task_arithmetic(base, vectors, o["lam"]), None
        if spec.family == "ties":
            return M.ties_merge(base, vectors, o["lam"], o["density"]), None
        if spec.family == "dare":
            return M.dare_merge(base, vectors, o["lam"], o["drop"], stable_seed(ctx["seed"], "dare", step)), None
        return M.lines_merge(
            base, vectors, fam.layer_of, fam.layer_map.num_layers, M.lines_alpha(o["alpha"], step), o["beta"]
        ), None
    if step == 1 and spec.family == "recall" and o["tv"] and o["lam"] > 0 and ctx["protocol"] == "from-base":
        return M.task_arithmetic(base, vectors, o["lam"]), None  # task arithmetic's first step
    if step == 1 or spec.family == "seqft":
        return new, None
    if spec.family == "interp":
        return M.interpolate(deployed, new, o["alpha"]), None
    if spec.family == "mean":
        return M.running_mean(deployed, new, step), None
    if spec.family == "calibrated":
        from_base = ctx["protocol"] == "from-base"
        diag = (ctx["heldout"], ctx["evaluator"]) if o["diag"] else None
        return ctx["calibrated"].merge(o, deployed, new, base if from_base else deployed, from_base,
                                       ctx["fingerprints"], ctx["heads"], task.name, diag)
    if spec.family == "recall":
        tv_base = base if ctx["protocol"] == "from-base" else None
        return ctx["recall"].merge(o, step, base, deployed, new, task, ctx["seed"], tv_base, ctx.get("old_probes"))
    raise ValueError(f"no fold rule for {spec.family}")


def summarize(acc: list[list[float | None]]) -> dict[str, float | None]:
    """ACC, BWT and plasticity from the accuracy matrix ``acc[step][task]`` (tasks in training order)."""
    T = len(acc)
    final = acc[-1]
    ACC = sum(final) / T
    bwt = [final[i] - acc[i][i] for i in range(T - 1)]
    return {
        "ACC": ACC,
        "BWT": sum(bwt) / len(bwt) if bwt else None,
        "plasticity": sum(acc[i][i] for i in range(T)) / T,
    }


def run_method(
    spec: M.MethodSpec,
    protocol: str,
    ctx: dict,
    order: list[str],
    task_models: dict[str, TaskModel],
) -> dict:
    """Run one method through the task sequence; returns its accuracy matrix, metrics, RECALL records, timing."""
    fam, ev, args = ctx["fam"], ctx["evaluator"], ctx["args"]
    t0 = time.perf_counter()
    deployed: State | None = None
    heads: dict[str, State] = {}
    acc: list[list[float | None]] = []
    records = []
    old_probes: list[list[str]] = []  # recall old=1: typical samples of the tasks folded in so far
    fps: dict = {}  # calibrated: fingerprints of the tasks folded in so far
    heldout: dict = {}  # calibrated diag=1: the same on unused training examples
    eval_names_all = list(order)
    for step, name in enumerate(order, 1):
        task = ctx["tasks"][name]
        if protocol == "from-base" or step == 1:
            new = task_models[name]
        else:
            new = ctx["chain_finetune"](deployed, heads, name)
        heads[name] = new.heads.get(name)
        if spec.family == "calibrated":  # what the task's drop carries: its model's fingerprint
            fps[name] = ctx["calibrated"].fingerprint(new.shared, heads[name], task, spec.options, ctx["seed"])
            if spec.options["diag"]:
                heldout[name] = ctx["calibrated"].heldout_fingerprint(new.shared, heads[name], task, spec.options)
        if protocol == "from-base":
            ctx["vectors"] = [M.task_vector(task_models[n].shared, fam.base) for n in order[:step]]
        step_ctx = {**ctx, "protocol": protocol, "old_probes": old_probes, "fingerprints": fps, "heads": heads,
                    "heldout": heldout}
        merged, rec = fold(spec, step, step_ctx, deployed, new.shared, task)
        ctx.pop("vectors", None)
        if spec.family == "recall" and spec.options["old"]:
            old_probes.append(ctx["recall"].typical_samples(new.shared, task, spec.options["k"], ctx["seed"]))
        deployed = merged
        if rec is not None:
            records.append(rec)
        names = eval_names_all if (args.eval_all and not fam.has_heads) else order[:step]
        row = ev.row(TaskModel(deployed, heads), names)
        acc.append([row.get(n) for n in order])
        log.info(
            "%-9s %-34s step %d (%s): %s",
            protocol,
            spec.label,
            step,
            name,
            " ".join(f"{row[n]:.3f}" for n in order if n in row),
        )
    return {
        "method": spec.label,
        "family": spec.family,
        "options": spec.options,
        "protocol": protocol,
        "acc": acc,
        "metrics": summarize(acc),
        "recall": records,
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------------ orchestration


def machine_info() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers

    return {
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
    }


def parse_methods(text: str, protocol: str) -> list[M.MethodSpec]:
    specs = [M.parse_method(s) for s in M.expand_sweeps(_split_top(text))] if text else []
    bad = [s.label for s in specs if not s.supports(protocol)]
    if bad:
        raise ValueError(f"Methods {bad} do not support the {protocol} protocol.")
    seen, out = set(), []
    for s in specs:
        key = M.method_label(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _split_top(text: str) -> list[str]:
    """Split a method list on commas that start a new method (``family:...`` option commas stay)."""
    items: list[str] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if items and "=" in part and ":" not in part and not M.PRESETS.get(part):
            items[-1] += "," + part  # an option of the previous method
        else:
            items.append(part)
    return items


def estimate_seconds(
    fam: FamilyBase, tasks: dict[str, Prepared], args, n_chain: int, n_from_base: int, calibrated_k: tuple = ()
) -> dict:
    """Time a training step and an evaluation batch per task, then count steps and evaluations.

    ``calibrated_k``: the typical-sample count ``k`` of each calibrated method run (one entry per protocol run);
    its search replays every folded task's ``k`` samples for each of about ``CALIBRATED_CANDIDATES`` candidates.
    """
    fam.core.train()
    step_s, eval_s = {}, {}
    for name, t in tasks.items():
        batch = t.train[: args.batch_size]
        if fam.has_heads:
            fam.core.classifier = fam.head_module(fam.new_head(t, 0))
        tt = time.perf_counter()
        with autocast(args):
            loss = fam.batch_loss(batch, t)
        loss.backward()
        step_s[name] = (time.perf_counter() - tt) * 1.6  # + optimizer step, clipping, collation
        fam.core.zero_grad(set_to_none=True)
        probe = Prepared(t.name, t.labels, [], t.test[: args.eval_batch_size], [], t.label_ids)
        tt = time.perf_counter()
        with autocast(args):
            fam.accuracy(probe, fam.new_head(t, 0) if fam.has_heads else None)
        eval_s[name] = time.perf_counter() - tt
    fam.core.eval()
    fam.load(fam.base)
    for p in fam.core.parameters():
        p.requires_grad_(False)
    tt = time.perf_counter()
    fingerprint(M.interpolate(fam.base, fam.base, 0.5))
    state_op = time.perf_counter() - tt  # one merge + one fingerprint of a whole state
    T = len(tasks)
    ft_one = sum(math.ceil(len(t.train) / args.batch_size) * args.epochs * step_s[n] for n, t in tasks.items())
    ev_task = {n: math.ceil(len(t.test) / args.eval_batch_size) * eval_s[n] for n, t in tasks.items()}
    names = list(tasks)
    ev_method = sum(ev_task[names[i]] * (T - i) for i in range(T))  # task i is evaluated at steps i..T
    chain_ft = 0.0
    if n_chain:
        chain_ft = sum(math.ceil(len(tasks[n].train) / args.batch_size) * args.epochs * step_s[n] for n in names[1:2])
        chain_ft += n_chain * sum(
            math.ceil(len(tasks[n].train) / args.batch_size) * args.epochs * step_s[n] for n in names[2:]
        )
    per_seed = {
        "task_models": ft_one,
        "joint": ft_one if args.joint else 0.0,
        "chain_finetune": chain_ft,
        "evaluation": ev_method * (n_chain + n_from_base) * 0.8,  # cache hits at step 1
        "merging": (n_chain + n_from_base) * T * 3 * state_op,  # merges, fingerprints, RECALL forward passes
        "calibration": calibration_seconds(calibrated_k, T, statistics.fmean(eval_s.values()), args),
    }
    per_seed["total"] = sum(per_seed.values()) * 1.1
    return {
        "per_seed": per_seed,
        "seeds": len(args.seeds),
        "total": per_seed["total"] * len(args.seeds),
        "step_seconds": step_s,
        "eval_batch_seconds": eval_s,
    }


CALIBRATED_CANDIDATES = 4  # keep, 0.5, new, and the quadratic model's proposals (recall_hf.calibrate: 0-2, ~1)


def calibration_seconds(calibrated_k: tuple, n_tasks: int, eval_batch_s: float, args) -> float:
    """The calibrated searches' replays: at step t every candidate replays the k typical samples of t tasks; plus
    each step's typical-sample selection over the training texts and the new task's fingerprint."""
    batches = 0.0
    for k in calibrated_k:
        replays = sum(CALIBRATED_CANDIDATES * t * k for t in range(2, n_tasks + 1))
        batches += (replays + n_tasks * (args.train_n + k)) / args.eval_batch_size
    return batches * eval_batch_s


def log_estimate(fam: FamilyBase, tasks: dict, args, chain: list, from_base: list, results: dict) -> None:
    """The run's time estimate: logged, printed and kept in the results."""
    calibrated_k = tuple(s.options["k"] for s in chain + from_base if s.family == "calibrated")
    est = estimate_seconds(fam, tasks, args, len(chain), len(from_base), calibrated_k)
    results["estimate"] = est
    per_seed = est["per_seed"]
    log.info(
        "time estimate: %.1f min (%.1f min per seed: task models %.0fs, joint %.0fs, chain fine-tuning "
        "%.0fs, evaluation %.0fs, merging %.0fs, calibrated search %.0fs)",
        est["total"] / 60, per_seed["total"] / 60, per_seed["task_models"], per_seed["joint"],
        per_seed["chain_finetune"], per_seed["evaluation"], per_seed["merging"], per_seed["calibration"],
    )
    print(f"Estimated time: {est['total'] / 60:.1f} min on {torch.get_num_threads()} threads", flush=True)


def reference_run(seed: int, label: str, scores: dict, order: list[str]) -> dict:
    """A row without a protocol (task models, zero-shot, joint training): final accuracies and their mean."""
    log.info("%s: %s", label, scores)
    return {"seed": seed, "method": label, "protocol": "-", "final": [scores[n] for n in order],
            "metrics": {"ACC": sum(scores.values()) / len(order), "BWT": None, "plasticity": None}}


def reference_runs(fam: FamilyBase, args, seed: int, tasks: dict, evaluator, own: dict, timings) -> list:
    """The individual task models' row (`own`: each one's accuracy on its task), then the zero-shot / linear-probe
    and joint-training rows when asked."""
    order = list(tasks)
    runs = [reference_run(seed, "task models (individual)", own, order)]
    if args.zeroshot:
        t = time.perf_counter()
        if fam.has_heads:
            with autocast(args):
                runs.append(reference_run(seed, "base + linear probe",
                                          {n: fam.linear_probe(tasks[n], seed) for n in order}, order))
        else:
            runs.append(reference_run(seed, "zero-shot base", evaluator.row(TaskModel(fam.base), order), order))
        timings["zeroshot"] = time.perf_counter() - t
    if args.joint:
        t = time.perf_counter()
        joint = finetune(fam, fam.base, [tasks[n] for n in order], seed, args, f"seed {seed} joint multi-task")
        runs.append(reference_run(seed, "multi-task joint", evaluator.row(joint, order), order))
        timings["joint"] = time.perf_counter() - t
    return runs


FINETUNE_CACHE_BYTES = 3 * 1024**3  # chain fine-tunes kept for later methods (SmolLM2: 5 of them; MiniLM: all)


def model_bytes(tm: TaskModel) -> int:
    return sum(t.numel() * t.element_size() for s in (tm.shared, *tm.heads.values()) if s for t in s.values())


def chain_finetuner(fam: FamilyBase, args, seed: int, tasks: dict, timings):
    """`(deployed, heads, name) -> TaskModel`: fine-tune task `name` from a deployed model, cached by its weights
    (methods that deploy the same model share the fine-tune); the time spent goes to `timings["chain_finetune"]`.
    The cache holds at most one fine-tune per task plus one and `FINETUNE_CACHE_BYTES` in all (least recently used
    out first): on the SmolLM2 long stream a count bound alone kept 12 models, 6.5 GB, and two runs side by side
    ran out of memory."""
    cache: collections.OrderedDict[tuple, TaskModel] = collections.OrderedDict()
    timings["chain_finetune"] = 0.0

    def chain_finetune(deployed: State, heads: dict, name: str) -> TaskModel:
        key = (fingerprint(deployed), name)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        t = time.perf_counter()
        tm = cache[key] = finetune(fam, deployed, [tasks[name]], seed, args, f"seed {seed} chain fine-tune {name}")
        timings["chain_finetune"] += time.perf_counter() - t
        while len(cache) > 1 and (len(cache) > len(tasks) + 1
                                  or sum(model_bytes(m) for m in cache.values()) > FINETUNE_CACHE_BYTES):
            cache.popitem(last=False)
        return tm

    return chain_finetune


def train_task_models(fam: FamilyBase, args, seed: int, tasks: dict, evaluator, keep: list[str]):
    """Each task's model fine-tuned from the base and its accuracy on its task. Only the models named in `keep` are
    returned: chain methods start from the first task's model alone, and the 11 SmolLM2 models of the long stream
    held at once took 6 GB."""
    task_models, own = {}, {}
    for n in tasks:
        tm = finetune(fam, fam.base, [tasks[n]], seed, args, f"seed {seed} fine-tune {n} from base")
        own[n] = evaluator.row(tm, [n])[n]
        if n in keep:
            task_models[n] = tm
    return task_models, own


def run_seed(fam: FamilyBase, args, seed: int, chain: list, from_base: list, results: dict) -> None:
    from benchmarks.assets import load_task

    torch.manual_seed(seed)
    random.seed(seed)
    order = list(args.tasks)
    tasks = {n: fam.prepare(load_task(n, seed), args.train_n, args.test_n) for n in order}
    for n, t in tasks.items():
        log.info("seed %d task %s: %d train, %d test, %d labels", seed, n, len(t.train), len(t.test), len(t.labels))
    if seed == args.seeds[0]:
        log_estimate(fam, tasks, args, chain, from_base, results)
        if args.dry_run:
            return
    evaluator = Evaluator(fam, tasks)
    engine = RecallEngine(fam, args)
    timings = collections.Counter()
    runs = results["runs"]

    t, evaluated = time.perf_counter(), evaluator.seconds
    task_models, own = train_task_models(fam, args, seed, tasks, evaluator, keep=order if from_base else order[:1])
    timings["task_models"] = time.perf_counter() - t - (evaluator.seconds - evaluated)  # evaluation counted apart
    runs += reference_runs(fam, args, seed, tasks, evaluator, own, timings)

    ctx = {"fam": fam, "evaluator": evaluator, "args": args, "tasks": tasks, "base": fam.base, "seed": seed,
           "recall": engine, "calibrated": CalibratedEngine(fam, args, engine)}
    for spec in tqdm(from_base, desc=f"seed {seed} from-base methods", disable=not args.progress):
        runs.append({"seed": seed, **run_method(spec, "from-base", ctx, order, task_models)})
    ctx["chain_finetune"] = chain_finetuner(fam, args, seed, tasks, timings)
    for spec in tqdm(chain, desc=f"seed {seed} chain methods", disable=not args.progress):
        runs.append({"seed": seed, **run_method(spec, "chain", ctx, order, task_models)})
    timings["evaluation"] = evaluator.seconds
    timings.update({f"recall_{k}": v for k, v in engine.seconds.items()})
    timings.update({f"calibrated_{k}": v for k, v in ctx["calibrated"].seconds.items()})
    results["timings"][str(seed)] = dict(timings)
    results["eval_cache"][str(seed)] = {"calls": evaluator.calls, "hits": evaluator.hits}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.continual",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Methods (use a preset, or family:key=value,...; key=a|b|c sweeps values):\n"
        + M.describe_methods()
        + "\n\nExamples:\n  python -m benchmarks.continual --quick\n"
        "  python -m benchmarks.continual --model minilm --train-n 256 --test-n 200 --protocols from-base,chain\n"
        "  python -m benchmarks.continual --model smollm2 --lora --chain-methods 'seqft,recall:tau=0.05|0.5'",
    )
    p.add_argument("--model", choices=sorted(FAMILY_CLASSES), default="minilm")
    p.add_argument(
        "--tasks",
        default=None,
        help=f"comma list, in training order (default {','.join(DEFAULT_TASKS)}); subtasks such as news-outlet/1 "
        "(a subset of a task's labels, see benchmarks/assets.py SUBTASKS); or 'long' for the long stream "
        "(11 subtasks, BENCHMARK.md)",
    )
    p.add_argument(
        "--order",
        choices=("fixed", "shuffled"),
        default="fixed",
        help="fixed: the --tasks order; shuffled: a seeded permutation of it (--order-seed), the same for every seed",
    )
    p.add_argument("--order-seed", type=int, default=0, help="seed of --order shuffled")
    p.add_argument("--train-n", type=int, default=None, help="training examples per task (default 256; quick 64)")
    p.add_argument("--test-n", type=int, default=None, help="test examples per task (default 200; quick 64)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default 2; quick 1)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (minilm 1e-4, smollm2 3e-5)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="token limit of inputs / prompts (default 128)")
    p.add_argument("--warmup", type=float, default=0.1, help="linear warmup fraction, then linear decay")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="forward passes of fine-tuning and evaluation: bf16 autocast (auto: when the CPU has AMX/AVX512-BF16); "
        "weights, merges and RECALL representations always fp32",
    )
    p.add_argument(
        "--lm-metric", choices=("rank", "greedy"), default="rank",
        help="decoder accuracy: rank classification among the label words (rank), or exact match of greedy "
        "generation over the whole vocabulary (greedy: what a deployed model answers)",
    )
    p.add_argument("--lora", action="store_true", help="train LoRA (r=--lora-r) and fold it into full weights")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--seeds", default="0", help="comma list of seeds (data split, order, head init)")
    p.add_argument("--protocols", default="from-base,chain", help="from-base and/or chain")
    p.add_argument("--chain-methods", default=None, help=f"default: {DEFAULT_CHAIN}")
    p.add_argument("--from-base-methods", default=None, help=f"default: {DEFAULT_FROM_BASE}")
    p.add_argument("--no-joint", dest="joint", action="store_false", help="skip multi-task joint training")
    p.add_argument("--no-zeroshot", dest="zeroshot", action="store_false", help="skip the zero-shot reference")
    p.add_argument("--eval-all", action="store_true", help="decoder: also evaluate tasks not learned yet")
    p.add_argument("--quick", action="store_true", help="smoke size: MiniLM, 3 tasks, 64/64 examples, 1 epoch")
    p.add_argument("--run-name", default=None, help="results go to benchmarks/results/<run-name>/")
    p.add_argument("--out-root", default=str(Path(__file__).parent / "results"))
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: cores minus the load average, >= 1)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the time estimate and stop")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--log-level", default="INFO")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    defaults = MODEL_DEFAULTS[args.model]
    try:
        args.tasks = task_order(args.tasks or ",".join(QUICK_TASKS if quick else DEFAULT_TASKS), args.order,
                                args.order_seed)
    except ValueError as err:
        raise SystemExit(f"--tasks: {err}") from None
    args.train_n = args.train_n or (64 if quick else 256)
    args.test_n = args.test_n or (64 if quick else 200)
    args.epochs = args.epochs or (1 if quick else 2)
    args.lr = args.lr or (2e-4 if quick and args.model == "minilm" else defaults["lr"])
    args.batch_size = args.batch_size or (8 if quick else defaults["batch_size"])
    args.eval_batch_size = args.eval_batch_size or defaults["eval_batch_size"]
    args.max_length = args.max_length or (64 if quick else defaults["max_length"])
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if args.precision == "auto":
        args.precision = "bf16" if cpu_has_bf16() else "fp32"
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    for pr in args.protocols:
        if pr not in ("from-base", "chain"):
            raise SystemExit(f"--protocols: unknown protocol {pr!r}; choose from-base, chain")
    if args.chain_methods is None:
        args.chain_methods = QUICK_CHAIN if quick else DEFAULT_CHAIN
    if args.from_base_methods is None:
        args.from_base_methods = QUICK_FROM_BASE if quick else DEFAULT_FROM_BASE
    if args.model != "smollm2":
        drop = [m for m in _split_top(args.chain_methods + "," + args.from_base_methods) if "self" in m]
        if drop:
            log.warning("self-probes need a decoder; dropping %s for --model %s", drop, args.model)
        args.chain_methods = ",".join(m for m in _split_top(args.chain_methods) if "self" not in m)
        args.from_base_methods = ",".join(m for m in _split_top(args.from_base_methods) if "self" not in m)
    if args.run_name is None:
        args.run_name = f"{args.model}-quick" if quick else f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def task_order(spec: str, order: str = "fixed", order_seed: int = 0) -> list[str]:
    """The task sequence of ``--tasks``: a comma list of task/subtask names or a preset (``long``), then for
    ``order == "shuffled"`` a permutation seeded by ``order_seed`` alone (string-seeded, the same on every machine).

    Raises:
        ValueError: an unknown name, a repeated task, or fewer than two tasks.
    """
    from benchmarks.assets import all_task_names

    names: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        names += list(TASK_PRESETS.get(item, (item,)))
    valid = all_task_names()
    bad = [t for t in names if t not in valid]
    if bad or len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(
            f"need >= 2 distinct tasks from {', '.join(valid)} or a preset ({', '.join(TASK_PRESETS)}); got {names}"
        )
    if order == "shuffled":
        random.Random(f"order:{order_seed}").shuffle(names)
    elif order != "fixed":
        raise ValueError(f"order must be fixed or shuffled, got {order!r}")
    return names


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = resolve_args(args)
    if not args.threads:  # on a shared machine fewer threads than cores run faster (no oversubscription)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        args.threads = max(1, min(os.cpu_count() or 1, (os.cpu_count() or 1) - int(load + 0.5)))
    torch.set_num_threads(args.threads)
    try:
        chain = parse_methods(args.chain_methods, "chain") if "chain" in args.protocols else []
        from_base = parse_methods(args.from_base_methods, "from-base") if "from-base" in args.protocols else []
    except ValueError as err:
        raise SystemExit(str(err)) from None
    out_dir = Path(args.out_root) / args.run_name
    log_to_run_folder(out_dir, args.dry_run)

    t0 = time.perf_counter()
    config = {k: v for k, v in vars(args).items() if k not in ("out_root",)}
    results: dict[str, Any] = {
        "config": config,
        "machine": machine_info(),
        "methods": {"chain": [s.label for s in chain], "from-base": [s.label for s in from_base]},
        "runs": [],
        "timings": {},
        "eval_cache": {},
    }
    log.info("model %s, tasks %s, %d train / %d test, %d epochs, lr %g, batch %d, max length %d, lora %s, seeds %s, "
             "%s forward passes, %d threads", args.model, args.tasks, args.train_n, args.test_n, args.epochs, args.lr,
             args.batch_size, args.max_length, args.lora, args.seeds, args.precision, args.threads)
    log.info("chain methods (%d): %s", len(chain), ", ".join(s.label for s in chain))
    log.info("from-base methods (%d): %s", len(from_base), ", ".join(s.label for s in from_base))
    t = time.perf_counter()
    fam = FAMILY_CLASSES[args.model](args)
    results["model"] = {
        "name": args.model,
        "path": fam.model_path,
        "layers": fam.layer_map.num_layers,
        "shared_params": sum(v.numel() for v in fam.base.values()),
        "load_seconds": time.perf_counter() - t,
    }
    for seed in args.seeds:
        run_seed(fam, args, seed, chain, from_base, results)
        if args.dry_run:
            return results
    results["total_seconds"] = time.perf_counter() - t0
    write_results(results, out_dir, args.plots)
    return results


def log_to_run_folder(out_dir: Path, dry_run: bool) -> None:
    """Log to `out_dir/run.log` too (not on a dry run, which only estimates the time and leaves nothing behind)."""
    if not dry_run:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out_dir / "run.log", mode="w")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(fh)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_results(results: dict, out_dir: Path, plots: bool) -> None:
    """`results.json`, `results.md` (also printed) and, when asked, the plots."""
    from benchmarks import report

    results["summary"] = report.summary_rows(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md = report.markdown(results)
    (out_dir / "results.md").write_text(md)
    if plots:
        report.plots(results, out_dir)
    print(md)
    print(f"Done in {results['total_seconds'] / 60:.1f} min; results in {out_dir}")


if __name__ == "__main__":
    main()
