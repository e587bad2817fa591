"""The full-model merge strategy (SPEC 2.5): validated safetensors checkpoints, streamed layer-wise fusion."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .calibrate import endpoint_pass
from .compat import check_compatible, check_layers_mapped, check_same_architecture
from .config import RecallConfig
from .fingerprint import collect_fingerprints
from .fusion import fuse_checkpoints
from .hub import input_labels
from .layers import LayerMap
from .modeldir import copy_aux_files
from .models import load_config, load_tokenizer
from .representations import model_representations
from .safetensors_io import CheckpointReader
from .samples import select_typical_samples
from .weights import task_vector_coefficients


def check_base(base: Path | None, config: RecallConfig) -> None:
    """`base` is given exactly when `fusion="task_vector"` needs it (adapter merges have their own rule)."""
    task_vector = config.fusion == "task_vector"
    if base is not None and not task_vector and not config.calibrate:  # calibrate: --base is P, the from-base form
        raise ValueError(
            "--base is for adapter merges and --fusion task_vector; with convex fusion of full models "
            "list the base among the models."
        )
    if task_vector and base is None:
        raise ValueError(
            "Fusion task_vector needs the common base model the task models were fine-tuned from: "
            "pass base=DIR (--base DIR)."
        )
    if base is not None and not base.is_dir():
        raise ValueError(f"Base model directory {base} does not exist.")


def task_vector_fusion(coefficients: torch.Tensor, task_counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fusion weights over `[base, model_1..K]` for `theta = (1 - sum_k c_k) theta_base + sum_k c_k theta_k`.

    Returns:
        `(fusion_weights [L+1, K+1], c [L+1, K])`.
    """
    c = task_vector_coefficients(coefficients, task_counts)
    return torch.cat([1.0 - c.sum(-1, keepdim=True), c], dim=-1), c


class FullMerge:
    """Full Hugging Face model directories (config.json + safetensors), validated when constructed."""

    kind = "full"

    def __init__(self, dirs: list[Path], base: Path | None, config: RecallConfig):
        check_base(base, config)
        self.dirs, self.base, self.config = dirs, base, config
        configs = [load_config(d) for d in dirs]
        check_same_architecture(configs, dirs)
        self.readers = [CheckpointReader(d) for d in dirs]
        if base is not None:
            check_same_architecture([load_config(base), configs[-1]], [base, dirs[-1]])
            self.readers.insert(0, CheckpointReader(base))
        check_compatible(self.readers)
        self.layer_map = LayerMap.from_config(configs[-1])
        check_layers_mapped(self.layer_map, self.readers[-1])
        self.num_layers = self.layer_map.num_layers
        self.hashed_dirs = ([base] if base is not None else []) + dirs
        self.tokenizer = load_tokenizer(dirs[-1])
        self.endpoints = None  # calibrate: D's and N's fingerprint scores, measured with the representations

    def typical_samples(self, texts: list[str], config: RecallConfig, progress: bool) -> list[str]:
        picks = select_typical_samples(texts, self.dirs[-1], self.tokenizer, config, progress)
        return [s["text"] for s in picks]

    def representations(self, texts: list[str], config: RecallConfig, progress: bool) -> list[torch.Tensor]:
        """Each input's `[L+1, n, H]` on `texts`; a calibrated merge of the new task's own typical samples takes them
        from the replays that score both endpoints (`calibrate.endpoint_pass`, kept in `self.endpoints`)."""
        if config.calibrate:
            fused = endpoint_pass(self.dirs, texts, self.tokenizer, collect_fingerprints(*self.hashed_dirs),
                                  config.max_length, config.batch_size, config.device)
            if fused is not None:
                reps, self.endpoints = fused
                return reps
        return [
            model_representations(d, texts, self.tokenizer, config.batch_size, config.max_length, config.device,
                                  config.device_map, progress, desc=f"Representations {label}")
            for d, label in zip(self.dirs, input_labels(self.dirs))  # distinct even when two share a folder name
        ]

    def write(self, stage: Path, coefficients: torch.Tensor, task_counts: list[int], progress: bool) -> dict:
        """Fuse the checkpoints into `stage` with per-layer `coefficients`, then the newest model's other files."""
        fusion_weights, c = coefficients, None
        if self.base is not None:  # task_vector: the base enters as an extra model
            fusion_weights, c = task_vector_fusion(coefficients, task_counts)
        stats = fuse_checkpoints(self.readers, self.layer_map, fusion_weights.float(), stage, self.config.dtype,
                                 self.config.max_shard_size, progress)
        if c is not None:
            stats["base"] = str(self.base)
            stats["task_vector_coefficients"] = c.tolist()
        self._write_aux(stage)
        return stats

    def write_fused(self, stage: Path, inputs: list[Path], fusion_weights: torch.Tensor, progress: bool) -> dict:
        """Fuse with weights over `inputs` as given (a calibrated fold: `[D, N]`, or `[P, D, N]` with P = base)."""
        if [Path(p).resolve() for p in inputs] != [Path(r.dir).resolve() for r in self.readers]:
            raise RuntimeError(f"Fusion inputs {inputs} are not this merge's readers.")
        stats = fuse_checkpoints(self.readers, self.layer_map, fusion_weights.float(), stage, self.config.dtype,
                                 self.config.max_shard_size, progress)
        self._write_aux(stage)
        return stats

    def _write_aux(self, stage: Path) -> None:
        """The newest model's config, tokenizer and other files, with the output dtype."""
        copy_aux_files(self.dirs[-1], stage)
        if self.config.dtype:
            cfg_path = stage / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["dtype"] = self.config.dtype
            cfg.pop("torch_dtype", None)
            cfg_path.write_text(json.dumps(cfg, indent=2))

    def close(self) -> None:
        for r in self.readers:
            r.close()
