"""Which layer every parameter belongs to, found from the module tree, not from one family's names (SPEC 2.5).

Layer 0 is the embedding output, layer l (1..L) the output of block l-1, layer L also holds the final norm and the
heads. The blocks are the one outermost `nn.ModuleList` whose length is `config.num_hidden_layers`; whatever the model
registers before them belongs to layer 0, whatever after them to layer L.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import transformers
from torch import nn


def num_hidden_layers(config: transformers.PretrainedConfig) -> int:
    """`num_hidden_layers` of a (possibly composite) config; a clear error when it has none."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Config of model_type {config.model_type!r} has no num_hidden_layers; cannot map layers.")
    return n


def find_blocks(model: nn.Module, n_layers: int) -> str:
    """Dotted name of the outermost `nn.ModuleList` of length `n_layers` (the transformer blocks)."""
    found = [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n_layers]
    outer = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    if len(outer) != 1:
        raise ValueError(
            f"Expected exactly one ModuleList of {n_layers} blocks in {type(model).__name__}, "
            f"found {outer or 'none'}; RECALL supports single-stack models (decoders or encoders)."
        )
    return outer[0]


@dataclass(frozen=True)
class LayerMap:
    """Maps parameter (or module) names to RECALL layer indices 0..num_layers."""

    blocks: str
    num_layers: int
    before: frozenset[str]
    after: frozenset[str]

    @classmethod
    def from_model(cls, model: nn.Module, n_layers: int | None = None) -> LayerMap:
        if n_layers is None:
            n_layers = num_hidden_layers(model.config)
        blocks = find_blocks(model, n_layers)
        before, after, seen_blocks = set(), set(), False
        for name in model.state_dict().keys():
            if name.startswith(blocks + "."):
                seen_blocks = True
            else:
                (after if seen_blocks else before).add(name)
        return cls(blocks=blocks, num_layers=n_layers, before=frozenset(before), after=frozenset(after))

    @classmethod
    def from_config(cls, config: transformers.PretrainedConfig) -> LayerMap:
        """Build the model class named in `config.architectures` on the meta device (no memory) and map it."""
        from .models import build_on_meta

        return cls.from_model(build_on_meta(config), num_hidden_layers(config))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> LayerMap:
        from .models import load_config

        return cls.from_config(load_config(model_dir))

    def layer_of(self, name: str) -> int:
        """Layer index of a parameter or module name, which may carry a wrapper prefix (PEFT's `base_model.model.`)."""
        marker = self.blocks + "."
        pos = name.find(marker) if not name.startswith(marker) else 0
        if pos == 0 or (pos > 0 and name[pos - 1] == "."):
            rest = name[pos + len(marker) :]
            index = rest.split(".", 1)[0]
            if index.isdigit():
                return int(index) + 1
        candidates = [name] + [name.split(".", i)[-1] for i in range(1, name.count(".") + 1)]
        for cand in candidates:
            for keys, layer in ((self.before, 0), (self.after, self.num_layers)):
                if cand in keys or any(k.startswith(cand + ".") for k in keys):
                    return layer
        raise ValueError(
            f"Parameter {name!r} is neither in the blocks {self.blocks!r} nor a known module of this architecture; "
            "check that all models share one architecture."
        )
