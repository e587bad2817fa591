"""Folding a LoRA adapter into its base's full weights (PEFT `merge_and_unload`), written atomically."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .. import __version__
from ..card import write_fold_card
from ..durable import check_output_dir, staged_dir, write_json
from ..hub import resolve_model
from ..lineage import checked_base
from ..modeldir import ADAPTER_CONFIG, RECALL_JSON, copy_aux_files, task_count, weight_hashes
from ..models import load_config, load_model, quiet_transformers, resolve_base
from .compat import check_adapters, load_adapter

logger = logging.getLogger(__name__)


def stored_dtype(base: str) -> torch.dtype | None:
    """The floating dtype the base model's config says its weights are stored in, if any."""
    config = load_config(base)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else None


def fold_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """Fold a LoRA adapter into its base's full weights (PEFT `merge_and_unload`), written atomically.

    The merge runs in fp32 and is cast back to the base's stored dtype. Tokenizer files come from the base, then from
    the adapter directory (which wins). The output's `recall.json` carries the adapter's `task_count`.

    Returns:
        `out_dir`, a normal Hugging Face model directory.
    """
    from peft import PeftModel

    adapter_dir, out_dir = resolve_model(adapter_dir), Path(out_dir)
    base = checked_base(base, [adapter_dir])  # a Hub id resolved; checked against the recorded parent
    check_output_dir(out_dir)
    adapter = load_adapter(adapter_dir)
    base_name = resolve_base(check_adapters([adapter], base))
    count = task_count(adapter_dir)
    dtype = stored_dtype(base_name)
    model = load_model(base_name, adapter.config.get("task_type"))
    with quiet_transformers():
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    if dtype is not None:
        model.to(dtype)
    with staged_dir(out_dir) as stage:
        if Path(base_name).is_dir():
            copy_aux_files(Path(base_name), stage)
        copy_aux_files(adapter_dir, stage, skip={ADAPTER_CONFIG})
        with quiet_transformers():
            model.save_pretrained(stage, safe_serialization=True)
        tasks = write_fold_card(stage, adapter_dir, base_name)
        write_json(stage / RECALL_JSON, {
            "kind": "recall-fold-adapter",
            "task_count": count,
            "tasks": tasks,
            "parents": [str(adapter_dir)],
            "base_model": base_name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "library_version": __version__,
            "sha256": weight_hashes(stage),
        })
    adapter.reader.close()
    logger.info("Folded adapter %s into %s", adapter_dir, out_dir)
    return out_dir
