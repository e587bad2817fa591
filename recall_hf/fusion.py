"""Layer-wise parameter fusion (SPEC 2.5): `theta[p] = sum_k w[k, layer(p)] * theta_k[p]`, streamed per tensor."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .layers import LayerMap
from .safetensors_io import DTYPE_NAMES, DTYPES, FLOAT8, CheckpointReader, StreamingWriter

logger = logging.getLogger(__name__)


def _accumulate(out: torch.Tensor, t: torch.Tensor, w: float, first: bool) -> None:
    """`out = w * t` (first) or `out += w * t`, in fp32, without temporaries for fp32 inputs."""
    if not first:
        out.add_(t, alpha=w)
    elif t.dtype == torch.float32:
        torch.mul(t, w, out=out)
    else:
        out.copy_(t).mul_(w)


def _check_finite(out: torch.Tensor, name: str) -> None:
    # The sum is one pass with no temporaries; the exact (4-temporary) isfinite test runs only if it overflows.
    if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
        raise ValueError(f"Merged tensor {name!r} has NaN/Inf values; check the input models' weights.")


def fuse_tensor(
    tensors: list[torch.Tensor], weights: torch.Tensor, name: str = "tensor", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted sum of same-shaped tensors accumulated in fp32; raises on NaN/Inf naming the tensor.

    Args:
        tensors: one tensor per model (any float dtype).
        weights: `[K]` weights (convex in RECALL, but any real weights are accepted).
        name: the parameter's name, used in errors.
        out: optional fp32 tensor of the same shape to write into (reused scratch memory).

    Returns:
        The fp32 fused tensor (the caller casts it to the stored dtype).
    """
    if len(tensors) != len(weights):
        raise ValueError(f"{name}: {len(tensors)} tensors but {len(weights)} weights.")
    if out is None:
        out = torch.empty(tensors[0].shape, dtype=torch.float32)
    first = True
    for t, w in zip(tensors, weights.tolist()):
        if t.shape != out.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from {tuple(out.shape)}.")
        if w != 0.0:
            _accumulate(out, t, w, first)
            first = False
    if first:
        out.zero_()
    _check_finite(out, name)
    return out


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
    chunk_elements: int = 4 * 1024 * 1024,
) -> dict[str, int]:
    """Stream-fuse the models' tensors into `out_dir` (an existing staging dir).

    Float tensors are fused with their layer's weights; non-float tensors (counters, ids) are copied from the
    newest (last) model. Tensors are read with plain reads (no mmap) and fused in flat chunks of `chunk_elements`,
    so peak memory is a few chunk-sized buffers whatever the number or size of the models.

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
    largest = max((i.numel for i in infos if i.is_float), default=0)
    chunk = max(1, min(largest, chunk_elements))
    scratch = torch.empty(chunk, dtype=torch.float32)
    buf = torch.empty(chunk * 8, dtype=torch.uint8)  # room for `chunk` elements of any dtype up to 8 bytes
    fused = copied = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound: one thread is as fast and does not stall on a busy machine

    def fused_chunks(info, row):
        # Large tensors (embeddings) go in flat chunks so memory stays at one chunk, not one tensor.
        for start in range(0, info.numel, chunk):
            count = min(chunk, info.numel - start)
            out, first = scratch[:count], True
            for r, w in zip(readers, row):
                if w != 0.0:
                    _accumulate(out, r.read_into(info.name, buf, start, count), w, first)
                    first = False
            if first:
                out.zero_()
            _check_finite(out, info.name)
            yield out.to(DTYPES[dtypes[info.name]])

    try:
        for info in tqdm(infos, desc="Fusing tensors", unit="tensor", disable=not progress):
            if info.is_float:
                out = fused_chunks(info, weights[layers[info.name]].tolist())
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
        torch.set_num_threads(threads)
        for r in readers:
            r.close()
    return {"tensors": len(infos), "fused": fused, "copied": copied, "bytes": writer.bytes_written}
