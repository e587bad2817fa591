"""Bad drops are quarantined with the failed check in REASON.json; the live version stays; the daemon goes on."""

from __future__ import annotations

import json
import math

import pytest
from daemon_helpers import assert_consistent

pytest_plugins = ["daemon_fixtures"]


def truncate(d):
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def delete_second_shard(d):
    (d / "model-00002-of-00002.safetensors").unlink()


def index_names_absent_file(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = "model-00009-of-00009.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def corrupt_config(d):
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": ')


def corrupt_recall_json(d):
    (d / "recall.json").write_text("{not json")


def flip_a_weight_byte(d):
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # same size, valid header: only the sha256 recorded in recall.json can tell
    path.write_bytes(bytes(data))


def only_a_stray_file(d):
    for p in d.iterdir():
        if p.name != "READY":
            p.unlink()
    (d / "notes.txt").write_text("not a checkpoint")


def set_value(name, value):
    def mutate(tensors):
        tensors[name][0, 0] = value

    return mutate


def huge_lm_head(tensors):
    # Finite weights (3e38 < fp32 max) that pass every pre-merge check and the merge, but overflow in a forward.
    tensors["lm_head.weight"].fill_(3e38)


FAULTS = {
    "truncated_safetensors": ({"after": truncate}, "weights"),
    "missing_shard": ({"shards": 2, "after": delete_second_shard}, "weights"),
    "index_names_absent_file": ({"shards": 2, "after": index_names_absent_file}, "weights"),
    "corrupt_config_json": ({"after": corrupt_config}, "config"),
    "corrupt_recall_json": ({"after": corrupt_recall_json}, "recall_json"),
    "sha256_mismatch": ({"after": flip_a_weight_byte}, "sha256"),
    "no_checkpoint_at_all": ({"after": only_a_stray_file}, "layout"),
    "nan_weight": ({"mutate": set_value("model.layers.1.mlp.down_proj.weight", math.nan)}, "finite"),
    "inf_weight": ({"mutate": set_value("model.embed_tokens.weight", math.inf)}, "finite"),
    "no_samples": ({"samples": None}, "samples"),
    "forward_overflows_after_merge": ({"mutate": huge_lm_head, "scale": 0.0}, "post_merge"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_drop_is_quarantined_with_its_reason(deployment, fault):
    kwargs, check = FAULTS[fault]
    kwargs = dict(kwargs)
    after = kwargs.pop("after", None)
    d = deployment.add("bad", **kwargs)
    if after:
        (d / "READY").unlink()
        after(d)
        (d / "READY").touch()
    assert deployment.run_once() == 3  # something was quarantined
    store = deployment.store
    assert store.current() == "v0000" and store.versions() == ["v0000"]
    reason = json.loads((store.quarantine_dir / "bad" / "REASON.json").read_text())
    assert reason["deployed_version"] == "v0000"
    assert f'recall_daemon_drops_quarantined_total{{reason="{check}"}} 1.0' in store.metrics_path.read_text()
    assert json.loads(store.status_path.read_text())["last_error"]["check"] == check
    assert deployment.ledger("quarantined")[0]["check"] == check
    assert_consistent(deployment, quarantined={"bad": check})


@pytest.mark.parametrize("other", ["qwen2", "hidden32", "layers3"])
def test_wrong_architecture_is_quarantined(deployment, other_models, other):
    deployment.add("other", source=other_models[other])
    assert deployment.run_once() == 3
    reason = json.loads((deployment.store.quarantine_dir / "other" / "REASON.json").read_text())
    expected = {"qwen2": "model_type", "hidden32": "hidden_size", "layers3": "layers"}[other]
    assert expected in reason["error"]
    assert_consistent(deployment, quarantined={"other": "architecture"})


def nan_norm(tensors):
    tensors["model.norm.weight"][0] = math.nan


def test_the_daemon_goes_on_after_a_bad_drop(deployment):
    dep = deployment
    dep.add("bad", mutate=nan_norm)
    dep.add("good", seed=2)
    dep.add("bad-too", samples=None)
    assert dep.run_once() == 3
    assert dep.store.current() == "v0001"
    assert_consistent(dep, merged=["good"], quarantined={"bad": "finite", "bad-too": "samples"})


def test_same_name_quarantined_twice_keeps_both(deployment):
    dep = deployment
    dep.add("bad", samples=None)
    assert dep.run_once() == 3
    dep.add("bad", samples=None, seed=5)
    assert dep.run_once() == 3
    names = sorted(p.name for p in dep.store.quarantine_dir.iterdir())
    assert names == ["bad", "bad-2"]
    assert_consistent(dep)
