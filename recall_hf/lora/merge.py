"""The adapter merge strategy (SPEC 2.5): LoRA adapters of one base merged into one LoRA adapter, exactly.

Representations come from the base model with each adapter switched on in turn (one model in memory). Factors are
stacked per module with the module's layer coefficient (`math.merge_factors`); `modules_to_save` tensors and saved
base layers are fused as full tensors.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibrate import CalibrationConfig
from ..config import RecallConfig
from ..fusion import fuse_tensor
from ..hub import hub_id_of, input_labels
from ..layers import LayerMap
from ..modeldir import copy_aux_files
from ..models import has_tokenizer, load_model, load_tokenizer, quiet_transformers, resolve_base
from ..representations import pooled_hidden_states
from ..safetensors_io import DTYPES
from ..samples import select_typical_samples
from ..weights import task_vector_coefficients
from .calibrate import adapter_fold, check_calibrate_adapters
from .compat import check_adapters, load_adapter
from .io import Adapter, base_param_name, merged_adapter_config, write_adapter
from .math import merge_factors


def output_dtype(adapter: Adapter, key: str, config_dtype: str | None) -> torch.dtype:
    if config_dtype:
        return getattr(torch, config_dtype)
    return DTYPES[adapter.reader.tensors[key].dtype]


def base_tensors_for(adapters: list[Adapter], base_state: dict[str, torch.Tensor], keys: list[str]) -> dict:
    """The base model's own weights for saved base layers some adapter did not save (checked for shape)."""
    for key in keys:
        own = base_state.get(base_param_name(key))
        shapes = {tuple(ad.reader.tensors[key].shape) for ad in adapters if key in ad.base_layers}
        if own is None or shapes != {tuple(own.shape)}:
            raise ValueError(f"{key}: saved with shape(s) {sorted(shapes)} but the base model has "
                             f"{None if own is None else tuple(own.shape)}; the adapters do not fit this base "
                             "(resized vocabulary?).")
    return {k: base_state[base_param_name(k)].detach().to("cpu", copy=True) for k in keys
            if any(k not in ad.base_layers for ad in adapters)}


def compression_stats(errors: dict[str, float], max_rank: int) -> dict:
    worst = max(errors, key=errors.get)
    return {
        "max_rank": max_rank,
        "max_rel_error": errors[worst],
        "mean_rel_error": sum(errors.values()) / len(errors),
        "worst_module": worst,
        "compressed_modules": sum(1 for e in errors.values() if e > 0),
    }


class AdapterMerge:
    """PEFT LoRA adapter directories of one base, validated (options, files, shapes, base) when constructed."""

    kind = "adapter"
    endpoints = None  # the adapters' calibrated fold scores both endpoints itself

    def __init__(self, dirs: list[Path], base: str | Path | None, config: RecallConfig):
        self.dirs, self.config = dirs, config
        self.from_base = base is not None  # calibrate: `--base` given means N was trained from the bare base
        self.adapters = [load_adapter(d) for d in dirs]
        base_name = check_adapters(self.adapters, base)
        if config.calibrate:
            check_calibrate_adapters(self.adapters, self.from_base)
        if base is not None and Path(base_name).is_dir():
            base_name = str(Path(base_name).resolve())
        self.base_name = resolve_base(base_name)
        self.hashed_dirs = dirs
        self.tokenizer = load_tokenizer(dirs[-1] if has_tokenizer(dirs[-1]) else self.base_name)
        self.modules = sorted({m for ad in self.adapters for m in ad.modules})
        self.full_keys = list(self.adapters[-1].full)
        self.base_layer_keys = sorted({k for ad in self.adapters for k in ad.base_layers})
        self.names = [f"m{k}" for k in range(len(dirs))]
        self.model = self._load_models()

    def _load_models(self):
        """The base model with every adapter loaded; maps each key to its layer and keeps needed base weights."""
        from peft import PeftModel

        model = load_model(self.base_name, self.adapters[-1].config.get("task_type"), self.config.device,
                           self.config.device_map)
        layer_map = LayerMap.from_model(model)
        self.num_layers = layer_map.num_layers
        self.layers = {m: layer_map.layer_of(m) for m in self.modules}
        self.layers.update({k: layer_map.layer_of(k.rsplit(".", 1)[0]) for k in self.full_keys})
        self.layers.update({k: layer_map.layer_of(k.split(".base_layer.", 1)[0]) for k in self.base_layer_keys})
        self.base_tensors = base_tensors_for(self.adapters, model.state_dict(), self.base_layer_keys)
        with quiet_transformers():
            model = PeftModel.from_pretrained(model, self.dirs[0], adapter_name=self.names[0])
            for name, d in zip(self.names[1:], self.dirs[1:]):
                model.load_adapter(d, adapter_name=name)
        return model.eval()

    def typical_samples(self, texts: list[str], config: RecallConfig, progress: bool) -> list[str]:
        self.model.set_adapter(self.names[-1])
        return [s["text"] for s in select_typical_samples(texts, self.model, self.tokenizer, config, progress)]

    def representations(self, texts: list[str], config: RecallConfig, progress: bool) -> list[torch.Tensor]:
        """One `[L+1, n, hidden]` per adapter; the model is freed afterwards (fusion reads only the files)."""
        try:
            reps = []
            for name, label in zip(self.names, input_labels(self.dirs)):  # distinct even when folder names clash
                self.model.set_adapter(name)
                reps.append(pooled_hidden_states(self.model, self.tokenizer, texts, config.batch_size,
                                                 config.max_length, progress=progress,
                                                 desc=f"Representations {label}"))
            return reps
        finally:
            self.model = None
            gc.collect()

    def _merged_factors(self, factor_weights: torch.Tensor, progress: bool) -> tuple[dict, dict, dict]:
        tensors, ranks, errors = {}, {}, {}
        for module in tqdm(self.modules, desc="Merging LoRA modules", unit="module", disable=not progress):
            present = [(ad, ad.modules[module], w) for ad, w in
                       zip(self.adapters, factor_weights[self.layers[module]].tolist()) if module in ad.modules]
            factors = [(ad.reader.get(m.a_key), ad.reader.get(m.b_key)) for ad, m, _ in present]
            A, B, errors[module] = merge_factors(factors, [m.scale for _, m, _ in present],
                                                 [w for _, _, w in present], self.config.max_rank, module)
            newest, m = present[-1][0], present[-1][1]
            tensors[m.a_key] = A.to(output_dtype(newest, m.a_key, self.config.dtype)).contiguous()
            tensors[m.b_key] = B.to(output_dtype(newest, m.b_key, self.config.dtype)).contiguous()
            ranks[module] = A.shape[0]
        return tensors, ranks, errors

    def _fused_full_tensors(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """`modules_to_save` tensors and saved base layers: convex per-layer sums like full weights."""
        tensors = {}
        for key in self.full_keys:
            parts = [ad.reader.get(key) for ad in self.adapters]
            if not self.adapters[-1].reader.tensors[key].is_float:
                tensors[key] = parts[-1].contiguous()
                continue
            fused = fuse_tensor(parts, coefficients[self.layers[key]].float(), key)
            tensors[key] = fused.to(output_dtype(self.adapters[-1], key, self.config.dtype)).contiguous()
        for key in self.base_layer_keys:
            parts = [ad.reader.get(key) if key in ad.base_layers else self.base_tensors[key] for ad in self.adapters]
            owner = next(ad for ad in reversed(self.adapters) if key in ad.base_layers)
            fused = fuse_tensor(parts, coefficients[self.layers[key]].float(), key)
            tensors[key] = fused.to(output_dtype(owner, key, self.config.dtype)).contiguous()
        return tensors

    def write(self, stage: Path, coefficients: torch.Tensor, task_counts: list[int], progress: bool) -> dict:
        """The merged adapter into `stage`: stacked factors, fused full tensors, the newest adapter's other files."""
        # LoRA factors are task vectors already: `task_vector` fusion scales them by c = (w/m)/max(w/m) instead of w.
        factor_weights = coefficients
        if self.config.fusion == "task_vector":
            factor_weights = task_vector_coefficients(coefficients, task_counts)
        return self._write(stage, factor_weights, coefficients, progress)

    def write_fused(self, stage: Path, inputs: list[Path], fusion_weights: torch.Tensor, progress: bool) -> dict:
        """The merged adapter with per-layer weights over `inputs` as given (a calibrated fold: `[D, N]`), used for
        the factors and the full tensors alike."""
        if [Path(p).resolve() for p in inputs] != [Path(d).resolve() for d in self.dirs]:
            raise RuntimeError(f"Fusion inputs {inputs} are not this merge's adapters.")
        return self._write(stage, fusion_weights, fusion_weights, progress)

    def calibrated_fold(self, fingerprints: dict, new_task: str | None, profile, config: CalibrationConfig):
        """The calibrated fold of the newest adapter into the deployed one (`lora.calibrate.adapter_fold`) on the
        bare base, loaded afresh in fp32 (the planning model has adapters' saved base layers written into it)."""
        t = time.perf_counter()
        model = load_model(self.base_name, self.adapters[-1].config.get("task_type"), config.device)
        load = time.perf_counter() - t
        fold = adapter_fold(model, self.adapters[-2], self.adapters[-1], fingerprints, new_task, self.from_base,
                            profile, config)
        fold.report["timings"] = {"load_base": load, **fold.report["timings"]}
        fold.report["timings"]["total"] += load
        return fold

    def _write(self, stage: Path, factor_weights: torch.Tensor, full_weights: torch.Tensor, progress: bool) -> dict:
        tensors, ranks, errors = self._merged_factors(factor_weights, progress)
        tensors.update(self._fused_full_tensors(full_weights))
        to_save = list(dict.fromkeys(m for ad in self.adapters for m in (ad.config.get("modules_to_save") or [])))
        copy_aux_files(self.dirs[-1], stage)
        # Written after the copy: the newest adapter's config must not survive in the output.
        base_id = hub_id_of(self.base_name) or self.base_name  # a Hub id, not a cache path, for a base from the Hub
        write_adapter(stage, tensors, merged_adapter_config(self.adapters[-1].config, ranks, to_save, base_id))
        stats = {
            "modules": len(self.modules),
            "modules_to_save_tensors": len(self.full_keys),
            "saved_base_layers": len(self.base_layer_keys),
            "rank_max": max(ranks.values()),
            "rank_min": min(ranks.values()),
            "input_ranks": [sorted({m.rank for m in ad.modules.values()}) for ad in self.adapters],
            "partial_modules": sum(1 for m in self.modules if any(m not in ad.modules for ad in self.adapters)),
        }
        if self.config.max_rank is not None:
            stats["compression"] = compression_stats(errors, self.config.max_rank)
        return stats

    def close(self) -> None:
        self.model = None
        for ad in self.adapters:
            ad.reader.close()


def adopt_adapter(src: Path, stage: Path, max_rank: int | None, dtype: str | None = None) -> dict:
    """One adapter deployed on its own (the first task on a bare base: RECALL gives a 0-task model weight 0): the same
    `B @ A` per module at scale 1, or compressed by truncated SVD to `max_rank` in every module whose rank is above it.

    Returns:
        Stats like `AdapterMerge.write`'s: ranks, and `compression` when `max_rank` is set.
    """
    adapter = load_adapter(src)
    try:
        tensors, ranks, errors = {}, {}, {}
        for module, m in adapter.modules.items():
            a, b = adapter.reader.get(m.a_key), adapter.reader.get(m.b_key)
            A, B, errors[module] = merge_factors([(a, b)], [m.scale], [1.0], max_rank, module)
            tensors[m.a_key] = A.to(output_dtype(adapter, m.a_key, dtype)).contiguous()
            tensors[m.b_key] = B.to(output_dtype(adapter, m.b_key, dtype)).contiguous()
            ranks[module] = A.shape[0]
        for key in adapter.full + adapter.base_layers:
            tensors[key] = adapter.reader.get(key).contiguous()
        copy_aux_files(src, stage)
        to_save = adapter.config.get("modules_to_save") or []
        base_id = adapter.config.get("base_model_name_or_path") or ""
        write_adapter(stage, tensors, merged_adapter_config(adapter.config, ranks, to_save, base_id))
    finally:
        adapter.reader.close()
    stats = {"modules": len(ranks), "rank_max": max(ranks.values()), "rank_min": min(ranks.values()),
             "input_ranks": [sorted({m.rank for m in adapter.modules.values()})]}
    if max_rank is not None:
        stats["compression"] = compression_stats(errors, max_rank)
    return stats
