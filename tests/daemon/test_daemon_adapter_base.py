"""Adapter deployments from the bare base model (issue 12.7): v0000 is the full base, the first adapter drop is
deployed as it is, later ones merge with it; the deployed rank is capped (`adapter_max_rank`) and never carries a
zero adapter's rank."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from daemon_helpers import Deployment, assert_consistent, make_adapter_drop

from recall_daemon.cli import collect_status

pytest_plugins = ["daemon_fixtures"]

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def logits_on_base(base, adapter_dir) -> torch.Tensor:
    """What a server computes: the base model with the version's adapter loaded by PEFT."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(adapter_dir))
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def adapter_rank(version) -> int:
    cfg = json.loads((version / "adapter_config.json").read_text())
    return max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()])


def two_drops(dep: Deployment, tiny_base, tmp_path, **kw) -> dict:
    """v0000 = the bare base; two r=4 adapter drops, each in its own run; the first one's copy kept aside."""
    assert dep.run_once(**kw) == 0
    assert not (dep.store.version_dir("v0000") / "adapter_config.json").exists()
    first = make_adapter_drop(tmp_path / "kept", "lora-a", tiny_base, seed=1, r=4)
    shutil.copytree(first, dep.drop / "lora-a")
    assert dep.run_once(**kw) == 0
    make_adapter_drop(dep.drop, "lora-b", tiny_base, seed=2, r=4)
    assert dep.run_once(**kw) == 0
    assert dep.store.current() == "v0002"
    assert_consistent(dep, merged=["lora-a", "lora-b"])
    return {v: dep.store.version_dir(v) for v in ("v0001", "v0002")} | {"first": first}


def test_bare_base_takes_adapter_drops_with_a_rank_cap(tmp_path, tiny_base):
    dep = Deployment(tmp_path, tiny_base)
    got = two_drops(dep, tiny_base, tmp_path, adapter_max_rank=6)
    v1, v2 = got["v0001"], got["v0002"]
    # v0001 is the first adapter itself (RECALL gives the 0-task base weight 0), rank 4 under the cap of 6.
    assert adapter_rank(v1) == 4
    torch.testing.assert_close(logits_on_base(tiny_base, v1), logits_on_base(tiny_base, got["first"]))
    meta1 = json.loads((v1 / "recall.json").read_text())
    assert meta1["task_count"] == 1 and meta1["compression"]["max_rel_error"] == 0.0
    # v0002: 4 + 4 stacked, compressed to the cap; the error is recorded in recall.json, version.json and status.
    assert adapter_rank(v2) == 6
    meta2 = json.loads((v2 / "recall.json").read_text())
    assert meta2["task_count"] == 2 and meta2["rank"] == 6
    assert 0.0 < meta2["compression"]["max_rel_error"] < 1.0 and meta2["compression"]["max_rank"] == 6
    status = collect_status(dep.store)
    assert status["rank"] == 6 and status["compression"] == meta2["compression"]
    base_logits = logits_on_base(tiny_base, v2)
    assert torch.isfinite(base_logits).all()


def test_uncapped_ranks_add_without_a_zero_adapter(tmp_path, tiny_base):
    dep = Deployment(tmp_path, tiny_base)
    got = two_drops(dep, tiny_base, tmp_path, adapter_max_rank=0)
    assert adapter_rank(got["v0001"]) == 4 and adapter_rank(got["v0002"]) == 8
    assert json.loads((got["v0002"] / "recall.json").read_text()).get("compression") is None


def test_zero_adapter_base_adds_no_rank(tmp_path, tiny_base):
    """The old way (an explicit zero adapter as --base) no longer stacks its rank: r 4 -> 8, not 6 -> 10."""
    make_adapter_drop(tmp_path, "initial", tiny_base, seed=0, ready=False, r=2)
    dep = Deployment(tmp_path, tmp_path / "initial")
    assert dep.run_once(adapter_max_rank=0) == 0
    for name, seed in (("lora-a", 1), ("lora-b", 2)):
        make_adapter_drop(dep.drop, name, tiny_base, seed=seed, r=4)
    assert dep.run_once(adapter_max_rank=0) == 0
    assert adapter_rank(dep.store.version_dir("v0001")) == 4
    assert adapter_rank(dep.store.version_dir("v0002")) == 8


def test_adapter_of_another_base_is_refused_by_the_bare_base(tmp_path, tiny_base, other_models):
    dep = Deployment(tmp_path, tiny_base)
    assert dep.run_once() == 0
    make_adapter_drop(dep.drop, "foreign", other_models["hidden32"], seed=1)
    assert dep.run_once() == 3
    assert dep.store.current() == "v0000"
    assert_consistent(dep, quarantined={"foreign": "architecture"})


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_adapter_max_rank_is_checked(tmp_path, tiny_base, value):
    with pytest.raises(ValueError, match="adapter_max_rank"):
        Deployment(tmp_path, tiny_base).config(adapter_max_rank=value)
