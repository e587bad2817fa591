"""Task fingerprints (SPEC 2.7): what a task's own fine-tuned model did on its typical samples, kept to score merges.

A fingerprint holds, per typical sample, the token ids needed to replay it and the model's outputs there:

* causal LMs (`kind="lm"`): the prompt plus `steps - 1` greedy tokens, and at each of the `steps` positions that
  predict the next token (the prompt's end, then after each greedy token) the top-`top_k` token ids and their
  log-probabilities;
* sequence classifiers (`kind="classifier"`): the head's logits;
* backbones without a head (`kind="representation"`): only the pooled representation below;
* every kind: the pooled (mean over the prompt's tokens) last-layer representation.

A candidate model is scored by replaying the stored ids through it (one teacher-forced forward pass per batch, no
generation) and measuring how far its outputs moved from the stored ones (`fingerprint_divergence`).

Choice for LMs: the stored top-k are compared as a (k+1)-bucket distribution, the k stored tokens plus one tail
bucket holding the remaining probability mass (`1 - sum`), on both sides. That is an exact KL divergence of a
coarsened distribution: non-negative, zero when the model is unchanged, never above the full-vocabulary KL (data
processing inequality), and it needs no renormalisation that would hide mass moving to unlisted tokens.

Files are small (32 samples, k=32, 4 steps: tens of kilobytes plus the representations) and are untrusted input:
`load_fingerprint` checks every tensor's name, dtype, shape, range and finiteness and refuses a bad file in one line.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import first_line
from .modeldir import FINGERPRINT_NAME, FINGERPRINTS_DIR  # noqa: F401 - file names, re-exported here

logger = logging.getLogger(__name__)

FORMAT = "recall-fingerprint"
FORMAT_VERSION = "1"
KINDS = ("lm", "classifier", "representation")
MAX_FILE_BYTES = 64 * 1024 * 1024

TENSORS = {
    "lm": ("input_ids", "lengths", "prompt_lengths", "pooled", "topk_ids", "topk_logprobs"),
    "classifier": ("input_ids", "lengths", "prompt_lengths", "pooled", "logits"),
    "representation": ("input_ids", "lengths", "prompt_lengths", "pooled"),
}
INT_TENSORS = ("input_ids", "lengths", "prompt_lengths", "topk_ids")


@dataclass
class FingerprintConfig:
    """How much of a task model's behaviour a fingerprint keeps.

    Args:
        top_k (`int`, *optional*, defaults to `32`):
            LMs: next-token log-probabilities kept per position (the rest is one tail bucket).
        steps (`int`, *optional*, defaults to `4`):
            LMs: positions per sample: the prompt's end and after each of the first `steps - 1` greedy tokens.
        max_length (`int`, *optional*, defaults to `256`):
            Token limit per sample, greedy tokens included (the prompt is cut from the right to fit).
        batch_size (`int`, *optional*, defaults to `8`):
            Batch size of the forward passes.
    """

    top_k: int = field(default=32, metadata={"help": "LMs: next-token log-probs kept per position."})
    steps: int = field(default=4, metadata={"help": "LMs: positions per sample (prompt end + greedy tokens)."})
    max_length: int = field(default=256, metadata={"help": "Token limit per sample, greedy tokens included."})
    batch_size: int = field(default=8, metadata={"help": "Batch size of the forward passes."})

    def __post_init__(self) -> None:
        for name in ("top_k", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FingerprintConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_length < self.steps:
            raise ValueError(f"FingerprintConfig.max_length ({self.max_length}) must be >= steps ({self.steps}).")


@dataclass
class Fingerprint:
    """One task's fingerprint. Ids are right-padded `[n, T]` rows; row i replays `input_ids[i, :lengths[i]]`."""

    kind: str
    task: str
    input_ids: torch.Tensor  # [n, T] int64
    lengths: torch.Tensor  # [n] int64, tokens to replay (prompt + steps-1 greedy tokens for LMs)
    prompt_lengths: torch.Tensor  # [n] int64, tokens of the prompt (pooled over)
    pooled: torch.Tensor  # [n, H] float32
    pad_id: int = 0
    topk_ids: torch.Tensor | None = None  # lm: [n, steps, k] int64
    topk_logprobs: torch.Tensor | None = None  # lm: [n, steps, k] float32
    logits: torch.Tensor | None = None  # classifier: [n, C] float32

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def steps(self) -> int:
        return int(self.topk_ids.shape[1]) if self.topk_ids is not None else 1

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSORS[self.kind]}

    def subset(self, count: int) -> Fingerprint:
        """The fingerprint of `count` samples spread evenly over this one's (all of them when it has no more)."""
        if count >= self.num_samples:
            return self
        index = torch.linspace(0, self.num_samples - 1, max(count, 1)).round().long().unique()
        pick = {name: getattr(self, name) for name in TENSORS[self.kind]}
        return replace(self, **{name: t[index] for name, t in pick.items()})

    def rows(self, index: list[int]) -> list[list[int]]:
        """The token ids of samples `index`, unpadded."""
        return [self.input_ids[i, : int(self.lengths[i])].tolist() for i in index]


# ------------------------------------------------------------------------------------------------- validation


def _check_tensor(where: str, name: str, t: torch.Tensor, ndim: int) -> None:
    expected = torch.int64 if name in INT_TENSORS else torch.float32
    if not isinstance(t, torch.Tensor) or t.dtype != expected or t.ndim != ndim:
        got = f"{t.dtype} with {t.ndim} dims" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{where}: tensor {name!r} must be {expected} with {ndim} dims, got {got}.")
    if expected == torch.float32 and not torch.isfinite(t).all():
        raise ValueError(f"{where}: tensor {name!r} holds NaN/Inf values.")
    if expected == torch.int64 and t.numel() and int(t.min()) < 0:
        raise ValueError(f"{where}: tensor {name!r} holds negative ids or lengths.")


def _check_lm(where: str, fp: Fingerprint) -> None:
    n = fp.num_samples
    if fp.topk_ids.shape[0] != n or fp.topk_ids.shape != fp.topk_logprobs.shape or fp.topk_ids.shape[2] < 1:
        raise ValueError(f"{where}: topk_ids {tuple(fp.topk_ids.shape)} and topk_logprobs "
                         f"{tuple(fp.topk_logprobs.shape)} must both be [{n}, steps, k].")
    if not torch.equal(fp.lengths - fp.prompt_lengths, torch.full_like(fp.lengths, fp.steps - 1)):
        raise ValueError(f"{where}: every sample must replay exactly steps - 1 = {fp.steps - 1} tokens after its "
                         "prompt.")
    if float(fp.topk_logprobs.max()) > 1e-4 or float(torch.logsumexp(fp.topk_logprobs, -1).max()) > 1e-3:
        raise ValueError(f"{where}: topk_logprobs are not log-probabilities (above 0, or more than mass 1).")


def validate_fingerprint(fp: Fingerprint, where: str = "fingerprint") -> Fingerprint:
    """Check every field (kinds, dtypes, shapes, ranges, finiteness); raise a one-line `ValueError` naming `where`."""
    if fp.kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}; got {fp.kind!r}.")
    if not isinstance(fp.task, str) or not fp.task.strip():
        raise ValueError(f"{where}: the task name must be a non-empty string, got {fp.task!r}.")
    if not isinstance(fp.pad_id, int) or fp.pad_id < 0:
        raise ValueError(f"{where}: pad_id must be a non-negative integer, got {fp.pad_id!r}.")
    dims = {"input_ids": 2, "lengths": 1, "prompt_lengths": 1, "pooled": 2, "topk_ids": 3, "topk_logprobs": 3,
            "logits": 2}
    for name in TENSORS[fp.kind]:
        _check_tensor(where, name, getattr(fp, name), dims[name])
    n, width = fp.input_ids.shape
    if n < 1 or width < 1:
        raise ValueError(f"{where}: input_ids must hold at least one sample and one token, got {(n, width)}.")
    for name in ("lengths", "prompt_lengths", "pooled", "logits"):
        t = getattr(fp, name)
        if t is not None and name in TENSORS[fp.kind] and t.shape[0] != n:
            raise ValueError(f"{where}: {name} has {t.shape[0]} rows but input_ids has {n}.")
    lengths, prompts = fp.lengths, fp.prompt_lengths
    if int(prompts.min()) < 1 or bool((prompts > lengths).any()) or int(lengths.max()) > width:
        raise ValueError(f"{where}: lengths must satisfy 1 <= prompt_lengths <= lengths <= {width}.")
    if fp.kind == "lm":
        _check_lm(where, fp)
    elif fp.kind == "classifier" and fp.logits.shape[1] < 1:
        raise ValueError(f"{where}: logits must have at least one class.")
    return fp


# ------------------------------------------------------------------------------------------------- file I/O


def save_fingerprint(fp: Fingerprint, path: str | Path) -> Path:
    """Write `fp` as safetensors (temp file, fsync, atomic replace)."""
    from safetensors.torch import save_file

    validate_fingerprint(fp)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "kind": fp.kind, "task": fp.task, "pad_id": str(fp.pad_id)}
    save_file({k: v.contiguous().cpu() for k, v in fp.tensors().items()}, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"Fingerprint {path} does not exist; re-create it with make_task_checkpoint.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"Fingerprint {path} is {size} bytes, above the {MAX_FILE_BYTES} limit; it is not ours.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        reason = first_line(err)
        raise ValueError(f"Fingerprint {path} is not a readable safetensors file ({reason}); re-create it.") from None


def load_fingerprint(path: str | Path) -> Fingerprint:
    """Read and validate a fingerprint file; any defect raises a one-line `ValueError` naming the file."""
    path = Path(path)
    meta, tensors = _read_safetensors(path)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} file (metadata {meta!r}); re-create it.")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{path}: kind must be one of {', '.join(KINDS)}; got {kind!r}.")
    if set(tensors) != set(TENSORS[kind]):
        raise ValueError(f"{path}: a {kind} fingerprint holds exactly {sorted(TENSORS[kind])}, got {sorted(tensors)}.")
    pad = meta.get("pad_id", "")
    if not pad.isdigit():
        raise ValueError(f"{path}: pad_id must be a non-negative integer, got {pad!r}.")
    fp = Fingerprint(kind=kind, task=meta.get("task", ""), pad_id=int(pad), **tensors)
    return validate_fingerprint(fp, str(path))


def _file_stem(task: str) -> str:
    import hashlib

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task).strip("._")[:64] or "task"
    return f"{safe}-{hashlib.sha256(task.encode()).hexdigest()[:8]}"


def write_fingerprints(model_dir: str | Path, fingerprints: Mapping[str, Fingerprint]) -> list[Path]:
    """Write a version's fingerprints, one file per task, under `model_dir/_recall_private/fingerprints/`."""
    folder = Path(model_dir) / FINGERPRINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return [save_fingerprint(fp, folder / f"{_file_stem(task)}.safetensors") for task, fp in fingerprints.items()]


def read_fingerprints(model_dir: str | Path) -> dict[str, Fingerprint]:
    """Every fingerprint a folder carries, by task: a task checkpoint's own file and a version's folder of files."""
    folder = Path(model_dir) / FINGERPRINTS_DIR
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    model_dir = Path(model_dir)
    if (model_dir / FINGERPRINT_NAME).is_file():
        files.append(model_dir / FINGERPRINT_NAME)  # last: a task checkpoint's own file wins a name clash
    out: dict[str, Fingerprint] = {}
    for path in files:
        fp = load_fingerprint(path)
        out[fp.task] = fp
    return out


def collect_fingerprints(*model_dirs: str | Path) -> dict[str, Fingerprint]:
    """The union of the folders' fingerprints (a deployed version's and a new drop's): what a merge output carries
    and scores against. A later folder's fingerprint replaces an earlier one of the same task (a retrained task)."""
    out: dict[str, Fingerprint] = {}
    for d in model_dirs:
        out.update(read_fingerprints(d))
    return out


# ------------------------------------------------------------------------------------------------- divergence math


def topk_kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the k stored tokens plus one tail bucket (`1 - sum` of the k probabilities), per position.

    Args:
        p_logprobs: `[..., k]` the fingerprint's stored log-probabilities.
        q_logprobs: `[..., k]` the candidate's log-probabilities of the same token ids.

    Returns:
        `[...]` non-negative float64 divergences.
    """
    if p_logprobs.shape != q_logprobs.shape:
        raise ValueError(f"topk_kl: shapes {tuple(p_logprobs.shape)} and {tuple(q_logprobs.shape)} differ.")
    lp, lq = p_logprobs.double(), q_logprobs.double().clamp_min(-69.0)  # exp(-69) ~ 1e-30: no inf from log 0
    p, q = lp.exp(), lq.exp()
    p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - q.sum(-1)).clamp_min(1e-12)
    kl = (p * (lp - lq)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * q_tail.log()
    return kl.clamp_min(0.0)


def logits_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per row of `[n, C]` logits (float64)."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logits_kl: shapes {tuple(p_logits.shape)} and {tuple(q_logits.shape)} differ.")
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def representation_shift(p_pooled: torch.Tensor, q_pooled: torch.Tensor, scale: float) -> torch.Tensor:
    """`||q - p||^2 / scale` per row: how far pooled representations moved, relative to the stored ones' size."""
    return (q_pooled.double() - p_pooled.double()).pow(2).sum(-1) / max(scale, 1e-12)


def information_scale(fp: Fingerprint, vocab_size: int | None = None) -> float:
    """How far the task model's own stored predictions are from a uniform guess, in the fingerprint's divergence.

    `divergence / information_scale` is the share of what the task model knows beyond chance that a candidate has
    lost, comparable between a confident head and an unsure one (their KLs are not). Classifiers: the mean of
    `KL(softmax(logits) || uniform over C)`; LMs: `topk_kl` against a uniform next token over `vocab_size` (the
    model's output size); representations: 1 (`representation_shift` is relative already). Floored at 1e-6.
    """
    if fp.kind == "classifier":
        kl = logits_kl(fp.logits, torch.zeros_like(fp.logits))
    elif fp.kind == "lm":
        if vocab_size is None or vocab_size <= int(fp.topk_ids.shape[-1]):
            raise ValueError(f"information_scale of LM task {fp.task!r} needs the model's vocabulary size (more than "
                             f"the {int(fp.topk_ids.shape[-1])} stored tokens), got {vocab_size}.")
        uniform = torch.full(fp.topk_logprobs.shape, -math.log(vocab_size), dtype=torch.float64)
        kl = topk_kl(fp.topk_logprobs, uniform).mean(-1)
    else:
        return 1.0
    value = float(kl.mean())
    if not math.isfinite(value):
        raise ValueError(f"Fingerprint of task {fp.task!r} holds non-finite predictions.")
    return max(value, 1e-6)


def output_size(model: torch.nn.Module) -> int | None:
    """The number of next-token logits of a causal LM (its output embedding's rows), else `None`."""
    head = _inner(model).get_output_embeddings() if hasattr(_inner(model), "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else None


# ------------------------------------------------------------------------------------------------- forward passes


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (the wrapper is still what runs, with its adapter active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_kind(model: torch.nn.Module) -> str:
    """`lm` for causal LMs, `classifier` for sequence classifiers, else `representation`."""
    from transformers.models.auto import modeling_auto as auto

    name = type(_inner(model)).__name__
    if name in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "lm"
    if name in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values() or name.endswith(
        "ForSequenceClassification"
    ):
        return "classifier"
    return "representation"


def _pad(seqs: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(_inner(model).forward).parameters


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _lm_forward(model, seqs: list[list[int]], n_tail: int, pad_id: int, pooled: bool, layers: bool = False):
    """Next-token log-probs at each row's last `n_tail` positions `[B, n_tail, V]` (fp32, CPU), and optionally the
    last layer (`[B, H]`; with `layers` every layer, `[L+1, B, H]`) mean-pooled over all but those last `n_tail - 1`
    tokens (the prompt).

    Rows are left-padded with explicit position ids, so every row ends at the same column and only the last
    `n_tail` positions go through the LM head (`logits_to_keep`) where the model supports it.
    """
    ids, mask = _pad(seqs, pad_id, left=True, device=_device(model))
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
    for name, value in (("logits_to_keep", n_tail), ("use_cache", False)):
        if _accepts(model, name):
            kwargs[name] = value
    out = model(**kwargs, output_hidden_states=pooled)
    logprobs = torch.log_softmax(out.logits[:, -n_tail:].float(), dim=-1).cpu()
    if not pooled:
        return logprobs, None
    prompt_mask = mask.clone()
    if n_tail > 1:
        prompt_mask[:, -(n_tail - 1) :] = 0
    return logprobs, _pool(out.hidden_states, prompt_mask, layers)


def _pool(hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor, layers: bool) -> torch.Tensor:
    """The last layer mean-pooled over `mask` (`[B, H]`), or with `layers` every layer (`[L+1, B, H]`); fp32 CPU."""
    from .representations import masked_mean

    if not layers:
        return masked_mean(hidden_states[-1], mask).cpu()
    return torch.stack([masked_mean(h, mask).cpu() for h in hidden_states])


def _encoder_forward(model, seqs: list[list[int]], pad_id: int, layers: bool = False):
    """Head logits `[B, C]` (classifiers; `None` otherwise) and the mean-pooled last layer `[B, H]` (with `layers`
    every layer, `[L+1, B, H]`), fp32 CPU."""
    pad = getattr(getattr(_inner(model), "config", None), "pad_token_id", None)
    ids, mask = _pad(seqs, pad if isinstance(pad, int) else pad_id, left=False, device=_device(model))
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    logits = out.logits.float().cpu() if model_kind(model) == "classifier" else None
    return logits, _pool(out.hidden_states, mask, layers)


class _evaluating:
    """Eval mode and no grad for the block; the model's training flag is restored after."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.grad = model, torch.no_grad()

    def __enter__(self):
        self.training = self.model.training
        self.model.eval()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        self.model.train(self.training)


def _batches(n: int, size: int, lengths: list[int] | None = None):
    """Index batches; sorted by length when given, so each batch pads little."""
    order = sorted(range(n), key=lambda i: lengths[i]) if lengths is not None else list(range(n))
    return [order[i : i + size] for i in range(0, n, size)]


# ------------------------------------------------------------------------------------------------- compute and score


def _tokenize(tokenizer, texts: list[str], budget: int) -> list[list[int]]:
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's text tokenizer
    rows = [tok(t, truncation=True, max_length=budget)["input_ids"] for t in texts if isinstance(t, str)]
    rows = [list(r) for r in rows if len(r) > 0]
    if not rows:
        raise ValueError("No sample tokenizes to at least one token; the fingerprint needs non-empty texts.")
    return rows


def _pad_id(tokenizer) -> int:
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    for value in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if isinstance(value, int):
            return value
    return 0


def _lm_outputs(model, prompts: list[list[int]], pad_id: int, config: FingerprintConfig):
    """Greedy-extend each prompt by `steps - 1` tokens, then record the top-k log-probs along them."""
    rows, pooled, topk_ids, topk_lp = [], [], [], []
    for index in _batches(len(prompts), config.batch_size):
        seqs = [list(prompts[i]) for i in index]
        for _ in range(config.steps - 1):
            logprobs, _ = _lm_forward(model, seqs, 1, pad_id, pooled=False)
            for s, token in zip(seqs, logprobs[:, 0].argmax(-1).tolist()):
                s.append(token)
        logprobs, pool = _lm_forward(model, seqs, config.steps, pad_id, pooled=True)
        top = logprobs.topk(min(config.top_k, logprobs.shape[-1]), dim=-1)
        rows += seqs
        pooled.append(pool)
        topk_ids.append(top.indices)
        topk_lp.append(top.values)
    extra = {"topk_ids": torch.cat(topk_ids).long(), "topk_logprobs": torch.cat(topk_lp).float()}
    return rows, torch.cat(pooled), extra


def _encoder_outputs(model, prompts: list[list[int]], pad_id: int, config: FingerprintConfig):
    pooled, logits = [], []
    for index in _batches(len(prompts), config.batch_size):
        out, pool = _encoder_forward(model, [prompts[i] for i in index], pad_id)
        pooled.append(pool)
        logits.append(out)
    extra = {"logits": torch.cat(logits).float()} if model_kind(model) == "classifier" else {}
    return [list(p) for p in prompts], torch.cat(pooled), extra


def compute_fingerprint(
    model: torch.nn.Module, tokenizer, texts: list[str], task: str, config: FingerprintConfig | None = None
) -> Fingerprint:
    """Record `model`'s behaviour on `texts` (a task's typical samples) as a validated `Fingerprint`.

    Args:
        model: the task's fine-tuned model (a transformers model or a `peft.PeftModel` with its adapter active).
        tokenizer: its tokenizer (or processor).
        texts: the typical samples' texts (prompt side).
        task: the task's name.
        config: sizes; defaults to `FingerprintConfig()`.
    """
    config = config or FingerprintConfig()
    kind = model_kind(model)
    budget = config.max_length - (config.steps - 1 if kind == "lm" else 0)
    prompts, pad_id = _tokenize(tokenizer, texts, budget), _pad_id(tokenizer)
    with _evaluating(model):
        collect = _lm_outputs if kind == "lm" else _encoder_outputs
        rows, pooled, extra = collect(model, prompts, pad_id, config)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    fp = Fingerprint(kind=kind, task=task, input_ids=ids, lengths=lengths,
                     prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
                     pooled=pooled.float(), pad_id=pad_id, **extra)
    return validate_fingerprint(fp, f"fingerprint of task {task!r}")


@dataclass(frozen=True)
class TaskScore:
    """How far a model's behaviour is from one task's fingerprint.

    `divergence` is the objective: top-k KL with a tail bucket (LMs), KL of the head's softmax (classifiers), or
    the representation shift (heads-free backbones). `representation` is the pooled last layer's squared shift
    relative to the stored representations' mean squared norm, reported for every kind.
    """

    divergence: float
    representation: float


def _check_fits(model: torch.nn.Module, fp: Fingerprint) -> None:
    kind = model_kind(model)
    where = f"Fingerprint of task {fp.task!r}"
    if fp.kind != kind and fp.kind != "representation":
        raise ValueError(f"{where} is a {fp.kind} fingerprint but the model is a {kind}; use one architecture.")
    vocab = _inner(model).get_input_embeddings().num_embeddings
    if int(fp.input_ids.max()) >= vocab:
        raise ValueError(f"{where} holds token ids beyond this model's vocabulary ({vocab}); "
                         "it was made with another tokenizer.")


def _replay_batch(model, fp: Fingerprint, index: list[int], layers: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample divergence and pooled representation of samples `index` under `model` (`[B, H]`, the last layer;
    with `layers` every layer, `[L+1, B, H]`)."""
    if fp.kind == "lm" and model_kind(model) == "lm":
        logprobs, pool = _lm_forward(model, fp.rows(index), fp.steps, fp.pad_id, pooled=True, layers=layers)
        ids = fp.topk_ids[index]
        if int(ids.max()) >= logprobs.shape[-1]:
            raise ValueError(f"Fingerprint of task {fp.task!r} names tokens beyond the model's {logprobs.shape[-1]} "
                             "output logits; it was made with another model.")
        return topk_kl(fp.topk_logprobs[index], logprobs.gather(-1, ids)).mean(-1), pool
    if fp.kind == "lm":  # a representation-only model scoring an LM fingerprint: not reachable via _check_fits
        raise ValueError(f"Fingerprint of task {fp.task!r} needs a causal LM to replay.")
    logits, pool = _encoder_forward(model, fp.rows(index), fp.pad_id, layers)
    if fp.kind == "classifier":
        if logits.shape[-1] != fp.logits.shape[-1]:
            raise ValueError(f"Fingerprint of task {fp.task!r} has {fp.logits.shape[-1]} classes, the model "
                             f"{logits.shape[-1]}.")
        return logits_kl(fp.logits[index], logits), pool
    return torch.full((len(index),), float("nan"), dtype=torch.float64), pool


def _check_pooled(fp: Fingerprint, pooled: torch.Tensor) -> None:
    if pooled.shape[-1] != fp.pooled.shape[-1]:
        raise ValueError(f"Fingerprint of task {fp.task!r} has hidden size {fp.pooled.shape[-1]}, the model "
                         f"{pooled.shape[-1]}.")


def _pooled_scale(fp: Fingerprint) -> float:
    """The stored representations' mean squared norm: what `representation_shift` is relative to."""
    return float(fp.pooled.double().pow(2).sum(-1).mean())


def _task_score(fp: Fingerprint, divs: list[torch.Tensor], pools: list[torch.Tensor], order: list[int]) -> TaskScore:
    """One task's score from its replayed batches (per-sample divergences, pooled outputs, sample order)."""
    pooled = torch.cat(pools)
    _check_pooled(fp, pooled)
    shift = representation_shift(fp.pooled[order], pooled, _pooled_scale(fp)).mean().item()
    div = torch.cat(divs).mean().item() if fp.kind != "representation" else shift
    if not (torch.isfinite(torch.tensor([div, shift])).all()):
        raise RuntimeError(f"The model produces NaN/Inf on task {fp.task!r}'s samples; its weights are corrupt.")
    return TaskScore(divergence=div, representation=shift)


@torch.no_grad()
def fingerprint_divergence(model: torch.nn.Module, fingerprint: Fingerprint, batch_size: int = 8) -> TaskScore:
    """Replay a fingerprint's stored ids through `model` (batched, no generation) and score how far it moved.

    Raises:
        ValueError: the fingerprint does not fit the model (kind, vocabulary, classes, hidden size).
        RuntimeError: the model produces NaN/Inf.
    """
    scores, _, _ = score_tasks_bounded(model, {fingerprint.task: fingerprint}, {}, math.inf, batch_size)
    return scores[fingerprint.task]


def score_tasks(
    model: torch.nn.Module, fingerprints: Mapping[str, Fingerprint], batch_size: int = 8
) -> dict[str, TaskScore]:
    """`fingerprint_divergence` of every task, by name."""
    return score_tasks_bounded(model, fingerprints, {}, math.inf, batch_size)[0]


def _replayed(model, fp: Fingerprint, batch_size: int, layers: bool = False):
    """`fp` checked against `model`, then `(index, divergences, pooled)` of each batch (`_replay_batch`), in the
    length-sorted batches every scorer uses, so a task replayed to the end scores the same in each."""
    _check_fits(model, fp)
    for index in _batches(fp.num_samples, batch_size, fp.lengths.tolist()):
        yield index, *_replay_batch(model, fp, index, layers)


@torch.no_grad()
def score_and_represent(
    model: torch.nn.Module, fingerprints: Mapping[str, Fingerprint], task: str, batch_size: int = 8
) -> tuple[dict[str, TaskScore], torch.Tensor]:
    """`score_tasks`, and from the same forward passes every layer's hidden states mean-pooled over each prompt of
    `task`'s samples, `[L+1, n, H]` in the fingerprint's order: RECALL's representations of those prompts (SPEC 2.2),
    with each prompt as the fingerprint keeps it. Scores equal `score_tasks`' exactly (the same batches)."""
    scores, reps = {}, None
    with _evaluating(model):
        for name, fp in fingerprints.items():
            if name != task:
                scores[name] = score_tasks(model, {name: fp}, batch_size)[name]
                continue
            divs, pools, seen = [], [], []
            for index, div, pool in _replayed(model, fp, batch_size, layers=True):
                divs.append(div)
                pools.append(pool)
                seen += index
            scores[name] = _task_score(fp, divs, [p[-1] for p in pools], seen)
            reps = torch.cat(pools, dim=1)[:, torch.tensor(seen).argsort()]
    if reps is None:
        raise ValueError(f"No fingerprint of task {task!r} to take representations from.")
    return scores, reps


def _batch_share(fp: Fingerprint, div: torch.Tensor, pool: torch.Tensor, index: list[int], scale: float) -> float:
    """A batch's share of its task's divergence (the task's mean over samples, summed over batches)."""
    if fp.kind == "representation":
        _check_pooled(fp, pool)
        div = representation_shift(fp.pooled[index], pool, scale)
    return float(div.double().sum()) / fp.num_samples


@torch.no_grad()
def score_tasks_bounded(
    model: torch.nn.Module, fingerprints: Mapping[str, Fingerprint], weights: Mapping[str, float], bound: float,
    batch_size: int = 8, order: list[str] | None = None, offsets: Mapping[str, float] | None = None,
) -> tuple[dict[str, TaskScore], float, bool]:
    """`score_tasks`, stopped as soon as the weighted objective `sum_t weights[t] * divergence_t` must exceed
    `bound`: every per-sample divergence is >= 0, so the part replayed so far is a lower bound of it. With
    `offsets` the objective is `max_t (weights[t] * divergence_t - offsets[t])` instead (each task bounded alone).

    Tasks run in `order` (default: as given), each in `fingerprint_divergence`'s batches, so a task replayed to the
    end scores exactly as there.

    Returns:
        `(scores, value, complete)`: every task's `TaskScore` and the objective; when stopped, the tasks replayed to
        the end, the lower bound reached and `False`.
    """
    partial, scores, maximum = 0.0, {}, offsets is not None
    offsets = offsets or {}
    with _evaluating(model):
        for task in order or list(fingerprints):
            fp, w = fingerprints[task], float(weights.get(task, 0.0))
            if maximum:  # a max over tasks: each task's own lower bound, less its offset
                partial = -float(offsets.get(task, 0.0))
            scale, divs, pools, seen = _pooled_scale(fp), [], [], []
            for index, div, pool in _replayed(model, fp, batch_size):
                divs.append(div)
                pools.append(pool)
                seen += index
                if w:  # a task outside the objective only needs its score
                    partial += w * _batch_share(fp, div, pool, index, scale)
                    if partial > bound:
                        return scores, partial, False
            scores[task] = _task_score(fp, divs, pools, seen)
    values = [float(weights.get(t, 0.0)) * s.divergence - float(offsets.get(t, 0.0)) for t, s in scores.items()]
    return scores, (max(values, default=0.0) if maximum else sum(values)), True


# ------------------------------------------------------------------------------------------------- edges


def load_task_model(model_dir: str | Path, device: str = "cpu") -> torch.nn.Module:
    """A model folder loaded in fp32 with its head (the class in `config.architectures`), in eval mode."""
    from .models import load_model

    return load_model(model_dir, None, device).eval()


def fingerprint_for_checkpoint(
    model, tokenizer, samples: list[dict], task: str, sharded: bool = False, config: FingerprintConfig | None = None
) -> Fingerprint | None:
    """The fingerprint `write_task_checkpoint` stores, or `None` (logged) when it cannot run the model here.

    A model the fingerprint cannot replay (an architecture whose forward takes other inputs) is logged and skipped,
    not raised: the end of a training run must not lose its checkpoint over this record, and the checkpoint still
    merges with `calibrate=False`.
    """
    if isinstance(model, (str, Path)) or tokenizer is None or sharded:
        why = "a sharded model" if sharded else ("no tokenizer" if tokenizer is None else "a model directory")
        logger.warning("No fingerprint for task %r (given %s); make one with make_task_checkpoint.", task, why)
        return None
    try:
        return compute_fingerprint(model, tokenizer, [s["text"] for s in samples], task, config)
    except (ValueError, RuntimeError, TypeError) as err:
        logger.warning("No fingerprint for task %r: %s", task, first_line(err))
        return None
