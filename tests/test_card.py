"""Hub-ready outputs: a model card `ModelCard.load` parses, and no training text in anything that gets published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from recall_hf import RecallConfig, recall_merge
from recall_hf.card import CARD_NAME
from recall_hf.modeldir import REPORT_NAME, read_recall_json
from recall_hf.privacy import PRIVATE_DIR, PROBES_NAME, text_sha256
from recall_hf.samples import SAMPLES_NAME
from recall_hf.task_checkpoint import write_task_checkpoint

# What `Trainer.push_to_hub` passes to `upload_folder` (transformers/trainer.py), checked in
# test_trainer_push_patterns_are_what_privacy_assumes.
TRAINER_IGNORE = ["_*", "checkpoint-*"]
SAMPLES_A = ["zebra crossing quietly at noon", "violet umbrellas in the rain", "seven owls debating philosophy"]
SAMPLES_B = ["copper kettles whistle twice", "a lighthouse keeper's secret", "marble staircase to nowhere"]


def published_files(folder: Path) -> list[Path]:
    """Files an upload of `folder` with the Trainer's ignore patterns would send (huggingface_hub's own filter)."""
    rel = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return [folder / r for r in filter_repo_objects(rel, ignore_patterns=TRAINER_IGNORE)]


def assert_no_text_published(folder: Path, texts: list[str]) -> list[Path]:
    files = published_files(folder)
    assert files
    for path in files:
        data = path.read_bytes()
        for text in texts:
            assert text.encode() not in data, f"training text {text!r} in published file {path}"
    return files


def task_checkpoint(model_dir: Path, out: Path, task: str, texts: list[str]) -> Path:
    samples = [{"text": t, "cluster": i, "cluster_size": 1} for i, t in enumerate(texts)]
    return write_task_checkpoint(model_dir, None, out, samples, task, parent=model_dir)


@pytest.fixture(scope="module")
def merged(model_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    a, b = model_pair["llama"]
    ck_a = task_checkpoint(a, root / "ck_a", "movies", SAMPLES_A)
    ck_b = task_checkpoint(b, root / "ck_b", "emails", SAMPLES_B)
    report = recall_merge([ck_a, ck_b], None, root / "out", RecallConfig(k=3, tau=0.5), progress=False)
    return root / "out", report


def test_merge_card_parses_with_metadata(merged):
    out, report = merged
    card = ModelCard.load(out / CARD_NAME)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert {"merge", "recall"} <= set(data["tags"])
    assert data["recall"]["tasks"] == ["movies", "emails"] and data["recall"]["task_count"] == 2
    assert data["recall"]["config"]["tau"] == 0.5 and data["recall"]["config"]["similarity"] == "rbf"
    newest = [row[-1] for row in report.weights]
    assert data["recall"]["newest_weight"]["max"] == pytest.approx(max(newest), abs=1e-4)
    assert "base_model" not in data  # a local base is no Hub id: left out rather than written as a path
    assert "## Per-layer weights" in card.text and card.text.count("\n| ") >= len(report.weights)
    assert read_recall_json(out)["tasks"] == ["movies", "emails"]


def test_no_typical_sample_text_in_published_files(merged):
    out, report = merged
    files = assert_no_text_published(out, SAMPLES_A + SAMPLES_B)
    assert {p.name for p in files} >= {CARD_NAME, REPORT_NAME, "model.safetensors", "config.json"}
    saved = json.loads((out / REPORT_NAME).read_text())
    assert "probes" not in saved and "out_dir" not in saved
    assert saved["probe_sha256"] == [text_sha256(t) for t in report.probes]
    private = [json.loads(line) for line in (out / PRIVATE_DIR / PROBES_NAME).read_text().splitlines()]
    assert [p["text"] for p in private] == report.probes and set(report.probes) == set(SAMPLES_B)


def test_trainer_push_patterns_are_what_privacy_assumes():
    """The names privacy.py relies on are the ones the installed transformers skips when pushing output_dir."""
    import inspect

    from transformers import Trainer

    source = inspect.getsource(Trainer.push_to_hub)
    assert 'ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"]' in source
    kept = filter_repo_objects(["_recall_checkpoint/recall_samples.jsonl", f"{PRIVATE_DIR}/{PROBES_NAME}",
                                "README.md"], ignore_patterns=TRAINER_IGNORE)
    assert list(kept) == ["README.md"]


def test_fold_into_first_version_keeps_samples_private(model_pair, tmp_path):
    from recall_hf.callback import fold_into

    ck = task_checkpoint(model_pair["llama"][0], tmp_path / "ck", "movies", SAMPLES_A)
    version, report = fold_into(tmp_path / "merged", ck, progress=False)
    assert report is None and not (version / SAMPLES_NAME).exists()
    assert (version / PRIVATE_DIR / SAMPLES_NAME).is_file() and (ck / SAMPLES_NAME).is_file()
    assert_no_text_published(version, SAMPLES_A)
    assert ModelCard.load(version / CARD_NAME).data.to_dict()["recall"]["tasks"] == ["movies"]


def test_fingerprints_are_private_in_a_version_and_in_the_first_fold(model_pair, tmp_path):
    """A fingerprint replays typical samples (their token ids): it lives under _recall_private/, never uploaded."""
    from recall_hf.callback import fold_into
    from recall_hf.fingerprint import (
        FINGERPRINT_NAME,
        FINGERPRINTS_DIR,
        load_task_model,
        read_fingerprints,
        write_fingerprints,
    )
    from recall_hf.models import load_tokenizer

    assert FINGERPRINTS_DIR.startswith(f"{PRIVATE_DIR}/")
    model = model_pair["llama"][0]
    samples = [{"text": t, "cluster": i, "cluster_size": 1} for i, t in enumerate(SAMPLES_A)]
    ck = write_task_checkpoint(load_task_model(model), load_tokenizer(model), tmp_path / "ck", samples, "movies",
                               parent=model)
    assert (ck / FINGERPRINT_NAME).is_file()
    version, _ = fold_into(tmp_path / "merged", ck, progress=False)
    assert not (version / FINGERPRINT_NAME).exists() and (ck / FINGERPRINT_NAME).is_file()
    fps = read_fingerprints(version)
    assert list(fps) == ["movies"]
    write_fingerprints(tmp_path / "v", {"movies": fps["movies"], "emails": fps["movies"]})
    for folder in (version, tmp_path / "v"):
        assert not [p for p in published_files(folder) if p.suffix == ".safetensors" and "model" not in p.name]
    assert len(list((tmp_path / "v" / FINGERPRINTS_DIR).glob("*.safetensors"))) == 2
    card = (version / CARD_NAME).read_text()
    assert "fingerprint" not in card.split("## Files")[0]
