"""Continual full fine-tuning with `RecallCallback`: three tasks, one rolling merged model.

Each task fine-tunes the current merged model; when its training ends, the callback picks the task's typical samples,
writes a task checkpoint and folds it into `<workdir>/merged` with RECALL. At the end every task is evaluated on the
merged model and on the last task's own fine-tuned model, which shows how much of the earlier tasks survived.

    python examples/continual_full.py                     # tiny model built offline, about a minute on a laptop CPU
    python examples/continual_full.py --model DIR --steps 200 --workdir runs/full   # a real causal LM

The tasks come from `demo_tasks.py` beside this file (three questions about the same kind of sentence).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from demo_tasks import TASKS, make_split, vocabulary_texts  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from recall_hf import RecallCallback, RecallConfig  # noqa: E402
from recall_hf.tiny import build_tiny_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="a causal LM directory or hub id (default: build a tiny Llama offline)")
    p.add_argument("--workdir", help="where runs, checkpoints and the merged model go (default: a temp dir)")
    p.add_argument("--drop-dir", help="also publish every task checkpoint to this drop folder (the daemon's)")
    p.add_argument("--steps", type=int, default=60, help="training steps per task (default: 60)")
    p.add_argument("--n-train", type=int, default=256, help="training examples per task (default: 256)")
    p.add_argument("--n-eval", type=int, default=64, help="evaluation examples per task (default: 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (default: 3e-3; use ~2e-5 for real models)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=16, help="typical samples per task (default: 16)")
    p.add_argument("--tau", type=float, default=RecallConfig.tau, help="RECALL softmax temperature")
    return p.parse_args(argv)


def task_dataset(task, tok, n: int, seed: int) -> Dataset:
    """`prompt` (what RECALL clusters: the input side) and `text` = prompt + answer (what the model learns)."""
    rows = make_split(task, n, seed)
    data = Dataset.from_dict({"prompt": [p for p, _ in rows], "text": [f"{p} {task.labels[y]}" for p, y in rows]})
    return data.map(lambda b: tok(b["text"], truncation=True, max_length=128), batched=True)


@torch.no_grad()
def accuracy(model, tok, task, n: int) -> float:
    """Share of held-out prompts whose more likely answer (summed log-probability) is the right label."""
    model.eval()
    rows = make_split(task, n, seed=10_000)
    prompt_lens = [len(tok(p)["input_ids"]) for p, _ in rows]
    scores = []
    for answer in task.labels:
        enc = tok([f"{p} {answer}" for p, _ in rows], return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logp = model(**enc).logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        pos = torch.arange(ids.shape[1] - 1)[None]
        answer_mask = (pos >= torch.tensor(prompt_lens)[:, None] - 1) & mask[:, 1:].bool()
        scores.append((logp * answer_mask).sum(-1))
    predicted = torch.stack(scores, -1).argmax(-1)
    return (predicted == torch.tensor([y for _, y in rows])).float().mean().item()


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="recall_full_"))
    model_dir = args.model
    if model_dir is None:
        model_dir = workdir / "base"
        if not model_dir.exists():
            build_tiny_model("llama", model_dir, texts=vocabulary_texts(), hidden=64, layers=4)
    merged = workdir / "merged"
    config = RecallConfig(k=args.k, tau=args.tau, device="cuda" if torch.cuda.is_available() else "cpu")
    init = model_dir
    last = None
    for task in TASKS:
        tok = AutoTokenizer.from_pretrained(init)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        model = AutoModelForCausalLM.from_pretrained(init)
        out = workdir / f"run-{task.name}"
        callback = RecallCallback(drop_dir=args.drop_dir, merge_into=merged, config=config, task_name=task.name,
                                  save_to_output_dir=True)
        trainer = Trainer(
            model,
            TrainingArguments(str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                              learning_rate=args.lr, logging_steps=max(args.steps // 3, 1), save_strategy="no",
                              report_to=[]),
            train_dataset=task_dataset(task, tok, args.n_train, seed=0),
            processing_class=tok,
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
            callbacks=[callback],
        )
        trainer.train()
        own = accuracy(trainer.model, tok, task, args.n_eval)
        print(f"[{task.name}] accuracy of the task's own fine-tuned model: {own:.2f}")
        if callback.report is not None:
            print(f"[{task.name}] RECALL weight of the new task per layer:",
                  " ".join(f"{w:.2f}" for w in callback.report.newest_weight))
        last = callback.checkpoint_dir
        init = merged  # the next task fine-tunes the merged model (SPEC 2.6)

    tok = AutoTokenizer.from_pretrained(merged)
    tok.pad_token, tok.padding_side = tok.pad_token or tok.eos_token, "right"
    results = {name: AutoModelForCausalLM.from_pretrained(path) for name, path in
               (("last task model", last), ("RECALL merged", merged))}
    print(f"\n{'task':<12}" + "".join(f"{name:>18}" for name in results))
    for task in TASKS:
        print(f"{task.name:<12}" + "".join(f"{accuracy(m, tok, task, args.n_eval):>18.2f}" for m in results.values()))
    print(f"\nMerged model: {merged} -> {merged.resolve()}")


if __name__ == "__main__":
    main()
