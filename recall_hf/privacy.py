"""What of an output may be published, and what stays private (SPEC 2.6: training text never leaves the deployment).

Typical samples are training text. A merge needs them (they are its probes) and a deployment may keep them, but
never in a file meant for publishing: `recall_report.json` records their sha256, the texts go to
`_recall_private/`. Every private name starts with `_`, the pattern `Trainer.push_to_hub` skips
(`ignore_patterns=["_*", "checkpoint-*"]`); for `hf upload` / `HfApi.upload_folder` pass `PUBLISH_IGNORE`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

PRIVATE_DIR = "_recall_private"
PROBES_NAME = "probes.jsonl"
# The task checkpoint a training run leaves in its output_dir (`RecallCallback(output_subdir=...)`).
TASK_CHECKPOINT_SUBDIR = "_recall_checkpoint"
# Patterns to leave out of an upload (`HfApi.upload_folder(ignore_patterns=PUBLISH_IGNORE)`, `hf upload --exclude`).
PUBLISH_IGNORE = ["_*", "checkpoint-*"]
# Report fields that never go into the published `recall_report.json`: the probes are training text, and the
# output's own path goes stale as soon as the folder is renamed into place, moved or uploaded.
PRIVATE_REPORT_FIELDS = ("probes", "out_dir")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_private_texts(out_dir: Path, texts: list[str], name: str = PROBES_NAME) -> Path:
    """`{"text": ..., "sha256": ...}` per line in `out_dir/_recall_private/name`."""
    path = Path(out_dir) / PRIVATE_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "sha256": text_sha256(t)}) + "\n" for t in texts))
    return path


def publishable_report(report: dict, out_dir: Path) -> dict:
    """The report without training text: probes become their sha256, the texts go to the private folder."""
    probes = [t for t in report.get("probes") or [] if isinstance(t, str)]
    if probes:
        write_private_texts(out_dir, probes)
    public = {k: v for k, v in report.items() if k not in PRIVATE_REPORT_FIELDS}
    public["probe_sha256"] = [text_sha256(t) for t in probes]
    public["private_files"] = f"{PRIVATE_DIR}/ (probe texts; never uploaded: {', '.join(PUBLISH_IGNORE)} skipped)"
    return public


def move_private(out_dir: Path, name: str, folder: str = PRIVATE_DIR) -> None:
    """Move `out_dir/name` (a task's typical samples, its fingerprint) into the private `folder`, when a task
    checkpoint becomes a published model."""
    src = Path(out_dir) / name
    if src.is_file():
        dst = Path(out_dir) / folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.replace(dst)

