"""RecallCallback: task checkpoints written at train end (SPEC 3), typical samples (2.1), one writer per job."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from recall_hf import RecallCallback, RecallConfig
from recall_hf.callback import dataset_texts, render_prompt
from recall_hf.durable import current_umask
from recall_hf.fingerprint import load_fingerprint
from recall_hf.modeldir import FINGERPRINT_NAME, READY, RECALL_JSON, is_weight_file, sha256_file
from recall_hf.models import load_backbone, load_tokenizer
from recall_hf.representations import pooled_hidden_states
from recall_hf.samples import SAMPLES_NAME, candidate_texts, cluster_medoids
from recall_hf.task_checkpoint import write_task_checkpoint
from recall_hf.tiny import build_tiny_model

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
MOVIE = "movie film actor scene plot story great boring long short funny sad music ending".split()
EMAIL = "email offer free money click link account password bank prize winner urgent reply".split()


def sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) for _ in range(n)]


TEXTS = sentences(MOVIE, 24, 0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("callback") / "base"
    build_tiny_model("llama", path, texts=MOVIE + EMAIL + ["user assistant"])
    return path


def make_trainer(model_dir: Path, out: Path, callback: RecallCallback, texts=TEXTS, model=None) -> Trainer:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir)
    ds = Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True)
    args = TrainingArguments(str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             disable_tqdm=True, save_strategy="no", use_cpu=True)
    return Trainer(model, args, train_dataset=ds, processing_class=tok, callbacks=[callback],
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False))


def check_complete(ckpt: Path, kind: str = "full") -> dict:
    """Every file SPEC 3 asks for is there, and recall.json's hashes are those of the weight files."""
    names = {p.name for p in ckpt.iterdir()}
    need = {READY, RECALL_JSON, SAMPLES_NAME, FINGERPRINT_NAME, "tokenizer.json"}  # SPEC 3, 2.7
    need |= {"config.json", "model.safetensors"} if kind == "full" else {"adapter_config.json",
                                                                           "adapter_model.safetensors"}
    assert need <= names, need - names
    assert (ckpt / READY).stat().st_size == 0
    meta = json.loads((ckpt / RECALL_JSON).read_text())
    weights = {n for n in names if is_weight_file(n)}
    assert set(meta["sha256"]) == weights
    for name, digest in meta["sha256"].items():
        assert sha256_file(ckpt / name) == digest
    assert meta["task_count"] == 1 and meta["weights"] == kind and meta["library_version"]
    # Modes follow the umask (transformers alone writes weights 0600): a daemon running as another user can read it.
    mask = current_umask()
    assert oct(ckpt.stat().st_mode & 0o777) == oct(0o777 & ~mask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in ckpt.iterdir()} == {n: oct(0o666 & ~mask) for n in names}
    samples = [json.loads(line) for line in (ckpt / SAMPLES_NAME).read_text().splitlines()]
    assert samples and meta["num_samples"] == len(samples)
    assert all({"text", "cluster", "cluster_size"} <= set(s) for s in samples)
    return meta


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """One full fine-tuning run with the callback writing to a drop folder and to output_dir."""
    root = tmp_path_factory.mktemp("trained")
    config = RecallConfig(k=5, fingerprint_steps=2)
    callback = RecallCallback(drop_dir=root / "drop", config=config, task_name="movies", progress=False)
    trainer = make_trainer(base_dir, root / "out", callback)
    trainer.train()
    return root, callback, trainer


def test_callback_writes_complete_checkpoint(trained, base_dir):
    root, callback, trainer = trained
    assert callback.checkpoint_dir == root / "out" / "_recall_checkpoint"
    drops = [p for p in (root / "drop").iterdir()]
    assert drops == [callback.drop_path] and callback.drop_path.name.startswith("movies-")
    for ckpt in (callback.checkpoint_dir, callback.drop_path):
        meta = check_complete(ckpt)
        assert meta["task"] == "movies" and meta["kind"] == "task-checkpoint"
        assert load_fingerprint(ckpt / FINGERPRINT_NAME).steps == 2  # RecallConfig.fingerprint_steps
        assert meta["parent"] == str(base_dir.resolve()) and meta["base"] == str(base_dir.resolve())
        assert meta["parent_sha256"] == {"model.safetensors": sha256_file(base_dir / "model.safetensors")}
    # The checkpoint holds the trained weights, not the base's.
    trained_model = AutoModelForCausalLM.from_pretrained(callback.checkpoint_dir)
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(p, trained_model.state_dict()[name]), name
    assert any(not torch.equal(p, q) for p, q in zip(trained_model.parameters(),
                                                    AutoModelForCausalLM.from_pretrained(base_dir).parameters()))
    logged = [h for h in trainer.state.log_history if "recall/num_samples" in h]
    assert len(logged) == 1 and logged[0]["recall/num_samples"] == 5


def test_selected_samples_are_cluster_medoids(trained):
    _, callback, _ = trained
    config = callback.config
    tok = load_tokenizer(callback.checkpoint_dir)
    candidates = candidate_texts(TEXTS, config.max_candidates, config.seed)
    emb = pooled_hidden_states(load_backbone(callback.checkpoint_dir), tok, candidates, config.batch_size,
                               config.max_length, last_only=True)[0]
    emb = torch.nn.functional.normalize(emb, dim=-1).numpy()
    picks = cluster_medoids(emb, config.k, config.seed, config.minibatch_threshold)
    expected = [{"text": candidates[p["index"]], "cluster": p["cluster"], "cluster_size": p["cluster_size"]}
                for p in picks]
    got = [json.loads(line) for line in (callback.checkpoint_dir / SAMPLES_NAME).read_text().splitlines()]
    assert got == expected
    assert len({s["text"] for s in got}) == config.k and sum(s["cluster_size"] for s in got) == len(candidates)


def test_ready_is_written_last(base_dir, tmp_path, monkeypatch):
    import recall_hf.durable as tc

    events = []
    fsync_tree = tc.fsync_tree

    def record_fsync(path):
        events.append(("fsync", sorted(p.name for p in path.iterdir())))
        fsync_tree(path)

    rename = os.rename

    def record_rename(src, dst):
        events.append(("rename", sorted(os.listdir(src))))
        rename(src, dst)

    monkeypatch.setattr(tc, "fsync_tree", record_fsync)
    monkeypatch.setattr(tc.os, "rename", record_rename)
    model, tok = AutoModelForCausalLM.from_pretrained(base_dir), AutoTokenizer.from_pretrained(base_dir)
    out = write_task_checkpoint(model, tok, tmp_path / "ckpt", [{"text": "a", "cluster": 0, "cluster_size": 1}], "t")
    monkeypatch.undo()
    (kind1, before), (kind2, at_rename) = events
    assert kind1 == "fsync" and READY not in before and {RECALL_JSON, SAMPLES_NAME, "model.safetensors"} <= set(before)
    assert kind2 == "rename" and set(at_rename) == set(before) | {READY}
    ready = (out / READY).stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= ready for p in out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_failed_write_leaves_nothing(base_dir, tmp_path):
    model, tok = AutoModelForCausalLM.from_pretrained(base_dir), AutoTokenizer.from_pretrained(base_dir)
    with pytest.raises(ValueError, match="extra must not set"):
        write_task_checkpoint(model, tok, tmp_path / "c", [{"text": "a"}], "t", extra={"task_count": 3})
    with pytest.raises(TypeError):
        write_task_checkpoint(model, tok, tmp_path / "c", [{"text": "a"}], "t", extra={"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_dataset_texts_columns(base_dir):
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.chat_template = CHAT_TEMPLATE
    chat = [{"role": "system", "content": "be short"}, {"role": "user", "content": "movie plot"},
            {"role": "assistant", "content": "great"}, {"role": "user", "content": "ending"},
            {"role": "assistant", "content": "sad"}]
    prompt = "system: be short\nuser: movie plot\nassistant: great\nuser: ending\nassistant:"
    assert render_prompt(chat, tok) == prompt
    assert dataset_texts(Dataset.from_dict({"messages": [chat], "text": ["x"]}), tok) == [prompt]
    assert dataset_texts(Dataset.from_dict({"prompt": ["free money"], "completion": ["spam"]}), tok) == ["free money"]
    assert dataset_texts(Dataset.from_dict({"body": ["free money"]}), tok, text_field="body") == ["free money"]
    # Tokenized rows: the answer marked by labels == -100 elsewhere is cut; unmasked rows decode whole.
    ids = tok("movie plot great sad")["input_ids"]
    labels = [-100, -100, ids[2], ids[3]]
    rows = Dataset.from_dict({"input_ids": [ids, ids], "labels": [labels, ids]})
    assert dataset_texts(rows, tok) == ["movie plot", "movie plot great sad"]
    with pytest.raises(ValueError, match="text_field"):
        dataset_texts(Dataset.from_dict({"body": ["x"]}), tok)
    with pytest.raises(ValueError, match="not a column"):
        dataset_texts(Dataset.from_dict({"body": ["x"]}), tok, text_field="text")


def test_callback_refuses_bad_destinations(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        RecallCallback(save_to_output_dir=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ValueError, match="non-empty"):
        RecallCallback(drop_dir=tmp_path / "drop", merge_into=tmp_path / "taken")


def test_lora_callback_writes_adapter_checkpoint(base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    callback = RecallCallback(drop_dir=tmp_path / "drop", save_to_output_dir=False, config=RecallConfig(k=3),
                              progress=False)
    make_trainer(base_dir, tmp_path / "lora_out", callback, model=model).train()
    assert callback.checkpoint_dir == callback.drop_path and callback.drop_path.parent == tmp_path / "drop"
    assert not (tmp_path / "lora_out" / "_recall_checkpoint").exists()
    meta = check_complete(callback.drop_path, kind="adapter")
    assert meta["base"] == str(base_dir.resolve())
    assert not any(n.startswith("model") for n in os.listdir(callback.drop_path))
    assert [p.name for p in (tmp_path / "drop").iterdir()] == [callback.drop_path.name]  # no work dir left


DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch.distributed
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)
    from recall_hf import RecallCallback, RecallConfig

    base, root = sys.argv[1], sys.argv[2]
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    texts = [line for line in open(os.path.join(root, "texts.txt")).read().splitlines()]
    ds = Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True)
    callback = RecallCallback(drop_dir=os.path.join(root, "drop"), config=RecallConfig(k=3), task_name="ddp",
                              progress=False)
    args = TrainingArguments(os.path.join(root, "out"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             disable_tqdm=True, save_strategy="no", use_cpu=True)
    trainer = Trainer(model, args, train_dataset=ds, processing_class=tok, callbacks=[callback],
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    # After train() every rank sees the finished drop (the callback waits for the writer).
    result = [args.process_index, args.world_size, callback.checkpoint_dir is not None,
              len(os.listdir(os.path.join(root, "drop")))]
    with open(os.path.join(root, f"result-{args.process_index}.json"), "w") as f:
        f.write(repr(result).replace("True", "true").replace("False", "false"))
    # Without this, gloo's worker threads can abort the interpreter at exit (SIGABRT, "terminate called without an
    # active exception"), a torch behaviour independent of RECALL that made this test flaky under load.
    torch.distributed.destroy_process_group()
""")


def test_two_processes_write_one_checkpoint(base_dir, tmp_path):
    """Under `accelerate launch` with 2 CPU processes (gloo), only the main process writes."""
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
        pytest.skip("accelerate CLI not installed")
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # `--cpu` alone starts one process (accelerate needs mpirun for several CPU processes); `--multi_gpu` starts
    # them through torchrun and `use_cpu=True` in the script makes them a gloo CPU group.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(script),
           str(base_dir), str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
    except subprocess.TimeoutExpired as err:
        # A hang is what a deadlock looks like (a rank waiting at a barrier the main process never reaches): fail.
        tail = (err.stderr or b"")[-2000:]
        pytest.fail(f"accelerate launch with 2 CPU processes did not finish in {err.timeout:.0f}s (deadlock?): "
                    f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}")
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result-*.json"))]
    if proc.returncode != 0 and not results and ("gloo" in proc.stderr.lower() or "rendezvous" in proc.stderr.lower()):
        pytest.skip(f"accelerate cannot start 2 CPU processes here: {proc.stderr[-300:]}")
    assert results == [[0, 2, True, 1], [1, 2, False, 1]], proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    drops = list((tmp_path / "drop").iterdir())
    assert len(drops) == 1
    check_complete(drops[0])
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_lora_merge_into_two_adapters(base_dir, tmp_path):
    """Adapter checkpoints fold into a merged adapter (adapter-level RECALL); a rerun replaces output_dir's copy."""
    from peft import LoraConfig, PeftModel, get_peft_model

    merged, out = tmp_path / "merged", tmp_path / "lora_out"  # both tasks reuse one output_dir
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    for name, texts in (("movies", TEXTS), ("emails", sentences(EMAIL, 24, 1))):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora)
        callback = RecallCallback(merge_into=merged, config=RecallConfig(k=3), task_name=name, progress=False)
        make_trainer(base_dir, out, callback, texts=texts, model=model).train()
        check_complete(out / "_recall_checkpoint", kind="adapter")
        assert json.loads((out / "_recall_checkpoint" / RECALL_JSON).read_text())["task"] == name
    assert (merged / "adapter_config.json").is_file() and merged.resolve().name == "v0002"
    assert json.loads((merged / RECALL_JSON).read_text())["task_count"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), merged)
