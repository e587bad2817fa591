"""Writing a task checkpoint (SPEC 3): weights or adapter, tokenizer, typical samples, `recall.json`, then `READY`.

A task checkpoint is built in a hidden staging directory beside its destination and renamed into place, so a
drop-folder watcher only ever sees a complete directory (`READY` included) or nothing. A crash leaves at most a
dot-prefixed `.<name>.tmp-<pid>` directory, which watchers ignore.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from . import __version__
from .config import RecallConfig
from .durable import fsync_dir, staged_dir, write_json
from .fingerprint import (
    FINGERPRINT_NAME,
    Fingerprint,
    FingerprintConfig,
    compute_fingerprint,
    fingerprint_for_checkpoint,
    load_task_model,
    save_fingerprint,
)
from .modeldir import (
    ADAPTER_CONFIG,
    NOT_COPIED,
    READY,
    RECALL_JSON,
    is_adapter_dir,
    is_weight_file,
    read_recall_json,
    weight_hashes,
)
from .models import load_tokenizer
from .samples import SAMPLES_NAME, read_texts, select_typical_samples, write_samples

logger = logging.getLogger(__name__)

# Keys `write_task_checkpoint` owns in `recall.json`; `extra` may add others but not replace these.
RESERVED_KEYS = (
    "kind", "task", "weights", "parent", "parent_sha256", "base", "created", "library_version", "task_count",
    "num_samples", "sha256",
)

# Trainer state a training output directory may hold beside the model; never part of a task checkpoint.
TRAINER_STATE_FILES = ("training_args.bin", "trainer_state.json", "optimizer.pt", "scheduler.pt", "scaler.pt")


def write_ready(stage: Path) -> None:
    """Create the empty `READY` marker, durably, once every other file of the stage is complete and fsynced."""
    if (stage / READY).exists():
        raise RuntimeError(f"{stage / READY} was written before the checkpoint was complete.")
    with open(stage / READY, "wb") as f:
        os.fsync(f.fileno())
    fsync_dir(stage)


def staged_task_dir(final: str | Path):
    """Build a directory at `.<name>.tmp-<pid>` beside `final`; on success write `READY` last and rename into place.

    Order: the block writes every file; all files are fsynced; the empty `READY` is created and fsynced; the
    staging directory is renamed to `final` and the parent fsynced. On any error the staging directory is removed
    and `final` is left absent. Dot-prefixed so a watcher of the parent (a drop folder) never takes the stage for a
    drop.
    """
    return staged_dir(final, hidden=True, seal=write_ready)


def unique_drop_path(drop_dir: str | Path, task_name: str) -> Path:
    """A new `<task>-<UTC timestamp>` path inside `drop_dir` (suffixed `-1`, `-2` ... if taken)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_name).strip("._") or "task"
    stem = f"{safe}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    path, i = Path(drop_dir) / stem, 0
    while path.exists() or path.with_name(f".{path.name}.tmp-{os.getpid()}").exists():
        i += 1
        path = Path(drop_dir) / f"{stem}-{i}"
    return path


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep full-model use working without it
        return False
    return isinstance(model, PeftModel)


def _model_source(model) -> tuple[str | None, str | None]:
    """`(parent, base)` a model object says it came from: its load path, and for adapters the base model."""
    if _is_peft_model(model):
        cfg = model.peft_config[model.active_adapter]
        base = cfg.base_model_name_or_path
        return base, base
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return (str(name) if name else None), None


def _parent_hashes(parent: str | None) -> dict[str, str] | None:
    """Weight hashes of a local parent directory: from its `recall.json` when it has them (cheap), else computed."""
    if not parent or not Path(parent).is_dir():
        return None
    recorded = read_recall_json(parent).get("sha256")
    if isinstance(recorded, dict) and recorded:
        return recorded
    return weight_hashes(parent) or None


def _local_abs(path: str | Path | None) -> str | None:
    """A local path made absolute (symlinks resolved: provenance names the exact version); hub ids unchanged."""
    if path is None:
        return None
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def _base_of(parent: str | None) -> str | None:
    """The base model a local parent was built from (its `recall.json`), else the parent itself."""
    if parent and Path(parent).is_dir():
        data = read_recall_json(parent)
        if data.get("base"):
            return str(data["base"])
    return parent


def save_weights(model, stage: Path, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Save a model object, a `PeftModel` (adapter only) or a model directory's files into `stage`.

    Returns:
        `"adapter"` or `"full"`.
    """
    if isinstance(model, (str, Path)):
        src = Path(model)
        if not src.is_dir():
            raise ValueError(f"Model directory {src} does not exist.")
        for p in sorted(src.iterdir()):
            skip = p.name in NOT_COPIED or p.name in TRAINER_STATE_FILES or p.name.startswith((".", "rng_state"))
            if p.is_file() and not skip:
                shutil.copy2(p, stage / p.name)
        kind = "adapter" if is_adapter_dir(stage) else "full"
    elif _is_peft_model(model):
        model.save_pretrained(str(stage), selected_adapters=[model.active_adapter], state_dict=state_dict)
        if model.active_adapter != "default":  # PEFT saves non-default adapters in a subfolder
            sub = stage / model.active_adapter
            for p in sub.iterdir():
                os.replace(p, stage / p.name)
            sub.rmdir()
        kind = "adapter"
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(str(stage), state_dict=state_dict)
        kind = "full"
    else:
        raise ValueError(f"Cannot save a {type(model).__name__}: expected a transformers PreTrainedModel, a "
                         "peft PeftModel or a model directory.")
    if kind == "full" and not (stage / "config.json").is_file():
        raise RuntimeError(f"Saving the model wrote no config.json into {stage}; cannot build a task checkpoint.")
    if kind == "adapter" and not (stage / ADAPTER_CONFIG).is_file():
        raise RuntimeError(f"Saving the adapter wrote no {ADAPTER_CONFIG} into {stage}.")
    if not any(is_weight_file(p.name) for p in stage.iterdir()):
        raise RuntimeError(f"Saving the model wrote no weight files into {stage}.")
    return kind


def check_task_args(samples: list[dict], task_name: str, extra: dict | None) -> None:
    """`write_task_checkpoint`'s arguments, checked before anything is written."""
    if not samples or not all(isinstance(s, dict) and isinstance(s.get("text"), str) for s in samples):
        raise ValueError("samples must be a non-empty list of {\"text\": ...} dicts (select_typical_samples output).")
    if not task_name or not isinstance(task_name, str):
        raise ValueError(f"task_name must be a non-empty string, got {task_name!r}.")
    clash = sorted(set(extra or {}) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"extra must not set {clash}; these recall.json fields are written by recall-hf.")
    json.dumps(extra or {})  # fail before writing anything if extra is not serialisable


def task_record(
    folder: Path, task: str, kind: str, parent: str | None, base: str | None, num_samples: int, extra: dict | None
) -> dict:
    """The `recall.json` of a task checkpoint whose weights are already in `folder` (they are hashed here)."""
    return {
        "kind": "task-checkpoint",
        "task": task,
        "weights": kind,
        "parent": parent,
        "parent_sha256": _parent_hashes(parent),
        "base": base,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "library_version": __version__,
        "task_count": 1,
        "num_samples": num_samples,
        "sha256": weight_hashes(folder),
        **(extra or {}),
    }


def write_task_checkpoint(
    model,
    tokenizer,
    out_dir: str | Path,
    samples: list[dict],
    task_name: str,
    parent: str | Path | None = None,
    base: str | Path | None = None,
    extra: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    fingerprint: bool | Fingerprint = True,
    fingerprint_config: FingerprintConfig | None = None,
) -> Path:
    """Write a complete task checkpoint to `out_dir` (must not exist or be empty), atomically.

    Args:
        model: a fine-tuned `PreTrainedModel`, a `peft.PeftModel` (only the adapter is written), or a directory
            holding either (its files are copied).
        tokenizer: the tokenizer (or processor) to save beside the weights; `None` to skip.
        out_dir: destination directory.
        samples: the task's typical samples (`select_typical_samples` output).
        task_name: the task's name, recorded in `recall.json`.
        parent: the model training started from (default: the path the model was loaded from; the base model
            for adapters). Its weight hashes are recorded when it is a local directory.
        base: the original base model (default: the parent's recorded `base`, else the parent).
        extra: more JSON-serialisable fields for `recall.json`.
        state_dict: a gathered state dict to save instead of `model.state_dict()` (FSDP / DeepSpeed ZeRO-3).
        fingerprint: `True` records the model's behaviour on the samples in `recall_fingerprint.safetensors` (SPEC
            2.7) when the model object can run here (not for a directory or a sharded model); a `Fingerprint` is
            written as given; `False` writes none.
        fingerprint_config: how much of the model's behaviour the fingerprint keeps (default `FingerprintConfig()`).

    Returns:
        The checkpoint directory.
    """
    check_task_args(samples, task_name, extra)
    # A directory does not say what it was trained from: the caller passes `parent` for it.
    default_parent, default_base = (None, None) if isinstance(model, (str, Path)) else _model_source(model)
    parent = _local_abs(parent if parent is not None else default_parent)
    base = _local_abs(base if base is not None else (default_base or _base_of(parent)))
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    if fingerprint is True:
        fingerprint = fingerprint_for_checkpoint(model, tokenizer, samples, task_name, sharded=state_dict is not None,
                                                 config=fingerprint_config)
    with staged_task_dir(out_dir) as stage:
        kind = save_weights(model, stage, state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(stage))
        write_samples(stage / SAMPLES_NAME, samples)
        if isinstance(fingerprint, Fingerprint):
            save_fingerprint(fingerprint, stage / FINGERPRINT_NAME)
        write_json(stage / RECALL_JSON, task_record(stage, task_name, kind, parent, base, len(samples), extra))
    logger.info("Task checkpoint %r (%s, %d samples) written to %s in %.1fs", task_name, kind, len(samples),
                out_dir, time.perf_counter() - t0)
    return out_dir


def _write_samples_atomic(path: Path, samples: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_samples(tmp, samples)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_plain_model_dir(model_dir: Path, overwrite: bool) -> None:
    if not model_dir.is_dir():
        raise ValueError(f"Model directory {model_dir} does not exist.")
    if not any(is_weight_file(p.name) for p in model_dir.iterdir() if p.is_file()):
        raise ValueError(f"{model_dir} holds no weight files (*.safetensors, *.bin); point at a fine-tuned model "
                         "folder.")
    if not is_adapter_dir(model_dir) and not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json; save the model with save_pretrained.")
    if (model_dir / READY).exists() and not overwrite:
        raise ValueError(f"{model_dir} is already a task checkpoint ({READY} present); pass overwrite=True to "
                         "redo it.")


def _load_checkpoint_model(model_dir: Path, base: str | None, device: str):
    """`(model, tokenizer, kind, base)`: a full model folder, or a LoRA adapter folder on its local base model."""
    if not is_adapter_dir(model_dir):
        return load_task_model(model_dir, device), load_tokenizer(model_dir), "full", base
    from peft import PeftModel

    base = base or json.loads((model_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ValueError(f"{model_dir} is a LoRA adapter whose base model {base!r} is not a local directory; "
                         "pass base=DIR (the model the adapter was trained on).")
    has_tokenizer = any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(model_dir if has_tokenizer else base)
    model = PeftModel.from_pretrained(load_task_model(base, device), str(model_dir))
    return model.eval(), tokenizer, "adapter", _local_abs(base)


def make_task_checkpoint(
    model_dir: str | Path,
    texts: list[str] | str | Path,
    task: str | None = None,
    parent: str | Path | None = None,
    base: str | Path | None = None,
    config: RecallConfig | None = None,
    fingerprint_config: FingerprintConfig | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Turn a plain fine-tuned model or LoRA adapter folder into a task checkpoint in place (SPEC 3).

    Picks the typical samples of `texts`, records the model's fingerprint on them, writes `recall_samples.jsonl`,
    `recall_fingerprint.safetensors` and `recall.json` (each atomically), then `READY` last. The weights are not
    touched. A folder in a drop folder is safe: without `READY` it is taken only after it has stopped changing.

    Args:
        model_dir: the folder (`config.json` and weights, or a PEFT LoRA adapter, as `save_pretrained` writes
            them).
        texts: the task's training texts (prompt side), or a `.jsonl` (`{"text": ...}` lines) / `.txt` file.
        task: the task's name (default: the folder's name).
        parent: the model fine-tuning started from (the deployed model in the chain protocol, else the base).
        base: the original base model (default: the parent's recorded base, else the parent; for an adapter its
            `base_model_name_or_path`, which must be a local directory).
        config: a `RecallConfig` for the sample selection (`k`, seeds, batching, device).
        fingerprint_config: a `FingerprintConfig` (default: its defaults with `config.fingerprint_steps`).
        overwrite: redo a folder that already is a task checkpoint.
    """
    model_dir = Path(model_dir)
    _check_plain_model_dir(model_dir, overwrite)
    config = config or RecallConfig()
    texts = read_texts(texts) if isinstance(texts, (str, Path)) else list(texts)
    task = task or model_dir.resolve().name
    parent = _local_abs(parent)
    base = _local_abs(base if base is not None else _base_of(parent))
    model, tokenizer, kind, base = _load_checkpoint_model(model_dir, base, config.device)
    parent = parent or (base if kind == "adapter" else None)
    samples = select_typical_samples(texts, model, tokenizer, config, progress)
    fingerprint_config = fingerprint_config or FingerprintConfig(steps=config.fingerprint_steps)
    fp = compute_fingerprint(model, tokenizer, [s["text"] for s in samples], task, fingerprint_config)
    del model
    (model_dir / READY).unlink(missing_ok=True)
    fsync_dir(model_dir)
    _write_samples_atomic(model_dir / SAMPLES_NAME, samples)
    save_fingerprint(fp, model_dir / FINGERPRINT_NAME)
    write_json(model_dir / RECALL_JSON, task_record(model_dir, task, kind, parent, base, len(samples), None))
    fsync_dir(model_dir)
    write_ready(model_dir)
    logger.info("Made %s a task checkpoint of task %r (%d samples, fingerprint %s)", model_dir, task, len(samples),
                fp.kind)
    return model_dir
