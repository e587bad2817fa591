"""LoRA adapters (SPEC 2.5), laid out like a PEFT tuner: `math` (scale, stack, compress, one module's merge),
`compat` (which PEFT options merge exactly; the rest is refused), `io` (adapter files), `merge` (the adapter
strategy of the merge pipeline) and `fold` (adapter -> full weights).

Importing this package is cheap; the submodules load torch/PEFT when used."""

from __future__ import annotations

__all__ = ["fold_adapter"]


def __getattr__(name: str):
    if name == "fold_adapter":
        from .fold import fold_adapter

        return fold_adapter
    raise AttributeError(f"module 'recall_hf.lora' has no attribute {name!r}")
