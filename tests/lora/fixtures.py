"""Shared LoRA fixtures (a pytest plugin the LoRA test modules load with `pytest_plugins`, session scope: the tiny
bases and adapters are built once): tiny bases, seeded adapters, PEFT's own deltas as ground truth."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import PROBES
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from recall_hf import RecallConfig, recall_merge
from recall_hf.tiny import build_tiny_model

TEXTS = PROBES
# A small temperature so the per-layer weights clearly differ between layers (a wrong layer index shows).
CONFIG = dict(tau=0.5, batch_size=8, max_length=32)
BLOCK_INDEX = re.compile(r"\.(?:layers|h|layer)\.(\d+)\.")


def load_base(base_dir: Path) -> torch.nn.Module:
    cfg = transformers.AutoConfig.from_pretrained(base_dir)
    return getattr(transformers, cfg.architectures[0]).from_pretrained(base_dir, dtype=torch.float32).eval()


def make_adapter(base_dir: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    """A LoRA adapter whose factors (and modules_to_save copies) are seeded noise, as after training."""
    model = get_peft_model(load_base(base_dir), LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_A" in name or "lora_embedding_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_bases")
    out = {}
    for arch in ("llama", "gpt2", "bert"):
        build_tiny_model(arch, root / arch, texts=TEXTS, layers=3)
        out[arch] = root / arch
    return out


@pytest.fixture(scope="session")
def llama_adapters(bases, tmp_path_factory):
    """a, b: r=4 on q/v; c: r=8 rsLoRA with rank/alpha patterns and modules a and b lack (o_proj, embeddings)."""
    root, base = tmp_path_factory.mktemp("llama_adapters"), bases["llama"]
    common = dict(task_type="CAUSAL_LM", lora_dropout=0.0)
    return {
        "a": make_adapter(base, root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **common),
        "b": make_adapter(base, root / "b", 2, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], **common),
        "c": make_adapter(base, root / "c", 3, r=8, lora_alpha=16, use_rslora=True,
                          target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"],
                          rank_pattern={"model.layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 4}, **common),
    }


def lora_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Ground truth from PEFT itself: each LoRA module's delta weight (weight layout) as PEFT applies it."""
    model = PeftModel.from_pretrained(load_base(base_dir), adapter_dir)
    return {name: mod.get_delta_weight("default").detach().clone()
            for name, mod in model.named_modules()
            if isinstance(mod, LoraLayer) and ("default" in mod.lora_A or "default" in mod.lora_embedding_A)}


def layer_of(module: str) -> int:
    """Layer of a module, by hand: block i -> i + 1, embeddings -> 0 (independent of recall_hf.layers)."""
    if module.endswith("embed_tokens"):
        return 0
    match = BLOCK_INDEX.search(module)
    assert match, module
    return int(match.group(1)) + 1


def expected_deltas(base_dir: Path, adapter_dirs: list[Path], weights: list[list[float]]) -> dict[str, torch.Tensor]:
    """`sum_k w[layer, k] * dW_k` per module, a module missing from an adapter counting as zero."""
    per_adapter = [lora_deltas(base_dir, d) for d in adapter_dirs]
    out: dict[str, torch.Tensor] = {}
    for k, deltas in enumerate(per_adapter):
        for name, delta in deltas.items():
            out[name] = out.get(name, torch.zeros_like(delta)) + weights[layer_of(name)][k] * delta
    return out


def assert_deltas_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def assert_weights_vary(weights: list[list[float]]) -> None:
    """The test is only meaningful when layers get different weights (a wrong layer index must show)."""
    newest = [row[-1] for row in weights[1:]]
    assert max(newest) - min(newest) > 1e-3, weights


def merge(dirs, out, **cfg):
    return recall_merge(dirs, TEXTS, out, RecallConfig(**{**CONFIG, **cfg}), progress=False)


@pytest.fixture(scope="session")
def llama_unequal(llama_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_unequal") / "merged"
    report = merge([llama_adapters["a"], llama_adapters["c"]], out)
    return out, report
