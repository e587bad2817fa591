"""The calibrated fold of LoRA adapters (SPEC 2.7): the full-model search on the base plus dense adapter deltas.

Inputs: the deployed adapter D and the new adapter N over one base B. Candidates are per-layer coefficients `a_l`:

* chain form (no `--base`): `dD + a_l (dN - dD)`, per-layer convex weights `[1 - a_l, a_l]` over `(D, N)`;
* from-base form (`--base` given: N was trained from the bare base): `dD + a_l dN`, weights `[1, a_l]`, plus N as
  it is (`[0, 1]`).

Each candidate is scored like a full model (`calibrate.search_loaded`): a working model holds `B + dD + a_l * dir`
as dense weights and moves in place between candidates (`dir = dN - dD` or `dN`, one dense tensor per adapted
parameter). The chosen weights then go through the exact adapter merge (`AdapterMerge.write_fused`: stacked
factors scaled per layer, the rank cap's truncated SVD when set), so the written adapter is the scored candidate
exactly (or its rank-`max_rank` compression, whose error the report records).

Memory: the base model in fp32 plus one dense delta per adapted parameter (at most a second model). Adapted layers
must be `nn.Linear`, transformers' `Conv1D` or `nn.Embedding` (PEFT's LoRA on convolutions is refused here);
`modules_to_save` and saved base layers are folded as full tensors in the chain form only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..calibrate import (
    CalibratedFold,
    CalibrationConfig,
    build_objective,
    check_profile,
    chosen_coefficients,
    fold_report,
    merge_weights,
    search_loaded,
)
from ..fingerprint import Fingerprint
from ..layers import LayerMap
from .io import Adapter, base_param_name, strip_peft_prefix
from .math import as_matrices

TRANSPOSED = ("Embedding", "Conv1D")  # layers whose weight is `(B @ A)^T` (PEFT's fan_in_fan_out / embeddings)


def check_calibrate_adapters(adapters: list[Adapter], from_base: bool) -> None:
    """Refuse, before any work, what the adapter fold does not cover: full tensors in the from-base form."""
    if from_base and any(ad.full or ad.base_layers for ad in adapters):
        raise ValueError("calibrate with --base (the from-base form) does not fold adapters with modules_to_save or "
                         "saved base layers yet; merge them without --base (the chain form) or with --no-calibrate.")


def lora_delta(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float, name: str) -> torch.Tensor:
    """The dense update `scale * B @ A` of one LoRA module in its layer's weight layout (fp32)."""
    kind = type(layer).__name__
    if not isinstance(layer, nn.Linear) and kind not in TRANSPOSED:
        raise ValueError(f"calibrate: module {name!r} is a {kind}; the calibrated fold of adapters supports LoRA on "
                         "Linear, Conv1D and Embedding layers only (merge with --no-calibrate).")
    a, b = as_matrices(A.float(), B.float())
    delta = (b @ a) * float(scale)
    if kind in TRANSPOSED:
        delta = delta.T
    weight = layer.weight
    if tuple(delta.shape) != tuple(weight.shape):
        raise ValueError(f"calibrate: module {name!r} gives an update of shape {tuple(delta.shape)} for a weight of "
                         f"shape {tuple(weight.shape)}; the adapter does not fit this base.")
    return delta.to(weight.device)


def full_tensor_name(key: str, adapter: Adapter) -> str:
    """The base model's parameter a saved full tensor replaces (a saved base layer or a `modules_to_save` copy)."""
    return base_param_name(key) if key in adapter.base_layers else strip_peft_prefix(key)


def adapter_deltas(model: nn.Module, adapter: Adapter, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`theta_adapter - theta_base` per parameter of `model` (the bare base) that `adapter` changes, fp32.

    LoRA modules give `s * B @ A` (`lora_delta`); full tensors give their difference to `base` (the base's own
    values of those parameters, read before any delta was applied).
    """
    out: dict[str, torch.Tensor] = {}
    for module, m in adapter.modules.items():
        name = strip_peft_prefix(module)
        layer = model.get_submodule(name)
        out[f"{name}.weight"] = lora_delta(layer, adapter.reader.get(m.a_key), adapter.reader.get(m.b_key), m.scale,
                                           module)
    for key in adapter.full + adapter.base_layers:
        name = full_tensor_name(key, adapter)
        if name not in base:
            raise ValueError(f"calibrate: {key!r} replaces no parameter {name!r} of the base model; the adapter does "
                             "not fit this base.")
        value = adapter.reader.get(key).to(base[name].device, torch.float32)
        if value.shape != base[name].shape:
            raise ValueError(f"calibrate: {key!r} has shape {tuple(value.shape)} but the base's {name!r} has "
                             f"{tuple(base[name].shape)}.")
        delta = value - base[name]  # a saved base layer carries the module's LoRA update on top of it
        out[name] = out[name] + delta if name in out else delta
    return out


def full_tensor_bases(model: nn.Module, adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """Copies of the base parameters the adapters' full tensors replace (before any delta is applied)."""
    params = dict(model.named_parameters())
    names = {full_tensor_name(k, ad) for ad in adapters for k in ad.full + ad.base_layers}
    return {n: params[n].detach().float().clone() for n in names if n in params}


def subtract_into(a: dict[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`a - b` per name (a missing name counts as zero), computed in `a`'s tensors: no third copy."""
    for name, t in b.items():
        a[name] = a[name].sub_(t) if name in a else -t
    return a


@torch.no_grad()
def _add(params: dict[str, nn.Parameter], deltas: Mapping[str, torch.Tensor], alpha: float) -> None:
    for name, d in deltas.items():
        if name not in params:
            raise ValueError(f"calibrate: the adapter changes {name!r}, which is not a parameter of the base model.")
        params[name].add_(d, alpha=alpha)


def adapter_fold(
    model: nn.Module,
    deployed: Adapter,
    new: Adapter,
    fingerprints: Mapping[str, Fingerprint],
    new_task: str | None = None,
    from_base: bool = False,
    profile: list[float] | torch.Tensor | None = None,
    config: CalibrationConfig | None = None,
    weights: Mapping[str, float] | None = None,
) -> CalibratedFold:
    """Search the fold of adapter `new` into adapter `deployed` on `model`, the bare base loaded in fp32.

    Args:
        model: the base model both adapters were trained on (moved in place; it ends as some candidate).
        deployed: the deployed adapter (D).
        new: the new task's adapter (N).
        fingerprints: every folded task's fingerprint and the new task's, by task name.
        new_task: the new task's name (for `CalibrationConfig.new_task_weight`).
        from_base: the from-base form `dD + a_l dN` (N trained from the bare base); else the chain form.
        profile: RECALL's per-layer weight of the newest adapter; `None` skips the profile family.
        config: the search; defaults to `CalibrationConfig()`.
        weights: explicit objective weight per task.

    Returns:
        A `CalibratedFold` whose `weights[l]` are the per-layer merge weights over `inputs = [D, N]` (`[1 - a_l, a_l]`
        chain, `[1, a_l]` from-base, `[0, 1]` for N as it is), for `AdapterMerge.write_fused`.
    """
    config, t0 = config or CalibrationConfig(), time.perf_counter()
    check_calibrate_adapters([deployed, new], from_base)
    tw = build_objective(fingerprints, new_task, config, weights, model)
    layer_map = LayerMap.from_model(model)
    n = layer_map.num_layers + 1
    profile = check_profile(profile, n)
    model.eval()
    params = dict(model.named_parameters())
    bases = full_tensor_bases(model, [deployed, new])
    d_new = adapter_deltas(model, new, bases)
    _add(params, d_new, 1.0)  # the working model holds N
    timings = {"load": time.perf_counter() - t0}

    def deploy(m: nn.Module):
        """N -> D in place; the direction `dN - dD` (chain) or `dN` (from-base) per parameter, with its layer."""
        d_old = adapter_deltas(m, deployed, bases)
        _add(params, d_new, -1.0)
        _add(params, d_old, 1.0)
        direction = d_new if from_base else subtract_into(d_new, d_old)
        direction = {k: v for k, v in direction.items() if torch.count_nonzero(v)}
        return direction, {k: layer_map.layer_of(k) for k in direction}

    found = search_loaded(model, deploy, n, fingerprints, tw, profile, config, from_base, timings)
    timings["total"] = time.perf_counter() - t0
    inputs = [Path(deployed.dir), Path(new.dir)]
    report = fold_report(from_base, inputs, new_task, tw, profile, config, found, timings)
    fold_weights = merge_weights(chosen_coefficients(found[0]), n, from_base)[:, -2:]
    return CalibratedFold(inputs, fold_weights, found[0], report)
