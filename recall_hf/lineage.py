"""Is `--base` the model the inputs were trained from? Each task checkpoint's `recall.json` records its parent's
weight hashes (`parent_sha256`); a base that does not match them is refused before any work, instead of being
written silently into the merged adapter's `base_model_name_or_path`.
"""

from __future__ import annotations

from pathlib import Path

from .hub import cached_blob_sha256
from .modeldir import read_recall_json, sha256_file, weight_file_paths


def model_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of a model's weight files: recorded in its `recall.json`, free for Hub cache blobs, else computed."""
    recorded = read_recall_json(model_dir).get("sha256")
    files = weight_file_paths(model_dir)
    if isinstance(recorded, dict) and set(recorded) == {p.name for p in files}:
        return dict(recorded)
    return {p.name: cached_blob_sha256(p) or sha256_file(p) for p in files}


def trained_from_base(meta: dict) -> bool:
    """Whether a task checkpoint says it was trained from its base itself (adapters always are)."""
    parent, base = meta.get("parent"), meta.get("base")
    return bool(meta.get("parent_sha256")) and (meta.get("weights") == "adapter" or (parent and parent == base))


def base_mismatch(inputs: list[Path], base: Path) -> str | None:
    """A one-line description of the first input whose recorded parent hashes differ from `base`'s, or `None`."""
    mine: dict[str, str] | None = None
    for d in inputs:
        meta = read_recall_json(d)
        if meta.get("kind") != "task-checkpoint" or not trained_from_base(meta):
            continue
        mine = model_hashes(base) if mine is None else mine
        recorded = meta["parent_sha256"]
        if recorded != mine:
            name = next((n for n in sorted(recorded) if recorded[n] != mine.get(n)), sorted(recorded)[0])
            got = (mine.get(name) or "no such file")[:12]
            return (f"--base {base} is not the model {d} was trained from: its recall.json records {name} "
                    f"sha256 {recorded[name][:12]}... (parent {meta.get('parent')}), --base has {got}; pass the "
                    "base the inputs were trained on.")
    return None


def check_lineage(inputs: list[Path], base: str | Path | None) -> None:
    """Raise `ValueError` when a local `base` does not match the parent hashes the inputs recorded."""
    if base is None or not Path(base).is_dir():
        return
    problem = base_mismatch(inputs, Path(base))
    if problem:
        raise ValueError(problem)


def checked_base(base: str | Path | None, inputs: list[Path]) -> Path | None:
    """`--base` as a local folder (a Hub id resolved from the cache), checked against the inputs' recorded parent."""
    if base is None:
        return None
    from .hub import resolve_model

    folder = resolve_model(base)
    check_lineage(inputs, folder)
    return folder
