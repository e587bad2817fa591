"""Where an adapter deployment's base comes from and what its adapters are merged against (issue 12, points 3-4):
`--base` may be a Hub id (resolved once at start from an offline cache the test builds, its commit recorded); every
adapter drop is checked against and merged on v0000, whatever base its adapter_config.json names; every adapter
version names the deployment's base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from daemon_helpers import SAMPLES, Deployment, assert_consistent, make_adapter_drop
from huggingface_hub import ModelCard
from test_hub import COMMIT, hub_cache, put_in_cache  # noqa: F401 - hub_cache is a fixture

from recall_daemon import DaemonConfig, DaemonService, cli
from recall_hf.card import CARD_NAME
from recall_hf.modeldir import READY, weight_hashes
from recall_hf.task_checkpoint import write_task_checkpoint
from recall_hf.tiny import build_tiny_model

pytest_plugins = ["daemon_fixtures"]


def base_name(version) -> str:
    return json.loads((version / "adapter_config.json").read_text())["base_model_name_or_path"]


def name_base_in(adapter, name: str) -> None:
    """Make a drop's adapter_config.json name another base (a producer that trained on a copy elsewhere)."""
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": name}))


def logits_on(base, adapter_dir) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(adapter_dir))
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([[1, 5, 9, 3, 7, 2]])).logits


def test_base_as_hub_id_is_resolved_once_and_named_by_every_adapter_version(tmp_path, tiny_base, hub_cache):  # noqa: F811
    put_in_cache(hub_cache, "tiny-org/base", tiny_base)
    dep = Deployment(tmp_path, "tiny-org/base")
    assert dep.run_once() == 0
    v0 = dep.store.version_dir("v0000")
    meta = json.loads((v0 / "recall.json").read_text())
    assert meta["base_model"] == "tiny-org/base" and meta["revision"] == COMMIT
    assert meta["sha256"] == weight_hashes(tiny_base)  # the cache's files, copied (no symlinks into the cache)
    assert not any(p.is_symlink() for p in v0.iterdir())
    init = dep.ledger("init")[0]
    assert init["base_model"] == "tiny-org/base" and init["revision"] == COMMIT
    assert json.loads((v0 / "version.json").read_text())["revision"] == COMMIT
    assert ModelCard.load(v0 / CARD_NAME).data.to_dict()["base_model"] == "tiny-org/base"
    for name, seed in (("lora-a", 1), ("lora-b", 2)):
        make_adapter_drop(dep.drop, name, tiny_base, seed=seed, r=4)
        assert dep.run_once() == 0
    for version in ("v0001", "v0002"):
        path = dep.store.version_dir(version)
        assert base_name(path) == "tiny-org/base"
        assert json.loads((path / "recall.json").read_text())["base_model"] == "tiny-org/base"
        assert ModelCard.load(path / CARD_NAME).data.to_dict()["base_model"] == "tiny-org/base"
    assert torch.isfinite(logits_on(tiny_base, dep.store.version_dir("v0002"))).all()


def test_unknown_hub_id_is_a_one_line_error_that_leaves_nothing(tmp_path, hub_cache, capsys):  # noqa: F811
    config = DaemonConfig(drop_dir=str(tmp_path / "d"), deploy_dir=str(tmp_path / "p"), base="tiny-org/absent")
    with pytest.raises(ValueError, match=r"--base 'tiny-org/absent' is not a local directory.*local cache") as err:
        DaemonService(config).run(once=True)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "d").exists() and not (tmp_path / "p").exists()
    rc = cli.main(["daemon", "--drop", str(tmp_path / "d"), "--deploy", str(tmp_path / "p"), "--base",
                   "tiny-org/absent", "--once"])
    assert rc == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err_lines) == 1 and "--base 'tiny-org/absent'" in err_lines[0]
    assert not (tmp_path / "d").exists() and not (tmp_path / "p").exists()


def test_adapter_drops_naming_other_bases_merge_against_v0000(tmp_path, tiny_base):
    dep = Deployment(tmp_path, tiny_base)
    assert dep.run_once() == 0
    kept = tmp_path / "kept"
    for name, seed, named in (("lora-a", 1, "/nonexistent/base"), ("lora-b", 2, "some-org/not-this-base")):
        drop = make_adapter_drop(dep.drop, name, tiny_base, seed=seed, r=4)
        name_base_in(drop, named)
        if not kept.exists():
            shutil.copytree(drop, kept)
        assert dep.run_once(adapter_max_rank=0) == 0, dep.ledger()
    assert dep.store.current() == "v0002"
    assert_consistent(dep, merged=["lora-a", "lora-b"])  # loads on the named base: v0000
    v0 = dep.store.version_dir("v0000").resolve()
    v1, v2 = dep.store.version_dir("v0001"), dep.store.version_dir("v0002")
    assert base_name(v1) == base_name(v2) == str(v0)
    torch.testing.assert_close(logits_on(v0, v1), logits_on(tiny_base, kept))
    assert torch.isfinite(logits_on(v0, v2)).all()


def test_adapter_drop_trained_from_another_base_is_refused(tmp_path, tiny_base):
    """A later drop's recall.json records parent hashes of another model of the same shape: refused, not merged."""
    other = tmp_path / "other"
    build_tiny_model("llama", other, texts=SAMPLES, hidden=16, layers=2, seed=7)
    dep = Deployment(tmp_path, tiny_base)
    assert dep.run_once() == 0
    make_adapter_drop(dep.drop, "lora-a", tiny_base, seed=1)
    assert dep.run_once() == 0
    samples = [{"text": t, "cluster": i, "cluster_size": 1} for i, t in enumerate(SAMPLES[:3])]
    for name, parent in (("from-other", other), ("from-base", tiny_base)):
        raw = make_adapter_drop(tmp_path / "raw", name, tiny_base, seed=3, ready=False, samples=None)
        write_task_checkpoint(raw, None, dep.drop / name, samples, name, parent=parent)
        (dep.drop / name / READY).touch()
        assert dep.run_once() == (3 if name == "from-other" else 0)
    reason = json.loads((dep.store.quarantine_dir / "from-other" / "REASON.json").read_text())
    assert reason["check"] == "architecture" and "is not the model" in reason["error"]
    assert dep.store.current() == "v0002"
    assert_consistent(dep, merged=["lora-a", "from-base"], quarantined={"from-other": "architecture"})
