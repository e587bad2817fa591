"""LoRA adapter-level RECALL merge (recall_hf/adapters.py) on tiny Llama, GPT-2 and BERT models."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import PROBES
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from recall_hf import RecallConfig, recall_merge
from recall_hf.adapters import compress_lora, fold_adapter, lora_scale, stack_lora
from recall_hf.tiny import build_tiny_model

TEXTS = PROBES
# A small temperature so the per-layer weights clearly differ between layers (a wrong layer index shows).
CONFIG = dict(tau=0.5, batch_size=8, max_length=32)
BLOCK_INDEX = re.compile(r"\.(?:layers|h|layer)\.(\d+)\.")


# ---------------------------------------------------------------------------------------------------------------------
# Pure math.
# ---------------------------------------------------------------------------------------------------------------------


def test_lora_scale():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError, match="r=0"):
        lora_scale(8, 0)
    with pytest.raises(ValueError, match="lora_alpha"):
        lora_scale(float("nan"), 4)


def test_stack_lora_is_exact_for_unequal_ranks():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(2, 7, generator=g), torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)]
    Bs = [torch.randn(6, 2, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)]
    scales, weights = [2.0, 0.5, 1.5], [0.2, 0.3, 0.5]
    A, B = stack_lora(As, Bs, scales, weights)
    assert A.shape == (10, 7) and B.shape == (6, 10)
    expected = sum(w * s * b @ a for a, b, s, w in zip(As, Bs, scales, weights))
    torch.testing.assert_close(B @ A, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="in=7"):
        stack_lora([As[0], torch.randn(2, 8)], [Bs[0], torch.randn(6, 2)], [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="equally many"):
        stack_lora(As, Bs, scales, weights[:2])


def test_compress_lora_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(12, 20, generator=g), torch.randn(16, 12, generator=g)
    full = B @ A
    U, S, Vh = torch.linalg.svd(full.double())
    errors = []
    for k in (1, 4, 8, 11):
        A_k, B_k, err = compress_lora(A, B, k)
        assert A_k.shape == (k, 20) and B_k.shape == (16, k)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        torch.testing.assert_close((B_k @ A_k).double(), best, rtol=1e-4, atol=1e-4)
        true_err = float(torch.linalg.norm(full.double() - best) / torch.linalg.norm(full.double()))
        assert err == pytest.approx(true_err, rel=1e-6, abs=1e-9)
        errors.append(err)
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0
    same_A, same_B, err = compress_lora(A, B, 12)
    assert err == 0.0 and same_A is A and same_B is B
    with pytest.raises(ValueError, match="max_rank"):
        compress_lora(A, B, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: tiny bases and LoRA adapters with perturbed factors.
# ---------------------------------------------------------------------------------------------------------------------


def load_base(base_dir: Path) -> torch.nn.Module:
    cfg = transformers.AutoConfig.from_pretrained(base_dir)
    return getattr(transformers, cfg.architectures[0]).from_pretrained(base_dir, dtype=torch.float32).eval()


def make_adapter(base_dir: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    """A LoRA adapter whose factors (and modules_to_save copies) are seeded noise, as after training."""
    model = get_peft_model(load_base(base_dir), LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_A" in name or "lora_embedding_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_bases")
    out = {}
    for arch in ("llama", "gpt2", "bert"):
        build_tiny_model(arch, root / arch, texts=TEXTS, layers=3)
        out[arch] = root / arch
    return out


@pytest.fixture(scope="module")
def llama_adapters(bases, tmp_path_factory):
    """a, b: r=4 on q/v; c: r=8 rsLoRA with rank/alpha patterns and modules a and b lack (o_proj, embeddings)."""
    root, base = tmp_path_factory.mktemp("llama_adapters"), bases["llama"]
    common = dict(task_type="CAUSAL_LM", lora_dropout=0.0)
    return {
        "a": make_adapter(base, root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **common),
        "b": make_adapter(base, root / "b", 2, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], **common),
        "c": make_adapter(base, root / "c", 3, r=8, lora_alpha=16, use_rslora=True,
                          target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"],
                          rank_pattern={"model.layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 4}, **common),
    }


def lora_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Ground truth from PEFT itself: each LoRA module's delta weight (weight layout) as PEFT applies it."""
    model = PeftModel.from_pretrained(load_base(base_dir), adapter_dir)
    return {name: mod.get_delta_weight("default").detach().clone()
            for name, mod in model.named_modules()
            if isinstance(mod, LoraLayer) and ("default" in mod.lora_A or "default" in mod.lora_embedding_A)}


def layer_of(module: str) -> int:
    """Layer of a module, by hand: block i -> i + 1, embeddings -> 0 (independent of recall_hf.layers)."""
    if module.endswith("embed_tokens"):
        return 0
    match = BLOCK_INDEX.search(module)
    assert match, module
    return int(match.group(1)) + 1


def expected_deltas(base_dir: Path, adapter_dirs: list[Path], weights: list[list[float]]) -> dict[str, torch.Tensor]:
    """`sum_k w[layer, k] * dW_k` per module, a module missing from an adapter counting as zero."""
    per_adapter = [lora_deltas(base_dir, d) for d in adapter_dirs]
    out: dict[str, torch.Tensor] = {}
    for k, deltas in enumerate(per_adapter):
        for name, delta in deltas.items():
            out[name] = out.get(name, torch.zeros_like(delta)) + weights[layer_of(name)][k] * delta
    return out


def assert_deltas_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def assert_weights_vary(weights: list[list[float]]) -> None:
    """The test is only meaningful when layers get different weights (a wrong layer index must show)."""
    newest = [row[-1] for row in weights[1:]]
    assert max(newest) - min(newest) > 1e-3, weights


def merge(dirs, out, **cfg):
    return recall_merge(dirs, TEXTS, out, RecallConfig(**{**CONFIG, **cfg}), progress=False)


@pytest.fixture(scope="module")
def llama_unequal(llama_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_unequal") / "merged"
    report = merge([llama_adapters["a"], llama_adapters["c"]], out)
    return out, report


# ---------------------------------------------------------------------------------------------------------------------
# Merges.
# ---------------------------------------------------------------------------------------------------------------------


def test_equal_ranks_merge_is_the_layerwise_weighted_sum(bases, llama_adapters, tmp_path):
    dirs = [llama_adapters["a"], llama_adapters["b"]]
    report = merge(dirs, tmp_path / "m")
    assert report.kind == "adapter" and report.output_task_count == 2
    assert_weights_vary(report.weights)
    expected = expected_deltas(bases["llama"], dirs, report.weights)
    assert_deltas_close(lora_deltas(bases["llama"], tmp_path / "m"), expected)
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["rank_pattern"] == {} and not cfg["use_rslora"]
    assert json.loads((tmp_path / "m" / "recall.json").read_text())["task_count"] == 2
    assert (tmp_path / "m" / "recall_report.json").is_file() and (tmp_path / "m" / "recall_weights.png").is_file()


def test_unequal_ranks_rslora_and_patterns(bases, llama_adapters, llama_unequal):
    out, report = llama_unequal
    dirs = [llama_adapters["a"], llama_adapters["c"]]
    assert_weights_vary(report.weights)
    assert_deltas_close(lora_deltas(bases["llama"], out), expected_deltas(bases["llama"], dirs, report.weights))
    cfg = json.loads((out / "adapter_config.json").read_text())
    # v_proj: 4 + 8; q_proj: 4 + 8 (layer 1: 4 + 6); o_proj: 8 (only in c).
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12
    assert cfg["rank_pattern"]["model.layers.1.self_attn.q_proj"] == 10
    assert cfg["rank_pattern"]["model.layers.0.self_attn.o_proj"] == 8
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert report.stats["partial_modules"] == 4
    assert {"model.layers.2.self_attn.o_proj", "model.embed_tokens"} <= set(cfg["target_modules"])


def test_output_loads_and_runs_forward(bases, llama_unequal):
    out, _ = llama_unequal
    model = PeftModel.from_pretrained(load_base(bases["llama"]), out)
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    logits = model(input_ids=ids).logits
    base_logits = load_base(bases["llama"])(input_ids=ids).logits
    assert logits.shape == base_logits.shape and torch.isfinite(logits).all()
    assert not torch.allclose(logits, base_logits)


def test_compression_error_reported_and_decreasing(bases, llama_adapters, llama_unequal, tmp_path):
    dirs = [llama_adapters["a"], llama_adapters["c"]]
    full_out, full_report = llama_unequal
    expected = lora_deltas(bases["llama"], full_out)
    errors = []
    for rank in (2, 6, 64):
        report = merge(dirs, tmp_path / f"r{rank}", max_rank=rank)
        assert report.weights == full_report.weights
        comp = report.stats["compression"]
        errors.append(comp["max_rel_error"])
        got = lora_deltas(bases["llama"], tmp_path / f"r{rank}")
        actual = {n: float(torch.linalg.norm(got[n] - expected[n]) / torch.linalg.norm(expected[n])) for n in expected}
        assert max(actual.values()) == pytest.approx(comp["max_rel_error"], rel=1e-3, abs=1e-5)
        assert sum(actual.values()) / len(actual) == pytest.approx(comp["mean_rel_error"], rel=1e-3, abs=1e-5)
        cfg = json.loads((tmp_path / f"r{rank}" / "adapter_config.json").read_text())
        assert cfg["r"] == min(rank, 12)
    assert errors[0] > errors[1] > errors[2] == 0.0


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
    with pytest.raises(ValueError, match="not a local directory.*--base"):
        merge([moved[0], moved[0]], tmp_path / "out")
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


def test_fold_adapter_equals_base_plus_merged_delta(bases, llama_unequal, tmp_path):
    out, report = llama_unequal
    folded = fold_adapter(out, tmp_path / "folded")
    assert folded == tmp_path / "folded" and not (folded / "adapter_config.json").exists()
    assert json.loads((folded / "recall.json").read_text())["task_count"] == report.output_task_count
    model = transformers.AutoModelForCausalLM.from_pretrained(folded)
    base = load_base(bases["llama"]).state_dict()
    state = model.state_dict()
    deltas = {n.removeprefix("base_model.model.") + ".weight": d for n, d in lora_deltas(bases["llama"], out).items()}
    for name, tensor in base.items():
        torch.testing.assert_close(state[name], tensor + deltas.get(name, 0), rtol=1e-4, atol=1e-5, msg=name)
    assert transformers.AutoTokenizer.from_pretrained(folded)("the movie")["input_ids"]


def test_gpt2_conv1d_merge_and_fold(bases, tmp_path):
    base = bases["gpt2"]
    kw = dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    dirs = [make_adapter(base, tmp_path / "a", 5, r=4, lora_alpha=8, **kw),
            make_adapter(base, tmp_path / "b", 6, r=8, lora_alpha=8, **kw)]
    # k=3 < 6 probe texts: the newest adapter's typical samples are selected first.
    report = merge(dirs, tmp_path / "m", k=3)
    assert len(report.probes) == 3 and set(report.probes) <= set(TEXTS)
    assert_weights_vary(report.weights)
    expected = expected_deltas(base, dirs, report.weights)
    assert_deltas_close(lora_deltas(base, tmp_path / "m"), expected)
    folded = transformers.AutoModelForCausalLM.from_pretrained(fold_adapter(tmp_path / "m", tmp_path / "f"))
    base_state, state = load_base(base).state_dict(), folded.state_dict()
    name = "base_model.model.transformer.h.2.attn.c_attn"
    assert base_state["transformer.h.2.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: [in, out]
    torch.testing.assert_close(state["transformer.h.2.attn.c_attn.weight"],
                               base_state["transformer.h.2.attn.c_attn.weight"] + expected[name], rtol=1e-4, atol=1e-5)


def test_bert_classifier_modules_to_save(bases, tmp_path):
    base = bases["bert"]
    kw = dict(target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")
    dirs = [make_adapter(base, tmp_path / "a", 7, r=4, lora_alpha=8, **kw),
            make_adapter(base, tmp_path / "b", 8, r=4, lora_alpha=8, **kw)]
    report = merge(dirs, tmp_path / "m")
    assert_deltas_close(lora_deltas(base, tmp_path / "m"), expected_deltas(base, dirs, report.weights))
    head = report.weights[-1]
    assert 0.0 < head[-1] < 1.0
    merged = load_file(tmp_path / "m" / "adapter_model.safetensors")
    for key in ("base_model.model.classifier.weight", "base_model.model.classifier.bias"):
        parts = [load_file(d / "adapter_model.safetensors")[key] for d in dirs]
        assert not torch.allclose(parts[0], parts[1])
        torch.testing.assert_close(merged[key], head[0] * parts[0] + head[1] * parts[1], rtol=1e-5, atol=1e-6)
    model = PeftModel.from_pretrained(load_base(base), tmp_path / "m")
    logits = model(input_ids=torch.tensor([[2, 5, 6, 3]])).logits
    assert logits.shape == (1, 2)
    torch.testing.assert_close(model.base_model.model.classifier.modules_to_save["default"].weight,
                               merged["base_model.model.classifier.weight"])

    # A head present in only one of the adapters cannot be merged.
    headless = shutil.copytree(dirs[0], tmp_path / "headless")
    tensors = {k: v for k, v in load_file(headless / "adapter_model.safetensors").items() if "classifier" not in k}
    save_file(tensors, headless / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="only some of the adapters"):
        merge([headless, dirs[1]], tmp_path / "out")
    assert not (tmp_path / "out").exists()
