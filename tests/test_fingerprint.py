"""Task fingerprints (SPEC 2.7): replay, divergence math, untrusted files, task checkpoints that carry them."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import PROBES, perturb

from recall_hf.calibrate import prompts_match
from recall_hf.fingerprint import (
    FINGERPRINT_NAME,
    FingerprintConfig,
    collect_fingerprints,
    compute_fingerprint,
    fingerprint_divergence,
    information_scale,
    load_fingerprint,
    load_task_model,
    logits_kl,
    output_size,
    read_fingerprints,
    save_fingerprint,
    score_and_represent,
    score_tasks,
    topk_kl,
    write_fingerprints,
)
from recall_hf.modeldir import READY, RECALL_JSON, weight_hashes
from recall_hf.representations import pooled_hidden_states
from recall_hf.task_checkpoint import make_task_checkpoint, write_task_checkpoint
from recall_hf.tiny import build_tiny_model

SMALL = FingerprintConfig(top_k=8, steps=3, max_length=32, batch_size=4)


@pytest.fixture(scope="module")
def tiny():
    """`{arch: (model, tokenizer, fingerprint)}` for a causal LM pair and an encoder classifier."""
    out = {}
    for arch in ("llama", "gpt2", "bert"):
        model, tok = build_tiny_model(arch, texts=PROBES)
        out[arch] = (model, tok, compute_fingerprint(model, tok, PROBES, f"task-{arch}", SMALL))
    return out


# ------------------------------------------------------------------------------------------------- math


def test_topk_kl_is_zero_on_itself_and_counts_mass_moved_to_unlisted_tokens():
    p = torch.log_softmax(torch.randn(5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), -1)
    p = p.topk(4).values
    assert topk_kl(p, p).abs().max() < 1e-12
    # q gives the listed tokens half their mass and the rest to the tail: KL must see it (renormalising would not).
    q = p + math.log(0.5)
    kl = topk_kl(p, q)
    pm = p.exp()
    tail_p = 1 - pm.sum(-1)
    tail_q = 1 - 0.5 * pm.sum(-1)
    expected = (pm * math.log(2)).sum(-1) + tail_p * (tail_p.log() - tail_q.log())
    assert torch.allclose(kl, expected, atol=1e-10)
    assert (kl > 0.1).all()


def test_logits_kl_matches_the_definition():
    p, q = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    assert logits_kl(p, q).item() == pytest.approx((lp.exp() * (lp - lq)).sum().item())
    assert logits_kl(p, p).item() == pytest.approx(0.0, abs=1e-12)


def test_information_scale_is_the_kl_of_the_task_models_predictions_from_a_uniform_guess(tiny):
    model, _, fp = tiny["bert"]
    lp = torch.log_softmax(fp.logits.double(), -1)
    n_classes = fp.logits.shape[-1]
    expected = (math.log(n_classes) + (lp.exp() * lp).sum(-1)).mean().item()  # log C - H(p)
    assert information_scale(fp) == pytest.approx(expected, rel=1e-9) and expected > 0
    assert information_scale(replace(fp, logits=torch.zeros_like(fp.logits))) == 1e-6  # a guess knows nothing
    assert output_size(model) is None

    model, _, fp = tiny["llama"]
    vocab = output_size(model)
    assert vocab == model.lm_head.weight.shape[0]
    p = fp.topk_logprobs.double().exp()
    tail = 1 - p.sum(-1)
    k = fp.topk_ids.shape[-1]
    listed = (p * (fp.topk_logprobs.double() + math.log(vocab))).sum(-1)
    by_hand = listed + tail * (tail.log() - math.log(1 - k / vocab))
    assert information_scale(fp, vocab) == pytest.approx(by_hand.mean().item(), rel=1e-9)
    with pytest.raises(ValueError, match="vocabulary size"):
        information_scale(fp)
    assert information_scale(replace(fp, kind="representation")) == 1.0


# ------------------------------------------------------------------------------------------------- replay


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_fingerprint_replays_to_zero_on_its_own_model_whatever_the_batching(tiny, arch):
    model, _, fp = tiny[arch]
    assert fp.kind == ("classifier" if arch == "bert" else "lm")
    for batch_size in (1, 3, 16):
        score = fingerprint_divergence(model, fp, batch_size)
        assert score.divergence < 1e-6 and score.representation < 1e-6


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_score_and_represent_scores_as_score_tasks_and_pools_every_layer_over_the_prompts(tiny, arch):
    """One replay gives a task's score exactly as `score_tasks` and RECALL's representations of its prompts, as
    the representation pass computes them (right padding, no greedy tokens) up to float noise."""
    model, tok, fp = tiny[arch]
    changed, _ = build_tiny_model(arch, texts=PROBES)
    perturb(changed, "", scale=0.1)
    fps = {"other": compute_fingerprint(model, tok, PROBES[::-1], "other", SMALL), fp.task: fp}
    scores, reps = score_and_represent(changed, fps, fp.task, batch_size=3)
    assert list(scores) == list(fps) and scores == score_tasks(changed, fps, 3)
    budget = int(fp.prompt_lengths.max())
    expected = pooled_hidden_states(changed, tok, PROBES, batch_size=4, max_length=budget)
    assert reps.shape == expected.shape and torch.allclose(reps, expected, atol=1e-5)
    assert prompts_match(fp, PROBES, tok, budget)
    assert not prompts_match(fp, PROBES[::-1], tok, budget) and not prompts_match(fp, PROBES[:-1], tok, budget)
    assert not prompts_match(fp, PROBES, tok, budget - 1)  # the merge asked for shorter representations
    with pytest.raises(ValueError, match="No fingerprint of task 'missing'"):
        score_and_represent(changed, fps, "missing")


def test_lm_fingerprint_holds_prompt_plus_greedy_tokens(tiny):
    model, tok, fp = tiny["llama"]
    assert fp.topk_ids.shape == (len(PROBES), SMALL.steps, SMALL.top_k)
    assert torch.equal(fp.lengths - fp.prompt_lengths, torch.full((len(PROBES),), SMALL.steps - 1))
    row = fp.rows([0])[0]
    # The replayed tokens after the prompt are the model's own greedy choices, the top-1 stored ids.
    assert row[int(fp.prompt_lengths[0]) :] == fp.topk_ids[0, :-1, 0].tolist()
    assert row[: int(fp.prompt_lengths[0])] == tok(PROBES[0])["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_changed_model_diverges_and_more_change_diverges_more(tiny, arch):
    model, _, fp = tiny[arch]
    scores = []
    for scale in (0.05, 0.5):
        changed, _ = build_tiny_model(arch, texts=PROBES)
        perturb(changed, "", scale=scale)
        scores.append(fingerprint_divergence(changed, fp).divergence)
    assert 0 < scores[0] < scores[1]


def test_fingerprint_of_another_kind_or_vocabulary_is_refused(tiny):
    with pytest.raises(ValueError, match="classifier fingerprint but the model is a lm"):
        fingerprint_divergence(tiny["llama"][0], tiny["bert"][2])
    model, tok = build_tiny_model("llama", texts=["x"], vocab_size=8)
    with pytest.raises(ValueError, match="beyond this model's vocabulary"):
        fingerprint_divergence(model, tiny["llama"][2])


# ------------------------------------------------------------------------------------------------- files


def test_save_load_round_trip_is_exact_and_small(tiny, tmp_path):
    fp = tiny["llama"][2]
    path = save_fingerprint(fp, tmp_path / FINGERPRINT_NAME)
    back = load_fingerprint(path)
    assert (back.kind, back.task, back.pad_id) == (fp.kind, fp.task, fp.pad_id)
    for name, t in fp.tensors().items():
        assert torch.equal(getattr(back, name), t)
    assert path.stat().st_size < 50_000


def _one_line_error(path, match):
    with pytest.raises(ValueError, match=match) as err:
        load_fingerprint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_corrupt_fingerprint_files_are_refused_in_one_line(tiny, tmp_path):
    good = save_fingerprint(tiny["llama"][2], tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    _one_line_error(tmp_path / "cut.safetensors", "not a readable safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    _one_line_error(tmp_path / "junk.safetensors", "not a readable safetensors")
    _one_line_error(tmp_path / "absent.safetensors", "does not exist")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda fp: replace(fp, topk_logprobs=fp.topk_logprobs.clone().fill_(float("nan"))), "NaN/Inf"),
        (lambda fp: replace(fp, topk_logprobs=fp.topk_logprobs.abs() + 1), "not log-probabilities"),
        (lambda fp: replace(fp, lengths=fp.lengths + 1), "replay exactly|lengths must satisfy"),
        (lambda fp: replace(fp, pooled=fp.pooled.double()), "must be torch.float32"),
        (lambda fp: replace(fp, topk_ids=fp.topk_ids[:, :, :2]), "must both be"),
        (lambda fp: replace(fp, input_ids=-fp.input_ids), "negative"),
    ],
)
def test_fingerprint_files_with_bad_tensors_are_refused(tiny, tmp_path, change, match):
    from safetensors.torch import save_file

    bad = change(tiny["llama"][2])
    meta = {"format": "recall-fingerprint", "version": "1", "kind": "lm", "task": "t", "pad_id": "0"}
    save_file({k: v.contiguous() for k, v in bad.tensors().items()}, str(tmp_path / "bad.safetensors"), metadata=meta)
    _one_line_error(tmp_path / "bad.safetensors", match)


def test_fingerprint_files_with_bad_metadata_or_names_are_refused(tiny, tmp_path):
    from safetensors.torch import save_file

    fp = tiny["llama"][2]
    meta = {"format": "recall-fingerprint", "version": "1", "kind": "lm", "task": "t", "pad_id": "0"}
    cases = [({**meta, "format": "other"}, fp.tensors(), "not a recall-fingerprint"),
             ({**meta, "kind": "vision"}, fp.tensors(), "kind must be one of"),
             ({**meta, "pad_id": "-1"}, fp.tensors(), "pad_id"),
             ({**meta, "task": ""}, fp.tensors(), "task name"),
             (meta, {**fp.tensors(), "extra": torch.zeros(1)}, "holds exactly")]
    for i, (m, tensors, match) in enumerate(cases):
        save_file(tensors, str(tmp_path / f"{i}.safetensors"), metadata=m)
        _one_line_error(tmp_path / f"{i}.safetensors", match)


def test_a_version_carries_every_task_fingerprint(tiny, tmp_path):
    fps = {"task-llama": tiny["llama"][2], "task/with odd name": replace(tiny["gpt2"][2], task="task/with odd name")}
    write_fingerprints(tmp_path, fps)
    back = read_fingerprints(tmp_path)
    assert sorted(back) == sorted(fps)
    assert torch.equal(back["task/with odd name"].topk_ids, fps["task/with odd name"].topk_ids)
    drop = tmp_path / "drop"
    drop.mkdir()
    save_fingerprint(replace(tiny["bert"][2], task="task-llama"), drop / FINGERPRINT_NAME)
    union = collect_fingerprints(tmp_path, drop)
    assert sorted(union) == sorted(fps) and union["task-llama"].kind == "classifier"  # the newer drop wins


# ------------------------------------------------------------------------------------------------- task checkpoints


def test_write_task_checkpoint_stores_the_fingerprint_but_not_as_a_weight(tiny, tmp_path):
    model, tok, _ = tiny["gpt2"]
    samples = [{"text": t, "cluster": i, "cluster_size": 1} for i, t in enumerate(PROBES)]
    out = write_task_checkpoint(model, tok, tmp_path / "ckpt", samples, "mytask")
    fps = read_fingerprints(out)
    assert list(fps) == ["mytask"] and fps["mytask"].num_samples == len(PROBES)
    assert fingerprint_divergence(model, fps["mytask"]).divergence < 1e-6
    assert FINGERPRINT_NAME not in json.loads((out / RECALL_JSON).read_text())["sha256"]
    out2 = write_task_checkpoint(model, tok, tmp_path / "plain", samples, "mytask", fingerprint=False)
    assert not (out2 / FINGERPRINT_NAME).exists()


def test_make_task_checkpoint_turns_a_plain_folder_into_a_task_checkpoint(tmp_path):
    folder = tmp_path / "finetuned"
    model, _ = build_tiny_model("llama", folder, texts=PROBES)
    hashes = weight_hashes(folder)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROBES * 3))
    make_task_checkpoint(folder, texts, task="sentiment", parent=tmp_path)
    record = json.loads((folder / RECALL_JSON).read_text())
    assert record["kind"] == "task-checkpoint" and record["task"] == "sentiment" and record["sha256"] == hashes
    assert (folder / READY).exists() and weight_hashes(folder) == hashes
    fp = read_fingerprints(folder)["sentiment"]
    assert fp.num_samples == len(PROBES)  # duplicates collapse to the unique texts
    assert fingerprint_divergence(model, fp).divergence < 1e-6
    with pytest.raises(ValueError, match="already a task checkpoint"):
        make_task_checkpoint(folder, texts)
    make_task_checkpoint(folder, PROBES[:2], task="other", overwrite=True)
    assert list(read_fingerprints(folder)) == ["other"]


def test_make_task_checkpoint_refuses_a_folder_without_weights(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no weight files") as err:
        make_task_checkpoint(folder, PROBES)
    assert "\n" not in str(err.value)
    assert not (folder / READY).exists() and not (folder / RECALL_JSON).exists()


def test_checkpoint_fingerprint_is_skipped_not_fatal_when_the_model_cannot_replay(tiny, caplog):
    from recall_hf.fingerprint import fingerprint_for_checkpoint

    _, tok, _ = tiny["llama"]
    samples = [{"text": t} for t in PROBES]
    assert fingerprint_for_checkpoint(torch.nn.Linear(2, 2), tok, samples, "t") is None
    assert fingerprint_for_checkpoint("some/dir", tok, samples, "t") is None
    assert "No fingerprint for task 't'" in caplog.text


def test_make_task_checkpoint_takes_a_lora_adapter_folder_on_its_local_base(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tmp_path / "base"
    model, _ = build_tiny_model("llama", base, texts=PROBES)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # no tokenizer in the folder: the base's is used
    make_task_checkpoint(adapter, PROBES, task="lora-task")
    record = json.loads((adapter / RECALL_JSON).read_text())
    assert record["weights"] == "adapter" and record["base"] == record["parent"] == str(base.resolve())
    fp = read_fingerprints(adapter)["lora-task"]
    reloaded = PeftModel.from_pretrained(load_task_model(base), str(adapter))
    assert fingerprint_divergence(reloaded, fp).divergence < 1e-6
    assert fingerprint_divergence(load_task_model(base), fp).divergence > 1e-4  # the adapter's effect is recorded
    with pytest.raises(ValueError, match="not a local directory"):
        make_task_checkpoint(adapter, PROBES, base=tmp_path / "nowhere", overwrite=True)
