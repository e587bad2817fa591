"""Accuracy at the daemon's adapter rank cap against the uncapped adapter (issue 12).

An adapter deployment folds every LoRA drop into the deployed adapter with RECALL; the stacked rank grows by each
drop's rank, so the daemon caps it (`adapter_max_rank`, default 64) by truncated SVD of the merged factors
(`recall_hf.lora.math.merge_factors`), recording the relative compression error per version. This script measures
what the cap costs in accuracy, on the benchmark's real tasks and model (all-MiniLM-L6-v2):

1. one LoRA (r = ``--rank``, attention + MLP projections of the encoder) per task, each trained from the base with
   its own classification head on the mean-pooled last hidden state (heads stay outside the adapter, one per task,
   as in ``benchmarks/continual.py --model minilm``);
2. the daemon's fold, for every cap and uncapped: v1 = the first adapter (`adopt_adapter`, compressed when its rank
   is above the cap), then v(k) = `recall_merge([v(k-1), adapter k], task k's texts, max_rank=cap)` with task counts
   ``[k-1, 1]`` and the deployment's base: exactly the calls the daemon makes;
3. every task's accuracy on the final adapter with the task's own head, the merged rank, and the relative
   compression error (the worst module of the last fold, and the worst over the chain).

Run: ``python -m benchmarks.rank_cap`` (one seed: about 10 min on an idle thread); results in
``benchmarks/results/rank-cap-minilm/`` (``results.json``, ``results.md``); ``--seeds 1,2 --add-seeds`` adds seeds
to the results already there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks.assets import load_task, minilm_dir  # noqa: E402

TASKS = ("sentiment", "spam", "wordnet-category", "health-source")
TARGETS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
           r"intermediate\.dense|output\.dense)")
OUT_ROOT = Path(__file__).resolve().parent / "results"


def encoder(base: Path) -> torch.nn.Module:
    import transformers

    from recall_hf.models import quiet_transformers

    with quiet_transformers():
        return transformers.AutoModel.from_pretrained(base, dtype=torch.float32)


def batches(items: list, size: int, gen: torch.Generator | None = None) -> list[list]:
    order = torch.randperm(len(items), generator=gen).tolist() if gen is not None else range(len(items))
    items = [items[i] for i in order]
    return [items[s:s + size] for s in range(0, len(items), size)]


def features(model: torch.nn.Module, tok, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean-pooled last hidden state (what sentence-transformers' MiniLM embedding is)."""
    enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def train_adapter(base: Path, tok, task, out: Path, seed: int, args) -> dict[str, torch.Tensor]:
    """One task's LoRA (saved to `out` as a PEFT adapter of `base`) and its head (returned)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(encoder(base), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                     target_modules=TARGETS))
    head = torch.nn.Linear(model.config.hidden_size, len(task.labels))
    with torch.no_grad():
        head.weight.normal_(0.0, model.config.initializer_range)
        head.bias.zero_()
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    gen = torch.Generator().manual_seed(seed)
    steps = [b for _ in range(args.epochs) for b in batches(task.train[:args.train], args.batch_size, gen)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / len(steps)))
    model.train()
    for batch in steps:
        logits = head(features(model, tok, [t for t, _ in batch], args.max_length))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([y for _, y in batch]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(out)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


@torch.no_grad()
def accuracy(base: Path, tok, adapter: Path, task, head: dict, args) -> float:
    """The task's accuracy with `adapter` on the base model and the task's own head."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(encoder(base), str(adapter)).eval()
    lin = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
    lin.load_state_dict(head)
    test = task.test[:args.test]
    correct = 0
    for batch in batches(test, 64):
        pred = lin(features(model, tok, [t for t, _ in batch], args.max_length)).argmax(-1)
        correct += int((pred == torch.tensor([y for _, y in batch])).sum())
    return correct / len(test)


def fold_chain(base: Path, adapters: list[Path], texts: list[list[str]], cap: int | None, work: Path) -> dict:
    """The daemon's fold of `adapters` one at a time under rank cap `cap` (None: uncapped); the last version."""
    from recall_hf import RecallConfig, recall_merge
    from recall_hf.lora.merge import adopt_adapter

    work.mkdir(parents=True)
    current = work / "v0001"
    current.mkdir()
    steps = [adopt_adapter(adapters[0], current, cap)]
    config = RecallConfig(max_rank=cap)  # the daemon's defaults: continual mode, convex fusion, tau 0.5, k 32
    for k in range(1, len(adapters)):
        out = work / f"v{k + 1:04d}"
        report = recall_merge([current, adapters[k]], texts[k], out, config, task_counts=[k, 1], base=base,
                              progress=False)
        steps.append(report.stats)
        current = out
    errors = [s["compression"]["max_rel_error"] for s in steps if s.get("compression")]
    last = steps[-1].get("compression") or {}
    return {"dir": current, "rank": steps[-1]["rank_max"], "ranks": [s["rank_max"] for s in steps],
            "max_rel_error": last.get("max_rel_error", 0.0), "mean_rel_error": last.get("mean_rel_error", 0.0),
            "chain_max_rel_error": max(errors, default=0.0)}


def run_seed(base: Path, tok, tasks: list, seed: int, caps: list[int | None], work: Path, args) -> dict:
    t0 = time.perf_counter()
    adapters, heads = [], []
    for k, task in enumerate(tasks):
        out = work / f"adapter-{k}-{task.name}"
        heads.append(train_adapter(base, tok, task, out, seed * 1000 + k, args))
        adapters.append(out)
        print(f"  seed {seed}: trained {task.name} ({time.perf_counter() - t0:.0f}s)", flush=True)
    rows = {"individual": {"rank": args.rank, "acc": {t.name: accuracy(base, tok, a, t, h, args)
                                                      for t, a, h in zip(tasks, adapters, heads)}}}
    texts = [[t for t, _ in task.train[:args.train]] for task in tasks]
    for cap in caps:
        name = "uncapped" if cap is None else f"cap {cap}"
        chain = fold_chain(base, adapters, texts, cap, work / name.replace(" ", "-"))
        chain["acc"] = {t.name: accuracy(base, tok, chain["dir"], t, h, args) for t, h in zip(tasks, heads)}
        chain.pop("dir")
        rows[name] = chain
        print(f"  seed {seed}: {name} rank {chain['rank']} mean acc {mean(chain['acc'].values()):.3f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return rows


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def table(results: dict, tasks: list[str]) -> str:
    """Markdown: per-task accuracy (mean over seeds), mean accuracy, merged rank, relative compression error."""
    seeds = list(results)
    head = "| adapter | " + " | ".join(tasks) + " | mean acc | rank | rel. error (last fold: max / mean) | " \
           "max rel. error over the chain |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for name in results[seeds[0]]:
        rows = [results[s][name] for s in seeds]
        accs = [mean(r["acc"][t] for r in rows) for t in tasks]
        err = "–" if name == "individual" else (f"{mean(r['max_rel_error'] for r in rows):.3f} / "
                                                f"{mean(r['mean_rel_error'] for r in rows):.3f}")
        chain = "–" if name == "individual" else f"{mean(r['chain_max_rel_error'] for r in rows):.3f}"
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs)
                     + f" | {mean(accs):.3f} | {rows[0]['rank']} | {err} | {chain} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated benchmark tasks, in fold order")
    p.add_argument("--caps", default="4,8,16,stacked", help="rank caps ('stacked' = tasks x rank); uncapped always")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of each task adapter")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seeds", default="0")
    p.add_argument("--add-seeds", action="store_true", help="keep the seeds already in the results folder (same "
                   "settings) and add these")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/rank-cap-minilm)")
    return p.parse_args(argv)


SETTINGS = ("tasks", "caps", "rank", "train", "test", "epochs", "lr", "batch_size", "max_length")


def earlier_results(out: Path, args: argparse.Namespace) -> tuple[dict, float]:
    """With `--add-seeds`, the seeds already in `out/results.json` (same settings), and the minutes they took."""
    path = out / "results.json"
    if not (args.add_seeds and path.is_file()):
        return {}, 0.0
    record = json.loads(path.read_text())
    differ = [k for k in SETTINGS if record["args"].get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"{path} was measured with other settings ({', '.join(differ)}); drop --add-seeds.")
    return {int(k): v for k, v in record["results"].items()}, float(record["minutes"])


def report(results: dict, names: list[str], args: argparse.Namespace, minutes: float) -> str:
    seeds = sorted(results)
    return (f"# Adapter rank cap vs uncapped: minilm\n\nall-MiniLM-L6-v2, {len(names)} LoRA task adapters "
            f"(r={args.rank}) folded one at a time as the daemon does (RECALL adapter merge, defaults); "
            f"{args.train} train / {args.test} test, {args.epochs} epochs, lr {args.lr}, seeds {seeds}, "
            f"{args.threads} thread(s), {minutes:.1f} min in all. Accuracy with each task's own head; mean over "
            f"seeds. Stacked rank {len(names) * args.rank}.\n\n{table(results, names)}\n")


def main(argv: list[str] | None = None) -> dict:
    import transformers

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    names = args.tasks.split(",")
    caps = [len(names) * args.rank if c == "stacked" else int(c) for c in args.caps.split(",") if c]
    out = Path(args.out) if args.out else OUT_ROOT / "rank-cap-minilm"
    results, minutes = earlier_results(out, args)
    base = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(base)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="rank-cap-"))
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            tasks = [load_task(n, seed) for n in names]
            results[seed] = run_seed(base, tok, tasks, seed, [None, *caps], work / f"seed{seed}", args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    minutes += (time.perf_counter() - t0) / 60
    md = report(results, names, args, minutes)
    out.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "caps": caps, "tasks": names, "minutes": minutes, "results": results,
              "torch": torch.__version__, "transformers": transformers.__version__}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    (out / "results.md").write_text(md)
    print(md)
    return record


if __name__ == "__main__":
    main()
