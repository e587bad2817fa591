"""Checks before a drop is merged (RELIABILITY rule 2) and before a merged version may go live (rule 12).

Each failed check raises `DropRejected(check, message)`; the worker moves the drop to `quarantine/` with the
check's name and the message in `REASON.json`. Cheap checks run first; the full read of every tensor runs last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recall_hf.errors import first_line
from recall_hf.modeldir import (
    ADAPTER_CONFIG,
    ADAPTER_STEM,
    RECALL_JSON,
    is_adapter_dir,
    is_weight_file,
    read_recall_json,
)
from recall_hf.safetensors_io import CheckpointReader
from recall_hf.samples import SAMPLES_NAME, read_texts

logger = logging.getLogger(__name__)

# The checks, in the order they run; also the `reason` label of the quarantine metric.
CHECKS = ("layout", "code", "recall_json", "config", "weights", "sha256", "architecture", "samples", "finite", "merge",
          "post_merge", "regression", "gate")


class DropRejected(Exception):
    """A drop failed a check: it is quarantined, the deployed model stays as it is."""

    def __init__(self, check: str, message: str, details: dict | None = None):
        if check not in CHECKS:
            raise ValueError(f"Unknown check {check!r}; checks are {', '.join(CHECKS)}.")
        super().__init__(f"{check}: {message}")
        self.check, self.message = check, message
        self.details = details or {}  # the gates' scores or exit code and output, kept in REASON.json


@dataclass
class DropInfo:
    """What the checks learned about a drop and the merge needs."""

    kind: str  # "full" or "adapter"
    task: str
    texts: list[str]
    recall: dict = field(default_factory=dict)
    tensors: int = 0
    weight_hashes: dict[str, str] = field(default_factory=dict)  # sha256 of the top-level weight files, as verified


@contextlib.contextmanager
def rejecting(check: str):
    """Turn the library's ValueError/OSError into `DropRejected(check, ...)`."""
    try:
        yield
    except DropRejected:
        raise
    except (ValueError, OSError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise DropRejected(check, first_line(err)) from None


def drop_kind(path: Path) -> str:
    if is_adapter_dir(path):
        return "adapter"
    if (path / "config.json").is_file():
        return "full"
    raise DropRejected("layout", f"{path} holds neither config.json (a full model) nor {ADAPTER_CONFIG} (a PEFT "
                       "adapter); a task checkpoint needs one of them next to its safetensors weights.")


def open_weights(path: Path, kind: str) -> CheckpointReader:
    with rejecting("weights"):
        return CheckpointReader(path, stem=ADAPTER_STEM if kind == "adapter" else "model")


def check_sha256(path: Path, recorded: dict, file_hashes: dict[str, str]) -> None:
    """Weight hashes recorded by the producer in `recall.json` must match the files as they arrived."""
    if not recorded:
        return
    if not isinstance(recorded, dict):
        raise DropRejected("recall_json", f"{path / RECALL_JSON}: sha256 must map file names to hashes.")
    for name, expected in sorted(recorded.items()):
        actual = file_hashes.get(name)
        if actual is None:
            raise DropRejected("sha256", f"{RECALL_JSON} lists {name!r} but the drop has no such file.")
        if actual != expected:
            raise DropRejected("sha256", f"{name}: sha256 {actual[:16]}... but {RECALL_JSON} records "
                               f"{str(expected)[:16]}...; the file changed or was damaged in transit.")


def check_full_architecture(drop: Path, deployed: Path, reader: CheckpointReader) -> None:
    from recall_hf.compat import check_compatible, check_same_architecture
    from recall_hf.models import load_config

    with rejecting("config"):
        json.loads((drop / "config.json").read_text())
        drop_cfg = load_config(drop)
    deployed_cfg = load_config(deployed)
    with rejecting("architecture"):
        check_same_architecture([deployed_cfg, drop_cfg], [deployed, drop])
        for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
            a, b = getattr(deployed_cfg, key, None), getattr(drop_cfg, key, None)
            if a != b:
                raise ValueError(f"{drop} has {key}={b!r} but the deployed model has {a!r}.")
        check_compatible([CheckpointReader(deployed), reader])


def check_adapter_architecture(drop: Path, deployed: Path, base: Path | None = None) -> None:
    """The drop fits the deployed adapter; with the deployment's own `base` (a bare v0000), it is checked against
    that base (shapes, recorded parent hashes) instead of by the base name in its `adapter_config.json`."""
    # A failing import is a broken install, not a bad drop: it must stop the daemon, never quarantine drops.
    from recall_hf.lora.compat import check_adapters, load_adapter

    with rejecting("config"):
        json.loads((drop / ADAPTER_CONFIG).read_text())
        new = load_adapter(drop)
    with rejecting("architecture"):
        check_adapters([load_adapter(deployed), new], None if base is None else str(base))
    if base is not None:
        check_adapter_fits_base(drop, base)


def is_bare_base(deployed: Path) -> bool:
    """A full model carrying no task (the base as v0000): its first adapter drop makes an adapter deployment."""
    try:
        return not is_adapter_dir(deployed) and read_recall_json(deployed).get("task_count") == 0
    except (OSError, ValueError):
        return False


def check_adapter_fits_base(drop: Path, base: Path) -> None:
    """Every adapted module of the drop is a weight of the deployed base with the factors' in/out sizes."""
    from recall_hf.lineage import check_lineage
    from recall_hf.lora.compat import load_adapter
    from recall_hf.lora.io import strip_peft_prefix

    with rejecting("architecture"):
        check_lineage([drop], base)  # the parent hashes a task checkpoint recorded, when it did
    with rejecting("config"):
        adapter = load_adapter(drop)
    reader = CheckpointReader(base)
    try:
        for module, m in adapter.modules.items():
            a, b = adapter.reader.tensors[m.a_key].shape, adapter.reader.tensors[m.b_key].shape
            key = f"{strip_peft_prefix(module)}.weight"
            own = reader.tensors.get(key)
            size = (math.prod(a) // a[0]) * b[0]
            if own is None or math.prod(own.shape) != size:
                has = "no such weight" if own is None else f"shape {tuple(own.shape)}"
                raise DropRejected("architecture", f"the adapter adapts {key} with lora_A {tuple(a)} / lora_B "
                                   f"{tuple(b)} but the deployed base has {has}; drop adapters of this base model.")
    finally:
        reader.close()
        adapter.reader.close()


def check_finite(reader: CheckpointReader) -> int:
    """Read every tensor in full (a file that opens but cannot be read is caught here) and check it is finite."""
    try:
        for name, info in reader.tensors.items():
            try:
                t = reader.get(name)
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise DropRejected("weights", f"tensor {name!r} in {info.file.name} cannot be read: "
                                   f"{first_line(err)}") from None
            if info.is_float:
                bad = (~torch.isfinite(t)).sum().item()
                if bad:
                    raise DropRejected("finite", f"tensor {name!r} in {info.file.name} has {bad} NaN/Inf value(s) "
                                       f"of {t.numel()}; the training run diverged or the file is corrupt.")
        return len(reader.tensors)
    finally:
        reader.close()


def read_samples(path: Path, shown: str) -> list[str]:
    """Typical samples of a drop (or the daemon's probes): UTF-8 `{"text": ...}` lines, none of them blank."""
    try:
        texts = read_texts(path)
    except UnicodeDecodeError as err:
        raise DropRejected("samples", f"{shown} is not UTF-8 text (byte {err.start}); write one "
                           '{"text": ...} object per line.') from None
    except (ValueError, OSError) as err:
        raise DropRejected("samples", first_line(err).replace(str(path), shown)) from None
    blank = [i for i, t in enumerate(texts, 1) if not t.strip()]
    if blank or not texts:
        raise DropRejected("samples", f"{shown}: text {blank[0]} is blank; typical samples must hold text."
                           if blank else f"{shown} holds no texts.")
    return texts


def drop_texts(drop: Path, fallback: str | None) -> list[str]:
    path = drop / SAMPLES_NAME
    if path.is_file():
        return read_samples(path, SAMPLES_NAME)
    if fallback:
        return read_samples(Path(fallback), str(fallback))
    raise DropRejected("samples", f"no {SAMPLES_NAME} in the drop and the daemon has no --probes; write the "
                       "task's typical samples (recall-hf select-samples, or RecallCallback does it).")


def check_task_count(recall: dict, weights: dict[str, str], produced: Callable[[dict], int | None]) -> int:
    """A fresh task checkpoint carries 1 task; more only when the drop is a version this deployment produced
    (its weight files hash to one the ledger or a kept version records, with that version's task count)."""
    count = recall.get("task_count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DropRejected("recall_json", f"{RECALL_JSON}: task_count must be a positive integer, got {count!r}.")
    if count == 1:
        return count
    known = produced(weights)
    if known is None:
        raise DropRejected("recall_json", f"{RECALL_JSON} claims task_count={count}, but the drop is not a version "
                           "this deployment published; a fresh task checkpoint carries task_count 1.")
    if known != count:
        raise DropRejected("recall_json", f"{RECALL_JSON} claims task_count={count}, but this deployment published "
                           f"these weights with task_count={known}.")
    return count


def verify_drop(drop: Path, deployed: Path, file_hashes: dict[str, str], probes: str | None = None,
                name: str | None = None, produced: Callable[[dict], int | None] = lambda w: None,
                base: Path | None = None) -> DropInfo:
    """Every check a drop must pass before it may be merged into the deployed version `deployed`.

    Args:
        drop: the drop directory (already taken and hashed; its layout checked).
        deployed: the live version's directory.
        file_hashes: `{relative path: sha256}` of the drop's files (from its content hash).
        probes: daemon-wide probe file used when the drop ships no `recall_samples.jsonl`.
        name: the producer's name of the drop (the default task name).
        produced: weight hashes -> task count of a version this deployment published, or None.
        base: the deployment's own base model (a bare v0000) that adapter drops apply to, whatever base their
            `adapter_config.json` names; `None` (full-model deployments, or one begun from an adapter) compares
            the adapters' base names.
    """
    kind = drop_kind(drop)
    deployed_kind = "adapter" if is_adapter_dir(deployed) else "full"
    adopting = kind == "adapter" and deployed_kind == "full" and is_bare_base(deployed)
    if kind != deployed_kind and not adopting:
        raise DropRejected("architecture", f"the drop is a {kind} checkpoint but the deployed model is a "
                           f"{deployed_kind} one; drop {'adapters' if deployed_kind == 'adapter' else 'full models'}.")
    weights = {rel: h for rel, h in file_hashes.items() if "/" not in rel and is_weight_file(rel)}
    with rejecting("recall_json"):
        recall = read_recall_json(drop)
    check_task_count(recall, weights, produced)
    reader = open_weights(drop, kind)
    check_sha256(drop, recall.get("sha256") or {}, file_hashes)
    if kind == "full":
        check_full_architecture(drop, deployed, reader)
    elif adopting:
        check_adapter_fits_base(drop, deployed)
    else:
        check_adapter_architecture(drop, deployed, base)
    texts = drop_texts(drop, probes)
    n = check_finite(reader)
    task = recall.get("task") or recall.get("task_name") or name or drop.name
    return DropInfo(kind, str(task), texts, recall, n, weights)


def forward_model(version: Path, device: str = "cpu", device_map: str | None = None, base: Path | None = None):
    """Load a version the way a server would: the class its config names (adapters: base model + PEFT; `base`:
    the deployment's own base model, else the adapter's `base_model_name_or_path`)."""
    from recall_hf.models import load_model, quiet_transformers

    if is_adapter_dir(version):
        from peft import PeftModel

        cfg = json.loads((version / ADAPTER_CONFIG).read_text())
        base = load_model(base or cfg["base_model_name_or_path"], cfg.get("task_type"), device)
        with quiet_transformers():
            return PeftModel.from_pretrained(base, str(version)).eval()
    # The stored dtype (a bf16 model validates in bf16: half the memory, the same overflow range as fp32).
    return load_model(version, None, device, device_map, dtype="auto")


def validate_version(version: Path, texts: list[str], max_texts: int = 8, max_length: int = 256,
                     device: str = "cpu", device_map: str | None = None, base: Path | None = None) -> dict:
    """The merged version loads (an adapter on `base` when given), its weights are finite, and a forward pass on
    typical samples is finite."""
    from recall_hf.models import load_tokenizer

    try:
        model = forward_model(version, device, device_map, base)
        tok_dir = version
        if is_adapter_dir(version) and not (version / "tokenizer_config.json").is_file():
            tok_dir = base or Path(json.loads((version / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])
        tokenizer = load_tokenizer(tok_dir)
    except Exception as err:  # noqa: BLE001 - anything that stops a server from loading it
        raise DropRejected("post_merge", f"the merged model does not load: {first_line(err)}") from None
    try:
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise DropRejected("post_merge", f"merged parameter {name!r} has NaN/Inf values.")
        batch = texts[:max_texts]
        with torch.no_grad():
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc = enc.to(next(model.parameters()).device)
            out = model(**enc)
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out.last_hidden_state
        mask = enc["attention_mask"].bool()
        values = logits[mask] if logits.dim() == 3 else logits
        if not torch.isfinite(values).all():
            raise DropRejected("post_merge", f"a forward pass of the merged model on {len(batch)} typical samples "
                               "gives NaN/Inf outputs; the merged weights are numerically broken.")
        return {"texts": len(batch), "output_shape": list(logits.shape)}
    except DropRejected:
        raise
    except Exception as err:  # noqa: BLE001
        raise DropRejected("post_merge", f"a forward pass of the merged model failed: {first_line(err)}") from None
    finally:
        del model
