"""Reading and writing PEFT LoRA adapter directories: keys, factors, ranks and scales; the merged adapter's files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..durable import write_json
from ..modeldir import ADAPTER_CONFIG, ADAPTER_STEM
from ..safetensors_io import CheckpointReader
from .math import lora_scale

# PEFT prefixes every saved key with the wrapper path of the base model.
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<epart>lora_embedding_[AB])$"
)


def strip_peft_prefix(key: str) -> str:
    """`base_model.model.x.y` (how PEFT saves keys) -> `x.y` (the base model's own name)."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def pattern_value(patterns: dict, module: str, default):
    """`rank_pattern`/`alpha_pattern` lookup the way PEFT does it: first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraModule:
    """One adapted module of one adapter: its saved key names, rank and scale."""

    a_key: str
    b_key: str
    rank: int
    scale: float


@dataclass
class Adapter:
    """A validated LoRA adapter dir: config, lazy tensors, adapted modules and full tensors.

    `full` are `modules_to_save` parameters; `base_layers` are base weights PEFT saved next to the factors (an adapted
    embedding or `lm_head`, `save_embedding_layers`), which replace the base model's weights when the adapter loads.
    """

    dir: Path
    config: dict
    reader: CheckpointReader
    modules: dict[str, LoraModule] = field(default_factory=dict)
    full: list[str] = field(default_factory=list)
    base_layers: list[str] = field(default_factory=list)


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read {path} ({err}); it must be a PEFT adapter_config.json.") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    return cfg


def is_save_module_tensor(key: str, modules_to_save: list[str]) -> bool:
    """Whether a saved key is a parameter of one of the `modules_to_save` (PEFT saves them under the module's name)."""
    module = strip_peft_prefix(key).rsplit(".", 1)[0]
    return any(module == m or module.endswith("." + m) for m in modules_to_save)


def read_adapter(adapter_dir: Path, cfg: dict) -> Adapter:
    """Read an adapter whose config is checked (`compat.load_adapter`): files, factor shapes, ranks, scales."""
    reader = CheckpointReader(adapter_dir, stem=ADAPTER_STEM)
    adapter = Adapter(dir=adapter_dir, config=cfg, reader=reader)
    modules_to_save = [m for m in (cfg.get("modules_to_save") or []) if isinstance(m, str)]
    parts: dict[str, dict[str, str]] = {}
    for key in reader.tensors:
        match = LORA_KEY.match(key)
        if match:
            module = match.group("module") or match.group("emodule")
            part = (match.group("part") or match.group("epart"))[-1]
            parts.setdefault(module, {})[part] = key
    for key in reader.tensors:
        if LORA_KEY.match(key):
            continue
        if ".base_layer." in key and key.split(".base_layer.", 1)[0] in parts:
            adapter.base_layers.append(key)
        elif is_save_module_tensor(key, modules_to_save):
            adapter.full.append(key)
        else:
            raise ValueError(f"{adapter_dir}: tensor {key!r} is neither a LoRA factor nor part of modules_to_save "
                             f"{modules_to_save}; cannot merge it exactly.")
    r0, alpha0, rslora = cfg.get("r", 8), cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora", False))
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: module {module!r} has lora_{''.join(ab)} but not both factors.")
        a, b = reader.tensors[ab["A"]], reader.tensors[ab["B"]]
        factor_like = len(b.shape) >= 2 and b.shape[1] == a.shape[0] and all(d == 1 for d in b.shape[2:])
        if not (a.is_float and b.is_float and factor_like):
            raise ValueError(f"{adapter_dir}: module {module!r} has lora_A {a.dtype}{a.shape} and lora_B "
                             f"{b.dtype}{b.shape}; expected float factors [r, ...] and [out, r(, 1...)].")
        name = strip_peft_prefix(module)
        rank = pattern_value(cfg.get("rank_pattern"), name, r0)
        if rank != a.shape[0]:
            raise ValueError(f"{adapter_dir}: module {module!r} has rank {a.shape[0]} but adapter_config.json says "
                             f"{rank}; the adapter files are inconsistent.")
        alpha = pattern_value(cfg.get("alpha_pattern"), name, alpha0)
        adapter.modules[module] = LoraModule(ab["A"], ab["B"], rank, lora_scale(alpha, rank, rslora))
    if not adapter.modules:
        raise ValueError(f"{adapter_dir}: {ADAPTER_STEM}.safetensors holds no LoRA factors.")
    return adapter


def base_param_name(key: str) -> str:
    """`base_model.model.x.base_layer.weight` (saved by PEFT) -> the base model's own `x.weight`."""
    return strip_peft_prefix(key).replace(".base_layer.", ".", 1)


def merged_adapter_config(newest: dict, ranks: dict[str, int], modules_to_save: list[str], base: str) -> dict:
    """The output's adapter_config.json: scale 1 in every module, the stacked rank per module, exact targets."""
    names = {strip_peft_prefix(m): r for m, r in ranks.items()}
    r = max(names.values())
    cfg = dict(newest)
    cfg.update({
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {m: k for m, k in sorted(names.items()) if k != r},
        "alpha_pattern": {m: k for m, k in sorted(names.items()) if k != r},
        "use_rslora": False,
        # Exact module names: only modules with merged factors get a LoRA layer.
        "target_modules": sorted(names),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
        "base_model_name_or_path": base,
        "inference_mode": True,
    })
    try:
        import peft

        cfg["peft_version"] = peft.__version__
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    return cfg


def write_adapter(stage: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """The merged adapter's weights and `adapter_config.json` (written after any copied files, so it wins)."""
    save_file(tensors, str(stage / f"{ADAPTER_STEM}.safetensors"), metadata={"format": "pt"})
    write_json(stage / ADAPTER_CONFIG, config)
