"""The whole product in one run: a daemon folds three fine-tuned tasks into a deployed model, one after another.

1. A base model is published by `recall-hf daemon --base` as `deploy/versions/v0000`.
2. For each task: fine-tune the live model (`deploy/current`) with a plain HF `Trainer` plus
   `RecallCallback(drop_dir=...)`; the callback writes a task checkpoint into the drop folder; the daemon merges it
   with RECALL and publishes `v0001`, `v0002`, ...
3. Beside it, plain sequential fine-tuning of the same tasks with the same settings (no merging).
4. A table of every task's accuracy (rank classification over the task's label words) after every step.

Default: a tiny Llama built from config, warmed up on plain sentences, and three built-in tasks (offline, a few
minutes on 2 CPU cores). `--model smollm2` uses SmolLM2-135M-Instruct and three real tasks (see benchmarks/).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recall_hf import RecallCallback, RecallConfig  # noqa: E402
from recall_hf.models import quiet_transformers  # noqa: E402


@dataclass
class Task:
    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


# ---- Tasks and models ---------------------------------------------------------------------------------------------


def tiny_setup(workdir: Path, args) -> tuple[Path, list[Task]]:
    """A tiny Llama warmed up on plain sentences (a shared starting point) and the built-in tasks."""
    from demo_tasks import TASKS, make_split, sentence, vocabulary_texts

    from recall_hf.tiny import build_tiny_model

    base = workdir / "base"
    model, tok = build_tiny_model("llama", None, texts=vocabulary_texts(), hidden=64, layers=4, seed=args.seed)
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in tqdm(range(args.warmup_steps), desc="Warm-up of the tiny base (language modelling)"):
        batch = tok([sentence(rng)[0] for _ in range(32)], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(base)
    tok.save_pretrained(base)
    tasks = [Task(t.name, list(t.labels), make_split(t, args.train_n, args.seed), make_split(t, args.test_n, 1000))
             for t in TASKS]
    return base, tasks


def smollm2_setup(workdir: Path, args) -> tuple[Path, list[Task]]:
    from benchmarks.assets import load_task, prompt_for, smollm2_dir

    tasks = []
    for name in ("sentiment", "spam", "wordnet-category"):
        t = load_task(name, seed=args.seed)
        tasks.append(Task(name, t.labels, [(prompt_for(t, x), y) for x, y in t.train[: args.train_n]],
                          [(prompt_for(t, x), y) for x, y in t.test[: args.test_n]]))
    return smollm2_dir(), tasks


def answer_ids(tok, prompt: str, word: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the answer `" " + word` that follows it."""
    p = tok(prompt)["input_ids"]
    full = tok(prompt + " " + word)["input_ids"]
    if full[: len(p)] != p:  # tokenizer merged across the boundary: tokenize the answer alone
        return p, tok(" " + word, add_special_tokens=False)["input_ids"]
    return p, full[len(p) :]


def sft_dataset(tok, task: Task):
    import datasets

    rows = []
    for prompt, y in task.train:
        p, a = answer_ids(tok, prompt, task.labels[y])
        rows.append({"prompt": prompt, "input_ids": p + a, "attention_mask": [1] * (len(p) + len(a)),
                     "labels": [-100] * len(p) + a})
    return datasets.Dataset.from_list(rows)


@torch.no_grad()
def accuracy(model, tok, task: Task, batch_size: int = 16) -> float:
    """Rank classification: the label word whose answer tokens have the lowest mean loss."""
    model.eval()
    correct = 0
    for start in range(0, len(task.test), batch_size):
        chunk = task.test[start : start + batch_size]
        seqs, owners = [], []
        for i, (prompt, _) in enumerate(chunk):
            for j, word in enumerate(task.labels):
                p, a = answer_ids(tok, prompt, word)
                seqs.append((p, a))
                owners.append((i, j))
        width = max(len(p) + len(a) for p, a in seqs)
        pad = tok.pad_token_id
        ids = torch.full((len(seqs), width), pad)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (p, a) in enumerate(seqs):
            ids[r, : len(p) + len(a)] = torch.tensor(p + a)
            mask[r, : len(p) + len(a)] = 1
            labels[r, len(p) : len(p) + len(a)] = torch.tensor(a)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        tgt = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.clamp_min(0), reduction="none")
        valid = (tgt != -100).float()
        mean_loss = (loss * valid).sum(1) / valid.sum(1)
        scores = torch.full((len(chunk), len(task.labels)), float("inf"))
        for r, (i, j) in enumerate(owners):
            scores[i, j] = mean_loss[r]
        correct += sum(int(scores[i].argmin()) == y for i, (_, y) in enumerate(chunk))
    return correct / len(task.test)


def train(model, tok, task: Task, out_dir: Path, args, callbacks=()) -> None:
    targs = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=10, logging_steps=10 ** 6,
        save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, run_name=task.name,
        disable_tqdm=False,
    )
    collator = transformers.DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=sft_dataset(tok, task),
                                   data_collator=collator, processing_class=tok, callbacks=list(callbacks))
    trainer.train()


def load(model_dir: Path):
    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


# ---- The daemon ----------------------------------------------------------------------------------------------------


def live_version(deploy: Path) -> int:
    current = deploy / "current"
    return int(os.readlink(current).rstrip("/").rsplit("/", 1)[-1][1:]) if current.is_symlink() else -1


def wait_for_version(deploy: Path, version: int, daemon: subprocess.Popen, log: Path, timeout: float) -> None:
    start = time.time()
    while live_version(deploy) < version:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {daemon.returncode}; see {log}")
        quarantined = sorted((deploy / "quarantine").glob("*/REASON.json")) if (deploy / "quarantine").exists() else []
        if quarantined:
            raise RuntimeError(f"the daemon quarantined a drop: {quarantined[-1].read_text()[:500]}")
        if time.time() - start > timeout:
            raise RuntimeError(f"v{version:04d} not live after {timeout:.0f}s; see {log}")
        time.sleep(0.5)


# ---- Main -----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"], help="tiny (default, offline) or smollm2")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "demo"), help="where everything is written (recreated)")
    p.add_argument("--train-n", type=int, default=None, help="training examples per task")
    p.add_argument("--test-n", type=int, default=None, help="test examples per task")
    p.add_argument("--epochs", type=float, default=None, help="epochs per task")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size")
    p.add_argument("--warmup-steps", type=int, default=300, help="tiny model only: language-model warm-up steps")
    p.add_argument("--tau", type=float, default=None, help="RECALL temperature (default: RecallConfig's)")
    p.add_argument("--from", dest="start", default="current", choices=["current", "base"],
                   help="fine-tune each task from the live model (current; the daemon merges convexly) or from the "
                   "base v0000 (the daemon then uses --fusion task_vector)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    args.train_n = args.train_n or (512 if tiny else 256)
    args.test_n = args.test_n or (200 if tiny else 100)
    args.epochs = args.epochs or (6 if tiny else 1)
    args.lr = args.lr or (2e-3 if tiny else 3e-5)
    torch.manual_seed(args.seed)

    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    drop, deploy = workdir / "drop", workdir / "deploy"
    drop.mkdir(parents=True)
    t0 = time.time()
    base, tasks = (tiny_setup if tiny else smollm2_setup)(workdir, args)
    fusion = "task_vector" if args.start == "base" else "convex"
    config = RecallConfig(fusion=fusion) if args.tau is None else RecallConfig(tau=args.tau, fusion=fusion)

    log = workdir / "daemon.log"
    cmd = [sys.executable, "-m", "recall_hf.cli", "daemon", "--drop", str(drop), "--deploy", str(deploy),
           "--base", str(base), "--poll", "2", "--tau", str(config.tau), "--fusion", fusion]
    print(f"Starting the daemon: {' '.join(cmd[2:])}  (log: {log})")
    with open(log, "w") as log_file:
        daemon = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for_version(deploy, 0, daemon, log, timeout=300)
        seq_model, tok = load(base)
        acc = {"RECALL (daemon)": [], "sequential FT": []}
        for step, task in enumerate(tasks, 1):
            print(f"\n== Task {step}/{len(tasks)}: {task.name} ==")
            model, tok = load(deploy / "current" if args.start == "current" else deploy / "versions" / "v0000")
            callback = RecallCallback(drop_dir=drop, task_name=task.name, config=config, save_to_output_dir=False)
            train(model, tok, task, workdir / "train" / f"recall-{task.name}", args, [callback])
            print(f"Checkpoint dropped; waiting for the daemon to publish v{step:04d} ...")
            wait_for_version(deploy, step, daemon, log, timeout=900)
            deployed, _ = load(deploy / "current")
            train(seq_model, tok, task, workdir / "train" / f"seq-{task.name}", args)
            for name, m in (("RECALL (daemon)", deployed), ("sequential FT", seq_model)):
                acc[name].append([accuracy(m, tok, t) for t in tasks[:step]])
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)

    print_table(tasks, acc)
    print(f"\nDeployed versions: {deploy / 'versions'}  (live: {os.readlink(deploy / 'current')})")
    print(f"Per-layer weights plot: {deploy / 'current' / 'recall_weights.png'}")
    print(f"Model card (every task folded in): {deploy / 'current' / 'README.md'}")
    print(f"Status: recall-hf status --deploy {deploy}    Roll back: recall-hf rollback --deploy {deploy}")
    print(f"Total time: {time.time() - t0:.0f}s")
    return 0


def print_table(tasks: list[Task], acc: dict[str, list[list[float]]]) -> None:
    n = len(tasks)
    print("\nAccuracy of each task after each step (rank classification over the label words)")
    header = f"{'method':<18} {'task':<18}" + "".join(f"{'after ' + t.name:>18}" for t in tasks)
    print(header)
    print("-" * len(header))
    for method, rows in acc.items():
        for j, task in enumerate(tasks):
            cells = "".join(f"{rows[s][j]:>18.3f}" if j <= s else f"{'':>18}" for s in range(n))
            print(f"{method:<18} {task.name:<18}{cells}")
    print()
    for method, rows in acc.items():
        final = rows[-1]
        bwt = sum(final[j] - rows[j][j] for j in range(n - 1)) / max(1, n - 1)
        plast = sum(rows[j][j] for j in range(n)) / n
        print(f"{method:<18} ACC {sum(final) / n:.3f}   BWT {bwt:+.3f}   new-task accuracy {plast:.3f}")


if __name__ == "__main__":
    sys.exit(main())
