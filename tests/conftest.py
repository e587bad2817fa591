"""Shared fixtures: tiny models built from config (no hub access)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from recall_hf.tiny import build_tiny_model  # noqa: E402

PROBES = [
    "the movie was good and the acting was great",
    "this email is spam buy now",
    "a bad review of a bad movie",
    "answer yes or no to the question",
    "the task is to label the text",
    "positive feelings about the film",
]


def perturb(model: torch.nn.Module, match: str, scale: float = 0.5, seed: int = 1) -> None:
    """Add seeded noise to every parameter whose name contains `match` (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if match in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


BLOCK_PREFIX = {"llama": "layers.", "qwen2": "layers.", "gpt2": "h.", "bert": "layer."}


@pytest.fixture(scope="session")
def model_pair(tmp_path_factory):
    """Per architecture, a base dir and a copy whose last block was perturbed: `{arch: (dir_a, dir_b)}`."""
    root = tmp_path_factory.mktemp("pairs")
    pairs = {}
    for arch in ("llama", "qwen2", "gpt2", "bert"):
        a, b = root / f"{arch}_a", root / f"{arch}_b"
        model, tok = build_tiny_model(arch, a, texts=PROBES)
        perturb(model, BLOCK_PREFIX[arch] + "3.", scale=0.5)
        model.save_pretrained(b)
        tok.save_pretrained(b)
        pairs[arch] = (a, b)
    return pairs


@pytest.fixture
def probes() -> list[str]:
    return list(PROBES)


def copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst
