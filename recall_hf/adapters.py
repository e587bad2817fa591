"""LoRA adapter-level RECALL merge (SPEC 2.5): per-layer weighted sums of LoRA updates, kept exact as stacked factors.

For an adapted module, adapter k adds `dW_k = s_k * B_k @ A_k` (`s_k = alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
Merging the full models `W + dW_k` with convex per-layer weights `w_k` gives `W + sum_k w_k dW_k`, and that sum is
exactly `B @ A` with `A = [A_1; A_2; ...]` and `B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]`: a LoRA of rank `r_1 + r_2 + ...`
and scale 1. `compress_lora` optionally brings it down to a target rank by a truncated SVD computed on the small
factors. Anything PEFT can express that this identity does not cover (DoRA, LoRA biases, base-modifying
initialisations, ...) is refused before any output is written, never merged approximately.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import __version__
from .card import write_fold_card
from .checkpoint import (
    ADAPTER_CONFIG,
    NOT_COPIED,
    RECALL_JSON,
    check_output_dir,
    copy_aux_files,
    input_weight_hashes,
    is_weight_file,
    staged_dir,
    task_count,
    weight_hashes,
    write_json,
)
from .config import RecallConfig
from .fusion import fuse_tensor
from .hub import hub_id_of, input_labels, resolve_model
from .layers import LayerMap
from .lineage import resolve_base
from .representations import load_tokenizer, pooled_hidden_states, quiet_transformers
from .safetensors_io import DTYPES, CheckpointReader

if TYPE_CHECKING:
    from .merge import MergeReport

logger = logging.getLogger(__name__)

ADAPTER_STEM = "adapter_model"
# PEFT prefixes every saved key with the wrapper path of the base model.
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<epart>lora_embedding_[AB])$"
)

# adapter_config.json fields that do not change what the saved factors mean.
BENIGN_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
    "ensure_weight_tying", "qalora_group_size",
}
# Fields that switch on a LoRA variant whose update is not `s * B @ A` on the original base weights.
REFUSED_FIELDS = {
    "use_dora": "DoRA (use_dora) rescales the weight by a learned magnitude, which is not a sum of low-rank updates",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "layer_replication": "layer_replication changes the model's layer structure",
    "trainable_token_indices": "trainable_token_indices trains embedding rows outside LoRA",
    "use_qalora": "QALoRA pools the input of lora_A",
    "alora_invocation_tokens": "aLoRA activates the adapter only after invocation tokens",
    "target_parameters": "LoRA on raw nn.Parameters (target_parameters)",
    "megatron_config": "Megatron parallel LoRA layers",
}
# init_lora_weights values after which the adapter applies to a modified base (residual) rather than the original one.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")

TASK_MODEL_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


# ---------------------------------------------------------------------------------------------------------------------
# Pure math on factors.
# ---------------------------------------------------------------------------------------------------------------------


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The scale PEFT multiplies `B @ A` by: `alpha / r`, or `alpha / sqrt(r)` for rsLoRA (arXiv 2312.03732)."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got r={r!r}.")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"LoRA alpha must be a finite number, got lora_alpha={alpha!r}.")
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def stack_lora(
    As: list[torch.Tensor], Bs: list[torch.Tensor], scales: list[float], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack LoRA factors so that `B @ A == sum_k weights[k] * scales[k] * Bs[k] @ As[k]` exactly (fp32).

    Args:
        As: `[r_k, in]` factors, one per adapter (ranks may differ).
        Bs: `[out, r_k]` factors, matching `As`.
        scales: each adapter's LoRA scale `s_k` for this module.
        weights: each adapter's merge weight `w_k` for this module's layer.

    Returns:
        `(A, B)`: fp32 `[sum r_k, in]` and `[out, sum r_k]`, to be used with scale 1.
    """
    n = len(As)
    if n == 0 or not (len(Bs) == len(scales) == len(weights) == n):
        raise ValueError(f"stack_lora needs equally many A, B, scales and weights (>= 1), got "
                         f"{len(As)}, {len(Bs)}, {len(scales)}, {len(weights)}.")
    in_dim, out_dim = As[0].shape[-1], Bs[0].shape[0]
    for k, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"Adapter {k}: A {tuple(a.shape)} and B {tuple(b.shape)} are not [r, in] and [out, r].")
        if a.shape[1] != in_dim or b.shape[0] != out_dim:
            raise ValueError(f"Adapter {k}: A {tuple(a.shape)} / B {tuple(b.shape)} do not match the first adapter's "
                             f"in={in_dim}, out={out_dim}.")
    A = torch.cat([a.to(torch.float32) for a in As], dim=0)
    B = torch.cat([b.to(torch.float32) * (float(w) * float(s)) for b, s, w in zip(Bs, scales, weights)], dim=1)
    return A, B


def compress_lora(A: torch.Tensor, B: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`max_rank` approximation of `B @ A`, computed on the factors (QR of `B` and `A^T`, SVD of the core).

    `B @ A = Qb Rb Ra^T Qa^T`, so the SVD of the small core `Rb Ra^T` gives the SVD of the product without forming
    it (Eckart-Young: truncating it is optimal in Frobenius norm). The kept singular values are split evenly between
    the two factors.

    Returns:
        `(A', B', rel_error)` in the input dtype, with `rel_error = ||B A - B' A'||_F / ||B A||_F`; the inputs and
        `0.0` when their rank is already `<= max_rank`.
    """
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}.")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} are not [r, in] and [out, r].")
    if A.shape[0] <= max_rank:
        return A, B, 0.0
    qb, rb = torch.linalg.qr(B.to(torch.float64))
    qa, ra = torch.linalg.qr(A.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = min(max_rank, s.numel())
    total = s.pow(2).sum()
    rel_error = float((s[k:].pow(2).sum() / total).sqrt()) if total > 0 else 0.0
    root = s[:k].sqrt()
    B_new = (qb @ u[:, :k]) * root
    A_new = root[:, None] * (vh[:k] @ qa.T)
    return A_new.to(A.dtype), B_new.to(B.dtype), rel_error


# ---------------------------------------------------------------------------------------------------------------------
# Reading and validating adapters.
# ---------------------------------------------------------------------------------------------------------------------


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


def check_lora_config(cfg: dict, adapter_dir: Path) -> None:
    """Refuse any adapter whose update is not exactly `s * B @ A` on the original base weights."""
    where = adapter_dir / ADAPTER_CONFIG
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {cfg.get('peft_type')!r}; recall-hf merges only LORA adapters "
                         "(fold other adapter types into full models and merge those).")
    for key, why in REFUSED_FIELDS.items():
        if cfg.get(key):
            raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported: {why}; it cannot be merged exactly. "
                             "Fold the adapter with its own tools and merge the full models instead.")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={cfg['bias']!r} trains biases outside LoRA; only bias='none' can be merged "
                         "exactly. Fold the adapter and merge the full models instead.")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().replace("-", "_").startswith(BASE_MODIFYING_INITS):
        raise ValueError(f"{where}: init_lora_weights={init!r} means the adapter applies to a modified base model; "
                         "save it with path_initial_model_for_weight_conversion (PEFT) or fold it first.")
    unknown = sorted(k for k, v in cfg.items() if k not in BENIGN_FIELDS and k not in REFUSED_FIELDS and v)
    if unknown:
        raise ValueError(f"{where}: option(s) {', '.join(f'{k}={cfg[k]!r}' for k in unknown)} are not known to merge "
                         "exactly as a sum of LoRA updates; refusing rather than merging wrongly.")


def is_save_module_tensor(key: str, modules_to_save: list[str]) -> bool:
    """Whether a saved key is a parameter of one of the `modules_to_save` (PEFT saves them under the module's name)."""
    module = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    module = module.rsplit(".", 1)[0]
    return any(module == m or module.endswith("." + m) for m in modules_to_save)


def load_adapter(adapter_dir: Path) -> Adapter:
    """Read and validate one adapter: config options, file integrity, factor shapes, ranks and scales."""
    cfg = read_adapter_config(adapter_dir)
    check_lora_config(cfg, adapter_dir)
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
        name = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        rank = pattern_value(cfg.get("rank_pattern"), name, r0)
        if rank != a.shape[0]:
            raise ValueError(f"{adapter_dir}: module {module!r} has rank {a.shape[0]} but adapter_config.json says "
                             f"{rank}; the adapter files are inconsistent.")
        alpha = pattern_value(cfg.get("alpha_pattern"), name, alpha0)
        adapter.modules[module] = LoraModule(ab["A"], ab["B"], rank, lora_scale(alpha, rank, rslora))
    if not adapter.modules:
        raise ValueError(f"{adapter_dir}: {ADAPTER_STEM}.safetensors holds no LoRA factors.")
    return adapter


def check_adapters(adapters: list[Adapter], base: str | Path | None) -> str:
    """Same task type, same base (unless `base` is given), same shapes per module and the same full tensors.

    Returns:
        The base model to load (path or hub id).
    """
    newest = adapters[-1]
    task = newest.config.get("task_type")
    for ad in adapters[:-1]:
        if ad.config.get("task_type") != task:
            raise ValueError(f"{ad.dir} has task_type {ad.config.get('task_type')!r} but {newest.dir} has {task!r}; "
                             "merge only adapters of one task type.")
    if base is None:
        names = [ad.config.get("base_model_name_or_path") for ad in adapters]
        if any(not n for n in names):
            missing = next(ad.dir for ad, n in zip(adapters, names) if not n)
            raise ValueError(f"{missing / ADAPTER_CONFIG} has no base_model_name_or_path; pass the base model "
                             "directory with --base.")
        resolved = {str(Path(n).resolve()) if Path(n).is_dir() else n for n in names}
        if len(resolved) > 1:
            raise ValueError(f"The adapters were trained on different bases {sorted(set(names))}; merge adapters of "
                             "one base, or pass --base if they really share it.")
        base = names[-1]
    base = str(base)
    ref_full = sorted(newest.full)
    for ad in adapters[:-1]:
        if sorted(ad.full) != ref_full:
            only = sorted(set(ad.full) ^ set(ref_full))
            raise ValueError(f"modules_to_save tensors {only[:4]} are in only some of the adapters ({ad.dir} vs "
                             f"{newest.dir}); a fully trained module must be present in every adapter to be merged.")
        for key in ref_full:
            if ad.reader.tensors[key].shape != newest.reader.tensors[key].shape:
                raise ValueError(f"{key}: shape {ad.reader.tensors[key].shape} in {ad.dir} but "
                                 f"{newest.reader.tensors[key].shape} in {newest.dir}.")
    saved: dict[str, tuple[tuple, Path]] = {}
    for ad in adapters:
        for key in ad.base_layers:
            shape = ad.reader.tensors[key].shape
            if key in saved and saved[key][0] != shape:
                raise ValueError(f"{key}: shape {shape} in {ad.dir} but {saved[key][0]} in {saved[key][1]}.")
            saved.setdefault(key, (shape, ad.dir))
    shapes: dict[str, tuple[tuple, tuple, Path]] = {}
    for ad in adapters:
        for module, m in ad.modules.items():
            a, b = ad.reader.tensors[m.a_key].shape, ad.reader.tensors[m.b_key].shape
            io = (a[1:], (b[0],) + b[2:])
            if module in shapes and shapes[module][:2] != io:
                raise ValueError(f"Module {module!r}: input/output shape {io} in {ad.dir} but {shapes[module][:2]} in "
                                 f"{shapes[module][2]}; the adapters do not fit one base.")
            shapes.setdefault(module, (*io, ad.dir))
    return base


def resolve_base_dir(base: str) -> str:
    """A clear error when the base model cannot be found (local dir or cached hub id)."""
    if Path(base).is_dir():
        if not (Path(base) / "config.json").is_file():
            raise ValueError(f"Base model directory {base} has no config.json; pass the right directory with --base.")
        return base
    try:
        transformers.AutoConfig.from_pretrained(base)
    except Exception:  # noqa: BLE001 - hub/cache lookups raise many types
        raise ValueError(f"Base model {base!r} (base_model_name_or_path of the adapters) is not a local directory nor "
                         "available offline; pass the base model directory with --base.") from None
    return base


def load_base_model(base: str, task_type: str | None, device: str = "cpu", device_map: str | None = None):
    """The base model in fp32 with the head the adapters' task type expects (else its config's architecture)."""
    config = transformers.AutoConfig.from_pretrained(base)
    cls_name = TASK_MODEL_CLASSES.get(task_type or "")
    arch = (config.architectures or [None])[0]
    if cls_name is None and arch and hasattr(transformers, arch):
        cls_name = arch
    cls = getattr(transformers, cls_name or "AutoModel")
    kwargs = {"dtype": torch.float32}
    if device_map:
        kwargs["device_map"] = device_map
    with quiet_transformers():
        model = cls.from_pretrained(base, **kwargs)
    if not device_map:
        model.to(device)
    return model.eval()


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Merging.
# ---------------------------------------------------------------------------------------------------------------------


def as_matrices(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View factors of any LoRA layer (Linear, Embedding, Conv) as `[r, in]` and `[out, r]` matrices."""
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])


def merge_module(
    adapters: list[Adapter], module: str, weights: list[float], max_rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Stacked (and optionally compressed) factors of one module over the adapters that adapt it."""
    present = [(ad, ad.modules[module], w) for ad, w in zip(adapters, weights) if module in ad.modules]
    tensors = [(ad.reader.get(m.a_key), ad.reader.get(m.b_key)) for ad, m, _ in present]
    a_shape, b_shape = tensors[0][0].shape, tensors[0][1].shape
    mats = [as_matrices(a, b) for a, b in tensors]
    A, B = stack_lora([a for a, _ in mats], [b for _, b in mats], [m.scale for _, m, _ in present],
                      [w for _, _, w in present])
    rel_error = 0.0
    if max_rank is not None:
        A, B, rel_error = compress_lora(A, B, max_rank)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError(f"Merged factors of {module!r} have NaN/Inf values; check the input adapters.")
    rank = A.shape[0]
    return A.reshape(rank, *a_shape[1:]), B.reshape(b_shape[0], rank, *b_shape[2:]), rel_error


def base_param_name(key: str) -> str:
    """`base_model.model.x.base_layer.weight` (saved by PEFT) -> the base model's own `x.weight`."""
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return key.replace(".base_layer.", ".", 1)


def output_dtype(adapter: Adapter, key: str, config_dtype: str | None) -> torch.dtype:
    if config_dtype:
        return getattr(torch, config_dtype)
    return DTYPES[adapter.reader.tensors[key].dtype]


def merged_adapter_config(newest: dict, ranks: dict[str, int], modules_to_save: list[str], base: str) -> dict:
    """The output's adapter_config.json: scale 1 in every module, the stacked rank per module, exact targets."""
    names = {m[len(PEFT_PREFIX):] if m.startswith(PEFT_PREFIX) else m: r for m, r in ranks.items()}
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


def recall_merge_adapters(
    dirs: list[Path],
    probes: str | Path | list[str] | None,
    out_dir: Path,
    config: RecallConfig,
    task_counts: list[int] | None = None,
    base: str | Path | None = None,
    progress: bool = True,
    known_hashes: Mapping[str | Path, Mapping[str, str]] | None = None,
) -> MergeReport:
    """Merge LoRA adapters of one base with RECALL weights into one LoRA adapter (SPEC 2.5).

    Args:
        dirs: adapter directories, oldest first; the last is the newest task's adapter.
        probes: probe texts (list, `.jsonl`/`.txt` path, or `None` for the newest adapter's `recall_samples.jsonl`).
        out_dir: where the merged adapter goes; must not exist (or be empty). Written atomically.
        config: RECALL settings; `config.max_rank` compresses the stacked factors by truncated SVD.
        task_counts: tasks each adapter carries, overriding their `recall.json`.
        base: base model directory (default: the adapters' common `base_model_name_or_path`).
        progress: show progress bars.
        known_hashes: weight-file sha256 already computed by the caller (see `recall_merge`).

    Returns:
        The `MergeReport` (`kind="adapter"`), also saved as `recall_report.json`.
    """
    from peft import PeftModel

    from .merge import MergeReport, compute_weights, resolve_probes, write_outputs
    from .samples import select_typical_samples
    from .weights import task_vector_coefficients

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    check_output_dir(out_dir)
    adapters = [load_adapter(d) for d in dirs]
    base_name = check_adapters(adapters, base)
    if base is not None and Path(base_name).is_dir():
        base_name = str(Path(base_name).resolve())
    base_name = resolve_base_dir(base_name)
    counts = list(task_counts) if task_counts is not None else [task_count(d) for d in dirs]
    if len(counts) != len(dirs):
        raise ValueError(f"Got {len(counts)} task counts for {len(dirs)} adapters.")
    texts = resolve_probes(probes, dirs[-1])
    tokenizer = load_tokenizer(dirs[-1] if has_tokenizer(dirs[-1]) else base_name)
    modules = sorted({m for ad in adapters for m in ad.modules})
    full_keys = list(adapters[-1].full)
    base_layer_keys = sorted({k for ad in adapters for k in ad.base_layers})
    timings["validate"] = time.perf_counter() - t0

    t = time.perf_counter()
    task_type = adapters[-1].config.get("task_type")
    model = load_base_model(base_name, task_type, config.device, config.device_map)
    layer_map = LayerMap.from_model(model)
    layers = {m: layer_map.layer_of(m) for m in modules}
    layers.update({k: layer_map.layer_of(k.rsplit(".", 1)[0]) for k in full_keys})
    layers.update({k: layer_map.layer_of(k.split(".base_layer.", 1)[0]) for k in base_layer_keys})
    # An adapter that did not save an adapted module's base weight uses the base model's own.
    base_state = model.state_dict()
    for key in base_layer_keys:
        own = base_state.get(base_param_name(key))
        shapes = {tuple(ad.reader.tensors[key].shape) for ad in adapters if key in ad.base_layers}
        if own is None or shapes != {tuple(own.shape)}:
            raise ValueError(f"{key}: saved with shape(s) {sorted(shapes)} but the base model has "
                             f"{None if own is None else tuple(own.shape)}; the adapters do not fit this base "
                             "(resized vocabulary?).")
    base_tensors = {k: base_state[base_param_name(k)].detach().to("cpu", copy=True) for k in base_layer_keys
                    if any(k not in ad.base_layers for ad in adapters)}
    del base_state
    names = [f"m{k}" for k in range(len(dirs))]
    with quiet_transformers():
        model = PeftModel.from_pretrained(model, dirs[0], adapter_name=names[0])
        for name, d in zip(names[1:], dirs[1:]):
            model.load_adapter(d, adapter_name=name)
    model.eval()
    timings["load_models"] = time.perf_counter() - t

    try:
        t = time.perf_counter()
        if len(texts) > config.k:
            model.set_adapter(names[-1])
            texts = [s["text"] for s in select_typical_samples(texts, model, tokenizer, config, progress)]
        timings["select_samples"] = time.perf_counter() - t

        t = time.perf_counter()
        reps = []
        for name, label in zip(names, input_labels(dirs)):  # distinct even when two inputs share a folder name
            model.set_adapter(name)
            reps.append(pooled_hidden_states(model, tokenizer, texts, config.batch_size, config.max_length,
                                             progress=progress, desc=f"Representations {label}"))
        timings["representations"] = time.perf_counter() - t
    finally:
        del model
        gc.collect()
    sims, weights = compute_weights(reps, config, counts)
    if weights.shape[0] != layer_map.num_layers + 1:
        raise RuntimeError(f"Got {weights.shape[0]} hidden-state layers, expected {layer_map.num_layers + 1}.")

    t = time.perf_counter()
    hashes = input_weight_hashes(dirs, known_hashes)
    timings["hash_inputs"] = time.perf_counter() - t

    t = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    # LoRA factors are task vectors already: `task_vector` fusion scales them by c = (w/m)/max(w/m) instead of w.
    # Full tensors (modules_to_save heads, saved embeddings) always take the convex weights.
    factor_weights = task_vector_coefficients(weights, counts) if config.fusion == "task_vector" else weights
    for module in tqdm(modules, desc="Merging LoRA modules", unit="module", disable=not progress):
        w = factor_weights[layers[module]].tolist()
        A, B, err = merge_module(adapters, module, w, config.max_rank)
        newest = next(ad for ad in reversed(adapters) if module in ad.modules)
        m = newest.modules[module]
        tensors[m.a_key] = A.to(output_dtype(newest, m.a_key, config.dtype)).contiguous()
        tensors[m.b_key] = B.to(output_dtype(newest, m.b_key, config.dtype)).contiguous()
        ranks[module] = A.shape[0]
        errors[module] = err
    for key in full_keys:
        parts = [ad.reader.get(key) for ad in adapters]
        info = adapters[-1].reader.tensors[key]
        if not info.is_float:
            tensors[key] = parts[-1].contiguous()
            continue
        fused = fuse_tensor(parts, weights[layers[key]].float(), key)
        tensors[key] = fused.to(output_dtype(adapters[-1], key, config.dtype)).contiguous()
    for key in base_layer_keys:
        parts = [ad.reader.get(key) if key in ad.base_layers else base_tensors[key] for ad in adapters]
        owner = next(ad for ad in reversed(adapters) if key in ad.base_layers)
        fused = fuse_tensor(parts, weights[layers[key]].float(), key)
        tensors[key] = fused.to(output_dtype(owner, key, config.dtype)).contiguous()
    timings["fusion"] = time.perf_counter() - t

    stats: dict = {
        "modules": len(modules),
        "modules_to_save_tensors": len(full_keys),
        "saved_base_layers": len(base_layer_keys),
        "rank_max": max(ranks.values()),
        "rank_min": min(ranks.values()),
        "input_ranks": [sorted({m.rank for m in ad.modules.values()}) for ad in adapters],
        "partial_modules": sum(1 for m in modules if any(m not in ad.modules for ad in adapters)),
    }
    if config.max_rank is not None:
        worst = max(errors, key=errors.get)
        stats["compression"] = {
            "max_rank": config.max_rank,
            "max_rel_error": errors[worst],
            "mean_rel_error": sum(errors.values()) / len(errors),
            "worst_module": worst,
            "compressed_modules": sum(1 for e in errors.values() if e > 0),
        }
    report = MergeReport(
        out_dir=str(out_dir), kind="adapter", models=[str(d) for d in dirs], task_counts=counts,
        output_task_count=sum(counts), config=config.to_dict(), probes=texts,
        similarities=sims.tolist(), weights=weights.tolist(), input_hashes=hashes, stats=stats,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    modules_to_save = list(dict.fromkeys(m for ad in adapters for m in (ad.config.get("modules_to_save") or [])))
    with staged_dir(out_dir) as stage:
        t = time.perf_counter()
        save_file(tensors, str(stage / f"{ADAPTER_STEM}.safetensors"), metadata={"format": "pt"})
        copy_aux_files(dirs[-1], stage)
        # Written after the copy: the newest adapter's config must not survive in the output.
        base_id = hub_id_of(base_name) or base_name  # a Hub id, not a cache path, when the base came from the Hub
        out_config = merged_adapter_config(adapters[-1].config, ranks, modules_to_save, base_id)
        write_json(stage / ADAPTER_CONFIG, out_config)
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        report.timings = timings
        write_outputs(stage, report)
    for ad in adapters:
        ad.reader.close()
    logger.info("RECALL merge of %d LoRA adapters written to %s (%.1fs)", len(dirs), out_dir, timings["total"])
    return report


def fold_adapter(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """Fold a LoRA adapter into its base's full weights (PEFT `merge_and_unload`), written atomically.

    The merge runs in fp32 and is cast back to the base's stored dtype. Tokenizer files come from the base, then from
    the adapter directory (which wins). The output's `recall.json` carries the adapter's `task_count`.

    Returns:
        `out_dir`, a normal Hugging Face model directory.
    """
    from peft import PeftModel

    adapter_dir, out_dir = resolve_model(adapter_dir), Path(out_dir)
    base = resolve_base(base, [adapter_dir])
    check_output_dir(out_dir)
    adapter = load_adapter(adapter_dir)
    base_name = resolve_base_dir(check_adapters([adapter], base))
    count = task_count(adapter_dir)
    base_config = transformers.AutoConfig.from_pretrained(base_name)
    stored = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    model = load_base_model(base_name, adapter.config.get("task_type"))
    with quiet_transformers():
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    if isinstance(stored, torch.dtype) and stored.is_floating_point:
        model.to(stored)
    with staged_dir(out_dir) as stage:
        if Path(base_name).is_dir():
            copy_aux_files(Path(base_name), stage)
        for p in sorted(adapter_dir.iterdir()):
            if (p.is_file() and not is_weight_file(p.name) and p.name not in NOT_COPIED and p.name != ADAPTER_CONFIG
                    and not p.name.startswith(".")):
                shutil.copy2(p, stage / p.name)
        with quiet_transformers():
            model.save_pretrained(stage, safe_serialization=True)
        tasks = write_fold_card(stage, adapter_dir, base_name)
        write_json(stage / RECALL_JSON, {
            "kind": "recall-fold-adapter",
            "task_count": count,
            "tasks": tasks,
            "parents": [str(adapter_dir)],
            "base_model": base_name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "library_version": __version__,
            "sha256": weight_hashes(stage),
        })
    adapter.reader.close()
    logger.info("Folded adapter %s into %s", adapter_dir, out_dir)
    return out_dir
