"""Which adapters are refused before any output is written (recall_hf.lora.compat)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from lora.fixtures import CONFIG, TEXTS, make_adapter, merge
from recall_hf import RecallConfig, recall_merge

pytest_plugins = ["lora.fixtures"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "all"}, "bias='all'"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"init_lora_weights": "pissa_niter_4"}, "modified base"),
        ({"some_future_variant": {"x": 1}}, "some_future_variant"),
        ({"base_model_name_or_path": "/elsewhere/base"}, "different bases"),
    ],
)
def test_unmergeable_adapters_are_refused(llama_adapters, tmp_path, change, message):
    bad = shutil.copytree(llama_adapters["b"], tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(change)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(message)):
        merge([llama_adapters["a"], bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dora_adapter_refused(bases, llama_adapters, tmp_path):
    dora = make_adapter(bases["llama"], tmp_path / "dora", 4, r=4, target_modules=["q_proj"], use_dora=True,
                        task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="DoRA"):
        merge([llama_adapters["a"], dora], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out*"))


def test_missing_base_refused_and_base_override(bases, llama_adapters, tmp_path):
    moved = []
    for name, base_name in (("a", str(tmp_path / "no_such_base")), ("b", None)):
        d = shutil.copytree(llama_adapters[name], tmp_path / name)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base_name
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        moved.append(d)
    with pytest.raises(ValueError, match="no base_model_name_or_path; pass the base"):
        merge(moved, tmp_path / "out")
    twin = shutil.copytree(moved[0], tmp_path / "a2")  # the same folder twice is refused before the base check
    with pytest.raises(ValueError, match="not a local directory.*--base"):
        merge([moved[0], twin], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = recall_merge(moved, TEXTS, tmp_path / "out", RecallConfig(**CONFIG), base=bases["llama"], progress=False)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(bases["llama"].resolve())
    assert report.models == [str(d) for d in moved]


def test_truncated_adapter_file_refused(llama_adapters, tmp_path):
    cut = shutil.copytree(llama_adapters["b"], tmp_path / "cut")
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(ValueError, match="truncated"):
        merge([llama_adapters["a"], cut], tmp_path / "out")
    assert not (tmp_path / "out").exists()
