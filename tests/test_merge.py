from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from conftest import PROBES, copy_model
from safetensors.torch import load_file

from recall_hf import RecallConfig, recall_merge
from recall_hf.layers import LayerMap
from recall_hf.modeldir import sha256_file, weight_hashes

ARCHS = ("llama", "qwen2", "gpt2", "bert")


def state(model_dir) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def model_class(model_dir):
    return getattr(transformers, transformers.AutoConfig.from_pretrained(model_dir).architectures[0])


@pytest.fixture(scope="module")
def merged(model_pair, tmp_path_factory):
    """Every architecture's pair merged once with defaults: `{arch: (a, b, out, report)}`."""
    root = tmp_path_factory.mktemp("merged")
    return {
        arch: (a, b, root / arch, recall_merge([a, b], PROBES, root / arch, progress=False))
        for arch, (a, b) in model_pair.items()
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_tensors_equal_the_formula(merged, arch):
    a, b, out, report = merged[arch]
    sa, sb, so = state(a), state(b), state(out)
    layer_map = LayerMap.from_pretrained(b)
    w = torch.tensor(report.weights)
    assert set(so) == set(sb)
    for name, t in so.items():
        layer = layer_map.layer_of(name)
        expected = (w[layer, 0] * sa[name].double() + w[layer, 1] * sb[name].double()).to(t.dtype)
        assert torch.allclose(t, expected, atol=1e-6), name


@pytest.mark.parametrize("arch", ARCHS)
def test_output_loads_and_runs(merged, arch):
    _, _, out, report = merged[arch]
    model = model_class(out).from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    logits = model(**tok(["the movie was good"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    for name in ("recall_report.json", "recall_weights.png", "recall.json", "config.json"):
        assert (out / name).is_file()
    recall_json = json.loads((out / "recall.json").read_text())
    assert recall_json["task_count"] == 2
    assert set(recall_json["sha256"]) == {"model.safetensors"}
    assert not list(out.parent.glob("*.tmp-*"))


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_convex_and_shallow_layers_more_even(merged, arch):
    _, _, _, report = merged[arch]
    w = torch.tensor(report.weights)
    assert w.shape == (5, 2)
    assert torch.allclose(w.sum(-1), torch.ones(5, dtype=w.dtype)) and (w >= 0).all()
    # Only block 3 (output layer 4) was changed: layers 0..3 agree exactly -> even weights; layer 4 tilts new.
    assert torch.allclose(w[:4, 1], torch.full((4,), 0.5, dtype=w.dtype), atol=1e-6)
    assert w[4, 1] > 0.55


def test_identical_models_merge_to_same_weights(model_pair, tmp_path):
    a, _ = model_pair["llama"]
    b = copy_model(a, tmp_path / "copy")
    recall_merge([a, b], PROBES, tmp_path / "out", RecallConfig(tau=0.1), progress=False)
    sa, so = state(a), state(tmp_path / "out")
    for name in sa:
        assert torch.allclose(sa[name], so[name], atol=1e-6), name


def test_streaming_equals_in_memory_reference_sharded_bf16(model_pair, tmp_path):
    a, b = model_pair["gpt2"]
    config = RecallConfig(dtype="bfloat16", max_shard_size=20_000)
    report = recall_merge([a, b], PROBES, tmp_path / "out", config, progress=False)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    ma, mb = model_class(a).from_pretrained(a), model_class(b).from_pretrained(b)
    mo = model_class(tmp_path / "out").from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert mo.dtype == torch.bfloat16
    layer_map = LayerMap.from_model(ma)
    w = torch.tensor(report.weights)
    pa, pb = dict(ma.named_parameters()), dict(mb.named_parameters())
    for name, p in mo.named_parameters():
        layer = layer_map.layer_of(name)
        ref = (w[layer, 0] * pa[name].double() + w[layer, 1] * pb[name].double()).to(torch.bfloat16)
        assert torch.equal(p.detach(), ref), name


def test_task_counts_are_read_and_recorded(model_pair, tmp_path):
    a, b = model_pair["llama"]
    first = tmp_path / "first"
    recall_merge([a, b], PROBES, first, progress=False)
    r2 = recall_merge([first, b], PROBES, tmp_path / "second", progress=False)
    assert r2.task_counts == [2, 1] and r2.output_task_count == 3
    # The count prior puts the agreeing layers at the running mean: 2/3 for the deployed model.
    assert r2.weights[0][0] == pytest.approx(2 / 3, abs=1e-6)
    r3 = recall_merge([first, b], PROBES, tmp_path / "third", RecallConfig(task_count_prior=False), progress=False)
    assert r3.weights[0][0] == pytest.approx(0.5, abs=1e-6)


def test_known_hashes_are_recorded_instead_of_hashing_again(model_pair, tmp_path):
    a, b = model_pair["llama"]
    known = {a: {"model.safetensors": "f" * 64}, str(b): {"other.safetensors": "0" * 64}}
    report = recall_merge([a, b], PROBES, tmp_path / "out", known_hashes=known, progress=False)
    assert report.input_hashes[str(a)] == {"model.safetensors": "f" * 64}  # taken as given, not re-read
    # A known map that does not name exactly the weight files is not used: the directory is hashed.
    assert report.input_hashes[str(b)] == weight_hashes(b)
    assert weight_hashes(b) == {"model.safetensors": sha256_file(b / "model.safetensors")}


def test_probes_above_k_are_reduced_to_typical_samples(model_pair, tmp_path):
    a, b = model_pair["llama"]
    probes = tmp_path / "p.jsonl"
    probes.write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i in range(5) for t in PROBES))
    report = recall_merge([a, b], probes, tmp_path / "out", RecallConfig(k=4), progress=False)
    assert len(report.probes) == 4


def test_default_probes_come_from_newest_model(model_pair, tmp_path):
    a, b = model_pair["llama"]
    b2 = copy_model(b, tmp_path / "b2")
    with pytest.raises(ValueError, match="recall_samples.jsonl"):
        recall_merge([a, b2], None, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    (b2 / "recall_samples.jsonl").write_text(json.dumps({"text": "the movie"}) + "\n")
    assert recall_merge([a, b2], None, tmp_path / "out", progress=False).probes == ["the movie"]


@pytest.mark.parametrize("other", ["gpt2", "bert"])
def test_mismatched_architectures_refused_output_absent(model_pair, tmp_path, other):
    with pytest.raises(ValueError, match="model_type"):
        recall_merge([model_pair["llama"][0], model_pair[other][0]], PROBES, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_other_layer_count_refused(model_pair, tmp_path):
    from recall_hf.tiny import build_tiny_model

    build_tiny_model("llama", tmp_path / "deep", texts=PROBES, layers=5)
    with pytest.raises(ValueError, match="layers"):
        recall_merge([model_pair["llama"][0], tmp_path / "deep"], PROBES, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault", ["truncate", "corrupt_config", "nan"])
def test_corrupt_inputs_refused_output_absent(model_pair, tmp_path, fault):
    a, b = model_pair["llama"]
    bad = copy_model(b, tmp_path / "bad")
    if fault == "truncate":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif fault == "corrupt_config":
        (bad / "config.json").write_text("{not json")
    else:
        sd = state(bad)
        sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
        from safetensors.torch import save_file

        save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        recall_merge([a, bad], PROBES, tmp_path / "out", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp-*"))


def test_existing_output_refused(model_pair, tmp_path):
    a, b = model_pair["llama"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        recall_merge([a, b], PROBES, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_multi_mode_three_models(model_pair, tmp_path):
    a, b = model_pair["qwen2"]
    c = copy_model(b, tmp_path / "c")
    report = recall_merge([a, b, c], PROBES, tmp_path / "out", RecallConfig(mode="multi"), progress=False)
    w = torch.tensor(report.weights)
    assert w.shape == (5, 3)
    assert torch.allclose(w[0], torch.full((3,), 1 / 3, dtype=w.dtype), atol=1e-6)
    assert w[4, 1] == pytest.approx(w[4, 2]) and w[4, 1] > w[4, 0]
    shutil.rmtree(tmp_path / "out")


def test_task_vector_fusion_equals_base_plus_scaled_task_vectors(model_pair, tmp_path):
    from conftest import perturb

    base, b = model_pair["llama"]
    model = model_class(base).from_pretrained(base)
    perturb(model, "layers.1.", scale=0.3, seed=7)
    c = tmp_path / "c"
    model.save_pretrained(c)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(c)
    config = RecallConfig(fusion="task_vector")
    with pytest.raises(ValueError, match="base"):
        recall_merge([b, c], PROBES, tmp_path / "no_base", config, progress=False)
    assert not (tmp_path / "no_base").exists()
    report = recall_merge([b, c], PROBES, tmp_path / "out", config, base=base, progress=False)
    coef = torch.tensor(report.stats["task_vector_coefficients"])
    assert torch.allclose(coef.max(-1).values, torch.ones(len(coef), dtype=coef.dtype))
    s0, sb, sc, so = state(base), state(b), state(c), state(tmp_path / "out")
    layer_map = LayerMap.from_pretrained(b)
    for name, t in so.items():
        layer = layer_map.layer_of(name)
        ref = s0[name].double() + coef[layer, 0] * (sb[name] - s0[name]) + coef[layer, 1] * (sc[name] - s0[name])
        assert torch.allclose(t.double(), ref, atol=1e-5), name
    # Both task vectors survive whole where the models agree, unlike a convex average that halves them.
    assert torch.allclose(so["model.layers.1.mlp.up_proj.weight"], sc["model.layers.1.mlp.up_proj.weight"], atol=1e-5)
