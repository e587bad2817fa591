"""TRL `SFTTrainer` on chat `messages`, with RECALL after every task (`run_task_sequence` + `RecallCallback`).

Each task is a chat dataset (`[{"role": "user", ...}, {"role": "assistant", ...}]`). `run_task_sequence` builds an
`SFTTrainer` per task through `make_trainer`, adds a `RecallCallback`, trains, and folds the task checkpoint into
`<workdir>/merged`. The typical samples are the chats' prompt side rendered with the tokenizer's chat template
(`add_generation_prompt=True`), as SPEC 2.1 asks; they are printed for the last task.

    python examples/trl_sft.py                            # tiny model built offline, well under a minute on a CPU
    python examples/trl_sft.py --model DIR --steps 200 --lr 2e-5 --workdir runs/sft

For a single task, the callback alone is enough:
`SFTTrainer(..., callbacks=[RecallCallback(drop_dir="/srv/recall/drop")]).train()`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from demo_tasks import TASKS, make_split, vocabulary_texts  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from recall_hf import RecallConfig, run_task_sequence  # noqa: E402
from recall_hf.samples import SAMPLES_NAME  # noqa: E402
from recall_hf.tiny import build_tiny_model  # noqa: E402

# The tiny model's word-level tokenizer has no chat template; this one renders "role : content" lines.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant :{% endif %}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="a chat causal LM directory or hub id (default: build a tiny Llama offline)")
    p.add_argument("--workdir", help="where runs, checkpoints and the merged model go (default: a temp dir)")
    p.add_argument("--drop-dir", help="also publish every task checkpoint to this drop folder (the daemon's)")
    p.add_argument("--steps", type=int, default=40, help="training steps per task (default: 40)")
    p.add_argument("--n-train", type=int, default=128, help="chats per task (default: 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (default: 3e-3; ~2e-5 for real models)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=8, help="typical samples per task (default: 8)")
    p.add_argument("--no-chain", action="store_true", help="fine-tune every task from the base, not the merged model")
    return p.parse_args(argv)


def chats(task, n: int) -> Dataset:
    rows = make_split(task, n, seed=0)
    return Dataset.from_dict({"messages": [[{"role": "user", "content": p},
                                            {"role": "assistant", "content": task.labels[y]}] for p, y in rows]})


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="recall_sft_"))
    model_dir = Path(args.model) if args.model else workdir / "base"
    if args.model is None and not model_dir.exists():
        _, tok = build_tiny_model("llama", model_dir, texts=vocabulary_texts() + ["user assistant"], hidden=64)
        tok.chat_template = TINY_CHAT_TEMPLATE
        tok.save_pretrained(model_dir)

    def make_trainer(init: Path, name: str, data: Dataset, output_dir: Path) -> SFTTrainer:
        tok = AutoTokenizer.from_pretrained(init)
        sft_args = SFTConfig(output_dir=str(output_dir), max_steps=args.steps, learning_rate=args.lr,
                             per_device_train_batch_size=args.batch_size, logging_steps=max(args.steps // 2, 1),
                             save_strategy="no", report_to=[], max_length=128,
                             bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return SFTTrainer(model=AutoModelForCausalLM.from_pretrained(init), args=sft_args, train_dataset=data,
                          processing_class=tok)

    config = RecallConfig(k=args.k, device="cuda" if torch.cuda.is_available() else "cpu")
    steps = run_task_sequence(model_dir, [(t.name, chats(t, args.n_train)) for t in TASKS], make_trainer, workdir,
                              config, chain=not args.no_chain, drop_dir=args.drop_dir)
    for step in steps:
        weights = " ".join(f"{w:.2f}" for w in step.report.newest_weight) if step.report else "(first task)"
        print(f"[{step.task}] trained from {step.init_model.name}; new-task weight per layer: {weights}")
    print(f"\nTypical samples of {steps[-1].task} (prompt side, chat template applied):")
    for line in (steps[-1].checkpoint / SAMPLES_NAME).read_text().splitlines()[:4]:
        print("  ", json.dumps(json.loads(line)["text"]))
    print(f"\nMerged model: {workdir / 'merged'} -> {steps[-1].merged}")


if __name__ == "__main__":
    main()
