"""Layer-wise hidden representations of probe texts (SPEC 2.2): mean over non-padding tokens of every layer."""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` (`[B, T, H]`) over positions where `mask` (`[B, T]`) is 1; fp32 result `[B, H]`."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.to(torch.float32) * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def load_tokenizer(model_dir: str | Path) -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer, right-padded, with a pad token (EOS or UNK when the tokenizer has none)."""
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"No usable tokenizer in {model_dir} ({err}); save it next to the weights.") from None
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise ValueError(f"Tokenizer in {model_dir} has no pad, eos or unk token to pad batches with.")
    return tok


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars (an unused head is expected when loading a backbone)."""
    tlog = transformers.utils.logging
    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def load_backbone(model_dir: str | Path, device: str = "cpu", device_map: str | None = None) -> torch.nn.Module:
    """Load the model's backbone (no LM/classification head) in fp32 for forward passes."""
    kwargs = {"dtype": torch.float32}
    if device_map:
        kwargs["device_map"] = device_map
    with quiet_transformers():
        model = transformers.AutoModel.from_pretrained(model_dir, **kwargs)
    if not device_map:
        model.to(device)
    return model.eval()


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
    """Mean-pooled hidden states of every layer for `texts`.

    Returns:
        `[L+1, n_texts, hidden]` fp32 on the CPU (`[1, n, hidden]` with `last_only`).
    """
    if not texts:
        raise ValueError("No texts to compute representations for.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        enc = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**enc, output_hidden_states=True).hidden_states
        layers = hidden[-1:] if last_only else hidden
        out.append(torch.stack([masked_mean(h, enc["attention_mask"]).cpu() for h in layers]))
    model.train(was_training)
    return torch.cat(out, dim=1)


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
