from __future__ import annotations

import json

import numpy as np
import pytest

from recall_hf import RecallConfig, select_typical_samples
from recall_hf.samples import candidate_texts, cluster_medoids, read_texts


def blobs(seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    return np.concatenate([c + rng.normal(scale=0.3, size=(20, 2)) for c in centers])


def test_cluster_medoids_pick_the_point_nearest_each_centroid():
    x = blobs()
    picks = cluster_medoids(x, k=3, seed=0)
    assert len(picks) == 3 and sum(p["cluster_size"] for p in picks) == 60
    for p in picks:
        group = slice(p["index"] // 20 * 20, p["index"] // 20 * 20 + 20)
        centroid = x[group].mean(axis=0)
        nearest = group.start + int(np.argmin(np.linalg.norm(x[group] - centroid, axis=1)))
        assert p["index"] == nearest and p["cluster_size"] == 20


def test_cluster_medoids_deterministic_and_capped():
    x = blobs()
    assert cluster_medoids(x, 3, seed=4) == cluster_medoids(x, 3, seed=4)
    assert len(cluster_medoids(x[:2], k=5)) == 2


def test_candidates_dedup_and_seeded_subsample():
    texts = [f"t{i}" for i in range(50)] + ["t1", "", "  "]
    assert candidate_texts(texts, 100, 0) == [f"t{i}" for i in range(50)]
    sub = candidate_texts(texts, 10, seed=3)
    assert len(sub) == 10 and sub == candidate_texts(texts, 10, seed=3)


def test_select_typical_samples_from_model_dir(model_pair):
    from conftest import PROBES

    _, b = model_pair["llama"]
    texts = [f"{t} number {i}" for i in range(4) for t in PROBES]
    config = RecallConfig(k=5)
    samples = select_typical_samples(texts, b, config=config, progress=False)
    assert len(samples) == 5
    assert all(s["text"] in texts for s in samples)
    assert sum(s["cluster_size"] for s in samples) == len(texts)
    assert samples == select_typical_samples(texts, b, config=config, progress=False)


def test_read_texts_errors(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="p.jsonl:2"):
        read_texts(bad)
    bad.write_text(json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(ValueError, match="text"):
        read_texts(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_texts(tmp_path / "missing.jsonl")
