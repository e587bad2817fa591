"""Where merge inputs come from: a local directory or a Hugging Face Hub id, as mergekit and PEFT accept.

A Hub id is resolved with `huggingface_hub.snapshot_download`, which works offline (`HF_HUB_OFFLINE=1`) from the
local cache. Inputs are checked here, before any work, for the mistakes people make: a trainer's `output_dir`
instead of the task checkpoint inside it, a path that is neither a folder nor a Hub id.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .errors import first_line
from .modeldir import ADAPTER_CONFIG, read_recall_json

logger = logging.getLogger(__name__)

# Files a merge input needs (weights, configs, tokenizer); a Hub repo's other files (images, ONNX, GGUF) are skipped.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
_CACHE_REPO = re.compile(r"^models--(?P<id>.+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def looks_like_hub_id(name: str) -> bool:
    """`name` or `org/name` made of the characters a Hub repo id allows (not a path that happens to be missing)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def download_hint() -> str:
    from huggingface_hub import constants

    where = f"the local cache {constants.HF_HUB_CACHE}"
    return f"{where} (offline: HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else where


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a Hub model: from the cache, downloading it first when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        reason = first_line(err)
        raise ValueError(f"{repo_id!r} is not a local directory, and as a Hub model id it is not in "
                         f"{download_hint()}: {reason}. Pass a model directory, or download it first "
                         f"(`hf download {repo_id}`).") from None
    logger.info("Hub model %s resolved to %s", repo_id, folder)
    return Path(folder)


def task_checkpoints_inside(folder: Path) -> list[Path]:
    """Sub-folders of `folder` that are RECALL task checkpoints (what a trainer's output_dir holds)."""
    found = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and read_recall_json(child).get("kind") == "task-checkpoint":
            found.append(child)
    return found


def check_model_folder(folder: Path, name: str) -> None:
    """A model (`config.json`) or adapter folder; a trainer's output_dir gets pointed to its task checkpoint."""
    if (folder / "config.json").is_file() or (folder / ADAPTER_CONFIG).is_file():
        return
    inside = task_checkpoints_inside(folder)
    if inside:
        raise ValueError(f"{name} holds no model; the task checkpoint is in {inside[0]} (a trainer's output_dir "
                         "keeps it there); pass that folder instead.")
    raise ValueError(f"{name} holds no model: neither config.json nor {ADAPTER_CONFIG} is in it.")


def resolve_model(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local model or adapter folder for a path or a Hub id, checked to hold a model.

    Args:
        name_or_path: a local directory, or a Hub model id (`org/name`) resolved from the cache or downloaded.
        revision: the Hub revision (branch, tag or commit) for a Hub id.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_model_folder(path, str(name_or_path))
        return path
    if path.exists():
        raise ValueError(f"{name_or_path} is a file; pass a model or adapter directory.")
    if not looks_like_hub_id(str(name_or_path)):
        raise ValueError(f"Model directory {name_or_path} does not exist (and it is not a Hub model id).")
    folder = resolve_hub_id(str(name_or_path), revision)
    check_model_folder(folder, f"Hub model {name_or_path}")
    return folder


def resolve_models(names: list[str | Path]) -> list[Path]:
    return [resolve_model(n) for n in names]


def hub_id_of(name_or_path: str | Path | None) -> str | None:
    """The Hub id a model came from: the id itself, or the repo of a cache snapshot path; `None` for local models."""
    if name_or_path is None:
        return None
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists():
        return text if looks_like_hub_id(text) else None
    for part in path.absolute().parts:
        match = _CACHE_REPO.match(part)
        if match:
            return match.group("id").replace("--", "/", 1)
    return None


def cached_blob_sha256(path: Path) -> str | None:
    """The sha256 of a Hub cache file for free: LFS blobs are stored under their sha256."""
    if path.is_symlink():
        name = Path(path.resolve()).name
        if _SHA256.match(name) and "blobs" in path.resolve().parts:
            return name
    return None


def input_labels(paths: list[str | Path]) -> list[str]:
    """Short distinct names for inputs (progress bars, plots): the Hub id of a cache snapshot, else the folder name,
    with as many parent folders as it takes to tell inputs apart (two `_recall_checkpoint` folders)."""
    full = [hub_id_of(p) if hub_id_of(p) and Path(p).exists() else None for p in paths]
    parts = [Path(p).absolute().parts for p in paths]
    depth = 1
    while True:
        labels = [f or str(Path(*ps[-depth:])) for f, ps in zip(full, parts)]
        if len(set(labels)) == len(labels) or depth >= max(len(ps) for ps in parts):
            return labels
        depth += 1
