"""Daemon versions are Hub-ready: a card `ModelCard.load` parses, and no typical-sample text in published files."""

from __future__ import annotations

from daemon_helpers import SAMPLES
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from recall_hf.privacy import PRIVATE_DIR, PROBES_NAME

pytest_plugins = ["daemon_fixtures"]
TRAINER_IGNORE = ["_*", "checkpoint-*"]  # what Trainer.push_to_hub skips (checked in tests/test_card.py)


def test_version_cards_parse_and_publish_no_training_text(deployment):
    dep = deployment
    dep.add("alpha", seed=1)
    dep.add("beta", seed=2)
    assert dep.run_once() == 0
    store = dep.store
    for version, count in (("v0000", 0), ("v0001", 1), ("v0002", 2)):
        folder = store.version_dir(version)
        card = ModelCard.load(folder / "README.md")
        data = card.data.to_dict()
        tasks = [t["task"] for t in store.version_info(version)["tasks"]]
        assert len(tasks) == count and data["recall"]["tasks"] == tasks
        assert {"merge", "recall"} <= set(data["tags"]) and data["library_name"] == "transformers"
        assert f"deployed model {version}" in card.text
        rel = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        for name in filter_repo_objects(rel, ignore_patterns=TRAINER_IGNORE):
            data_bytes = (folder / name).read_bytes()
            assert not any(s.encode() in data_bytes for s in SAMPLES), f"{version}/{name} holds a typical sample"
    v2 = ModelCard.load(store.version_dir("v0002") / "README.md")
    assert v2.data.to_dict()["recall"]["config"]["mode"] == "continual" and "## History" in v2.text
    assert (store.version_dir("v0002") / PRIVATE_DIR / PROBES_NAME).is_file()
