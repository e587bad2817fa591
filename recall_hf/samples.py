"""Typical samples of a task (SPEC 2.1): cluster the texts' embeddings, keep the text nearest each centroid."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans

from .config import RecallConfig
from .models import load_backbone, load_tokenizer
from .representations import pooled_hidden_states

logger = logging.getLogger(__name__)

SAMPLES_NAME = "recall_samples.jsonl"


def cluster_medoids(embeddings: np.ndarray, k: int, seed: int = 0, minibatch_threshold: int = 5000) -> list[dict]:
    """Cluster `embeddings` (`[n, d]`) into `min(k, n)` groups; per cluster, the index nearest its centroid.

    Returns:
        One `{"index": i, "cluster": c, "cluster_size": n_c}` per non-empty cluster, ordered by cluster.
    """
    n = len(embeddings)
    if n == 0:
        raise ValueError("Cannot select typical samples from zero texts.")
    k = min(k, n)
    if k == n:
        return [{"index": i, "cluster": i, "cluster_size": 1} for i in range(n)]
    algo = MiniBatchKMeans if n >= minibatch_threshold else KMeans
    km = algo(n_clusters=k, random_state=seed, n_init=3).fit(embeddings)
    labels, centers = km.labels_, km.cluster_centers_
    picks = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        dist = np.linalg.norm(embeddings[members] - centers[c], axis=1)
        picks.append({"index": int(members[int(np.argmin(dist))]), "cluster": c, "cluster_size": int(len(members))})
    return picks


def candidate_texts(texts: list[str], max_candidates: int, seed: int) -> list[str]:
    """Unique non-empty texts, subsampled to `max_candidates` with a fixed seed (order kept)."""
    unique = list(dict.fromkeys(t for t in texts if isinstance(t, str) and t.strip()))
    if len(unique) > max_candidates:
        keep = sorted(random.Random(seed).sample(range(len(unique)), max_candidates))
        unique = [unique[i] for i in keep]
    return unique


def select_typical_samples(
    texts: list[str],
    model: str | Path | torch.nn.Module,
    tokenizer=None,
    config: RecallConfig | None = None,
    progress: bool = True,
) -> list[dict]:
    """Pick a task's typical samples: embed (last layer, mean-pooled, L2-normalised), cluster, take medoids.

    Args:
        texts: the task's training texts (prompt side for chat data).
        model: a fine-tuned model, or its directory.
        tokenizer: the model's tokenizer (loaded from the directory when `model` is a path).
        config: `k`, `max_candidates`, `seed`, batching; defaults to `RecallConfig()`.

    Returns:
        `[{"text": ..., "cluster": i, "cluster_size": n}, ...]`, deterministic for a seed.
    """
    config = config or RecallConfig()
    candidates = candidate_texts(texts, config.max_candidates, config.seed)
    if not candidates:
        raise ValueError("No non-empty texts to select typical samples from.")
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_backbone(model, config.device, config.device_map)
    elif tokenizer is None:
        raise ValueError("select_typical_samples needs the tokenizer when given a model object.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    emb = pooled_hidden_states(
        model,
        tokenizer,
        candidates,
        config.batch_size,
        config.max_length,
        last_only=True,
        progress=progress,
        desc="Embedding candidates",
    )[0]
    emb = torch.nn.functional.normalize(emb, dim=-1).numpy()
    picks = cluster_medoids(emb, config.k, config.seed, config.minibatch_threshold)
    logger.info("Selected %d typical samples from %d candidates", len(picks), len(candidates))
    return [
        {"text": candidates[p["index"]], "cluster": p["cluster"], "cluster_size": p["cluster_size"]} for p in picks
    ]


def write_samples(path: str | Path, samples: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")


def read_texts(path: str | Path) -> list[str]:
    """Texts of a `.jsonl` (`{"text": ...}` per line) or plain `.txt` file (one text per line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Probe file {path} does not exist.")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f'{path}:{i} is not valid JSON; expected one {{"text": ...}} object per line.') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{i} has no string field "text".')
        texts.append(record["text"])
    if not texts:
        raise ValueError(f"{path} holds no texts.")
    return texts
