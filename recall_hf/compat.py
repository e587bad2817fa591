"""Can these full models be merged: one architecture, one layer count, the same tensors with the same shapes.

Every check runs on configs and safetensors headers only, before any output is written (the daemon's drop
validation uses the same functions). LoRA adapters have their own rules in `recall_hf.lora.compat`.
"""

from __future__ import annotations

from pathlib import Path

import transformers

from .layers import LayerMap, num_hidden_layers
from .safetensors_io import FLOAT8, CheckpointReader

ARCHITECTURE_KEYS = ("model_type", "hidden_size", "vocab_size")


def check_distinct_dirs(dirs: list[Path]) -> None:
    """No folder is given twice, however spelled (`M`, `./M`, `M/`, a symlink to `M`): paths compare resolved."""
    seen: dict[Path, Path] = {}
    for d in dirs:
        real = d.resolve()
        if real in seen:
            raise ValueError(f"{d} and {seen[real]} are the same folder ({real}); give each model once.")
        seen[real] = d


def check_same_architecture(configs: list[transformers.PretrainedConfig], dirs: list[Path]) -> None:
    """Every config has the newest (last) one's model type, hidden size, vocabulary and layer count."""
    ref, ref_dir = configs[-1], dirs[-1]
    for cfg, d in zip(configs[:-1], dirs[:-1]):
        for key in ARCHITECTURE_KEYS:
            a, b = getattr(cfg, key, None), getattr(ref, key, None)
            if a != b:
                raise ValueError(
                    f"{d} has {key}={a!r} but {ref_dir} has {b!r}; merge only models of one architecture."
                )
        if num_hidden_layers(cfg) != num_hidden_layers(ref):
            raise ValueError(f"{d} has {num_hidden_layers(cfg)} layers but {ref_dir} has {num_hidden_layers(ref)}.")


def check_compatible(readers: list[CheckpointReader]) -> None:
    """Every model must hold the same tensor names with the same shapes (dtypes may differ), none float8."""
    check_not_float8(readers)
    ref = readers[-1]
    for r in readers[:-1]:
        missing, extra = set(ref.tensors) - set(r.tensors), set(r.tensors) - set(ref.tensors)
        if missing or extra:
            example = sorted(missing or extra)[0]
            raise ValueError(
                f"{r.dir} and {ref.dir} hold different tensors (e.g. {example!r}); "
                "merge only models of one architecture."
            )
        for name, info in ref.tensors.items():
            if r.tensors[name].shape != info.shape:
                raise ValueError(
                    f"Tensor {name!r} is {r.tensors[name].shape} in {r.dir} but {info.shape} in "
                    f"{ref.dir}; the architectures differ."
                )


def check_not_float8(readers: list[CheckpointReader]) -> None:
    """Float8 weights are quantized: each comes with scales, and averaging values and scales apart is wrong."""
    for r in readers:
        found = sorted({i.dtype for i in r.tensors.values() if i.dtype in FLOAT8})
        if found:
            raise ValueError(f"{r.dir} holds float8 tensors ({', '.join(found)}): quantized weights cannot be merged "
                             "exactly; merge the bfloat16/float16 models and quantize the result.")


def check_layers_mapped(layer_map: LayerMap, reader: CheckpointReader) -> None:
    """Every tensor of the checkpoint belongs to a RECALL layer (raises naming the first that does not)."""
    for name in reader.tensors:
        layer_map.layer_of(name)
