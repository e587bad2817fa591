"""Adapter deployments: the deployed version is a LoRA adapter of a fixed base; drops are adapters of that base."""

from __future__ import annotations

import json

import pytest
from daemon_helpers import Deployment, assert_consistent, make_adapter_drop

pytest_plugins = ["daemon_fixtures"]

pytest.importorskip("recall_hf.lora.merge", reason="adapter merging (recall_hf/lora/) is not available")


@pytest.fixture
def adapter_deployment(tmp_path, tiny_base) -> Deployment:
    """v0000 = a fresh LoRA adapter of the tiny base (B = 0: the base model's behaviour)."""
    make_adapter_drop(tmp_path, "initial", tiny_base, seed=0, ready=False)
    dep = Deployment(tmp_path, tmp_path / "initial")
    assert dep.run_once() == 0
    assert dep.store.current() == "v0000"
    return dep


def test_adapter_drops_fold_into_the_deployed_adapter(adapter_deployment, tiny_base):
    dep = adapter_deployment
    make_adapter_drop(dep.drop, "lora-a", tiny_base, seed=1)
    make_adapter_drop(dep.drop, "lora-b", tiny_base, seed=2)
    assert dep.run_once() == 0
    store = dep.store
    assert store.current() == "v0002"
    v2 = store.version_dir("v0002")
    assert (v2 / "adapter_config.json").is_file() and (v2 / "adapter_model.safetensors").is_file()
    assert json.loads((v2 / "recall.json").read_text())["task_count"] == 2
    assert_consistent(dep, merged=["lora-a", "lora-b"])


def test_adapter_for_another_base_is_quarantined(adapter_deployment, other_models):
    dep = adapter_deployment
    make_adapter_drop(dep.drop, "foreign", other_models["hidden32"], seed=1)
    assert dep.run_once() == 0
    assert dep.store.current() == "v0000"
    assert_consistent(dep, quarantined={"foreign": "architecture"})


def test_full_model_drop_into_an_adapter_deployment_is_quarantined(adapter_deployment, tiny_base):
    from daemon_helpers import make_drop

    dep = adapter_deployment
    make_drop(dep.drop, "full", tiny_base)
    assert dep.run_once() == 0
    assert_consistent(dep, quarantined={"full": "architecture"})
