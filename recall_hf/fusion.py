"""Layer-wise parameter fusion (SPEC 2.5): `theta[p] = sum_k w[k, layer(p)] * theta_k[p]`, streamed per tensor."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .layers import LayerMap
from .safetensors_io import DTYPE_NAMES, DTYPES, CheckpointReader, StreamingWriter

logger = logging.getLogger(__name__)


def fuse_tensor(tensors: list[torch.Tensor], weights: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """Weighted sum of same-shaped tensors accumulated in fp32; raises on NaN/Inf naming the tensor.

    Args:
        tensors: one tensor per model (any float dtype).
        weights: `[K]` weights (convex in RECALL, but any real weights are accepted).
        name: the parameter's name, used in errors.

    Returns:
        The fp32 fused tensor (the caller casts it to the stored dtype).
    """
    if len(tensors) != len(weights):
        raise ValueError(f"{name}: {len(tensors)} tensors but {len(weights)} weights.")
    out = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for t, w in zip(tensors, weights.tolist()):
        if t.shape != out.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from {tuple(out.shape)}.")
        if w != 0.0:
            out.add_(t.to(torch.float32), alpha=w)
    if not torch.isfinite(out).all():
        raise ValueError(f"Merged tensor {name!r} has NaN/Inf values; check the input models' weights.")
    return out


def check_compatible(readers: list[CheckpointReader]) -> None:
    """Every model must hold the same tensor names with the same shapes (dtypes may differ)."""
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


def output_dtypes(reader: CheckpointReader, dtype: str | None) -> dict[str, str]:
    """Per-tensor output dtype: the newest model's stored dtype, or `dtype` for float tensors when given."""
    target = DTYPE_NAMES[getattr(torch, dtype)] if dtype else None
    return {n: (target if target and i.is_float else i.dtype) for n, i in reader.tensors.items()}


def fuse_checkpoints(
    readers: list[CheckpointReader],
    layer_map: LayerMap,
    weights: torch.Tensor,
    out_dir: Path,
    dtype: str | None = None,
    max_shard_size: int = 5_000_000_000,
    progress: bool = True,
) -> dict[str, int]:
    """Stream-fuse the models' tensors into `out_dir` (an existing staging dir).

    Float tensors are fused with their layer's weights; non-float tensors (counters, ids) are copied from the
    newest (last) model. Peak memory is about one tensor per input model.

    Returns:
        Counts: `{"tensors": ..., "fused": ..., "copied": ..., "bytes": ...}`.
    """
    check_compatible(readers)
    newest = readers[-1]
    if weights.shape != (layer_map.num_layers + 1, len(readers)):
        raise ValueError(f"weights shape {tuple(weights.shape)} != ({layer_map.num_layers + 1}, {len(readers)}).")
    infos = list(newest.tensors.values())
    layers = {i.name: layer_map.layer_of(i.name) for i in infos}  # validates every name before any write
    dtypes = output_dtypes(newest, dtype)
    writer = StreamingWriter(out_dir, infos, dtypes, max_shard_size)
    fused = copied = 0
    try:
        for info in tqdm(infos, desc="Fusing tensors", unit="tensor", disable=not progress):
            if info.is_float:
                tensors = [r.get(info.name) for r in readers]
                out = fuse_tensor(tensors, weights[layers[info.name]], info.name).to(DTYPES[dtypes[info.name]])
                fused += 1
            else:
                out = newest.get(info.name)
                copied += 1
            writer.write(info.name, out)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        for r in readers:
            r.close()
    return {"tensors": len(infos), "fused": fused, "copied": copied, "bytes": writer.bytes_written}
