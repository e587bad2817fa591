"""Which PEFT LoRA adapters recall-hf merges exactly, and which it refuses (before any output is written).

The merge is exact for updates `s * B @ A` on the original base weights (SPEC 2.5). An adapter_config.json option
that changes what the saved factors mean is refused with the reason, never merged approximately; an option not known
here is refused too, so a new PEFT variant cannot slip through.
"""

from __future__ import annotations

from pathlib import Path

from ..modeldir import ADAPTER_CONFIG
from .io import Adapter, read_adapter, read_adapter_config

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


def common_base(adapters: list[Adapter]) -> str:
    """The one base model all adapters name in `base_model_name_or_path` (local paths compared resolved)."""
    names = [ad.config.get("base_model_name_or_path") for ad in adapters]
    if any(not n for n in names):
        missing = next(ad.dir for ad, n in zip(adapters, names) if not n)
        raise ValueError(f"{missing / ADAPTER_CONFIG} has no base_model_name_or_path; pass the base model "
                         "directory with --base.")
    resolved = {str(Path(n).resolve()) if Path(n).is_dir() else n for n in names}
    if len(resolved) > 1:
        raise ValueError(f"The adapters were trained on different bases {sorted(set(names))}; merge adapters of "
                         "one base, or pass --base if they really share it.")
    return names[-1]


def check_full_tensors(adapters: list[Adapter]) -> None:
    """`modules_to_save` tensors in every adapter with one shape; saved base layers with one shape where saved."""
    newest = adapters[-1]
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


def check_module_shapes(adapters: list[Adapter]) -> None:
    """Every adapted module has one input/output shape across the adapters (ranks may differ)."""
    shapes: dict[str, tuple[tuple, tuple, Path]] = {}
    for ad in adapters:
        for module, m in ad.modules.items():
            a, b = ad.reader.tensors[m.a_key].shape, ad.reader.tensors[m.b_key].shape
            io = (a[1:], (b[0],) + b[2:])
            if module in shapes and shapes[module][:2] != io:
                raise ValueError(f"Module {module!r}: input/output shape {io} in {ad.dir} but {shapes[module][:2]} in "
                                 f"{shapes[module][2]}; the adapters do not fit one base.")
            shapes.setdefault(module, (*io, ad.dir))


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
    base = str(base) if base is not None else common_base(adapters)
    check_full_tensors(adapters)
    check_module_shapes(adapters)
    return base


def load_adapter(adapter_dir: Path) -> Adapter:
    """Read and validate one adapter: config options (refusing inexact ones), files, factor shapes, ranks, scales."""
    cfg = read_adapter_config(adapter_dir)
    check_lora_config(cfg, adapter_dir)
    return read_adapter(adapter_dir, cfg)
