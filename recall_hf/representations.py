"""Layer-wise hidden representations of probe texts (SPEC 2.2): mean over non-padding tokens of every layer."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from .models import load_backbone

logger = logging.getLogger(__name__)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` (`[B, T, H]`) over positions where `mask` (`[B, T]`) is 1; fp32 result `[B, H]`."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.to(torch.float32) * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


@torch.no_grad()
def pooled_hidden_states(
    model: torch.nn.Module,
    tokenizer: transformers.PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int = 8,
    max_length: int = 256,
    last_only: bool = False,
    progress: bool = False,
    desc: str = "Representations",
) -> torch.Tensor:
    """Mean-pooled hidden states of every layer for `texts`, in the order given.

    Batches group texts of similar token length (each batch pads to its longest text, so mixed lengths would spend
    most of a pass on padding); the pooling ignores padding, so only float rounding depends on the grouping.

    Returns:
        `[L+1, n_texts, hidden]` fp32 on the CPU (`[1, n, hidden]` with `last_only`).
    """
    if not texts:
        raise ValueError("No texts to compute representations for.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out: list[torch.Tensor] = []
    batches = [order[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    for index in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        enc = tokenizer(
            [texts[i] for i in index],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**enc, output_hidden_states=True).hidden_states
        layers = hidden[-1:] if last_only else hidden
        out.append(torch.stack([masked_mean(h, enc["attention_mask"]).cpu() for h in layers]))
    model.train(was_training)
    return torch.cat(out, dim=1)[:, torch.tensor(order).argsort()]


def model_representations(
    model_dir: str | Path,
    texts: list[str],
    tokenizer: transformers.PreTrainedTokenizerBase,
    batch_size: int = 8,
    max_length: int = 256,
    device: str = "cpu",
    device_map: str | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> torch.Tensor:
    """Load one model, compute `[L+1, n, hidden]` representations, and free it before the next model loads."""
    model = load_backbone(model_dir, device, device_map)
    try:
        return pooled_hidden_states(
            model,
            tokenizer,
            texts,
            batch_size,
            max_length,
            progress=progress,
            desc=desc or f"Representations {Path(model_dir).name}",
        )
    finally:
        del model
        gc.collect()
