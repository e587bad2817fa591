"""Cost of the calibrated fold (issue 10): a plain merge vs a calibrated merge of the same two task checkpoints, on CPU
with one thread, phases reported.

Inputs (built once under ``$RECALL_HF_CACHE/calibrated-speed/MODEL``): D = the model with seeded noise, a task
checkpoint of the ``sentiment`` task's texts; N = D with more seeded noise, a task checkpoint of ``spam``'s texts (32
typical samples each, of the task's first 256 training texts, 96 for SmolLM2; fingerprints included).
Each measurement is one merge ``[D, N]`` in a fresh child process
(``torch.set_num_threads(1)``, inputs in the page cache, the order alternating across repeats): ``plain``
(``calibrate=False``) and ``calibrated`` (``calibrate=True``, chain form), timed by the merge's own report
(``timings``; the calibration's own phases from ``calibration.timings``). ``--code DIR`` adds another checkout's
``recall_hf`` (e.g. the main branch, to compare before/after a change) measured in the same run; ``x plain`` is
calibrated over plain of the same code and repeat (median over repeats).

Usage::

    python -m benchmarks.calibrated_speed                               # MiniLM, 3 repeats
    python -m benchmarks.calibrated_speed --code /work/main --repeats 3  # also time another checkout
    python -m benchmarks.calibrated_speed --model smollm2 --repeats 1
    python -m benchmarks.calibrated_speed --screen 8 --screen 4            # also the cheaper search (screening)

Results: ``benchmarks/results/calibrated-speed-MODEL.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NOISE = 0.02  # relative to each tensor's std
TASKS = ("sentiment", "spam")
PHASES = ("representations", "hash_inputs", "calibrate", "fusion", "total")
CAL_PHASES = ("load_base", "load", "score_new", "delta", "search", "finalists")


def _child_env(code: str | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    root = str(Path(code).resolve()) if code else str(HERE.parent)  # whose recall_hf the child imports
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _perturb(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * (float(p.float().std()) * NOISE))


def build_inputs(model_name: str) -> tuple[Path, Path]:
    """D and N as task checkpoints with fingerprints (cached)."""
    from benchmarks import assets
    from recall_hf.models import load_model, load_tokenizer
    from recall_hf.task_checkpoint import make_task_checkpoint

    root = assets.cache_root() / "calibrated-speed" / model_name
    d, n = root / "D", root / "N"
    if (d / "READY").is_file() and (n / "READY").is_file():
        return d, n
    src = assets.minilm_dir() if model_name == "minilm" else assets.smollm2_dir()
    model, tok = load_model(src), load_tokenizer(src)
    for seed, folder, task in ((1, d, TASKS[0]), (2, n, TASKS[1])):
        _perturb(model, seed)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        texts = [t for t, _ in assets.load_task(task).train][: 256 if model_name == "minilm" else 96]
        make_task_checkpoint(folder, texts, task=task, overwrite=True)
    return d, n


def child(mode: str, d: Path, n: Path) -> None:
    """One merge in this process, one thread; prints its timings as one JSON line. `mode`: `plain`, `calibrated`, or
    `screen:M` (calibrated with `calibrate_screen=M`)."""
    import torch

    torch.set_num_threads(1)
    import recall_hf
    from recall_hf import RecallConfig, recall_merge

    extra = {"calibrate_screen": int(mode.split(":")[1])} if mode.startswith("screen:") else {}
    config = RecallConfig(calibrate=mode != "plain", **extra)
    with tempfile.TemporaryDirectory() as tmp:
        report = recall_merge([d, n], None, Path(tmp) / "out", config, progress=False)
    cal = report.calibration or {}
    print(json.dumps({
        "code": str(Path(recall_hf.__file__).parent.parent), "mode": mode, "timings": report.timings,
        "calibration": cal.get("timings", {}),
        "candidates": len(cal.get("candidates", [])) + len(cal.get("screened", [])),
        "pruned": sum(bool(c.get("pruned")) for c in cal.get("candidates", []) + cal.get("screened", [])),
        "chosen": (cal.get("chosen") or {}).get("name"), "objective": (cal.get("chosen") or {}).get("objective"),
    }))


def run_child(code: str | None, mode: str, d: Path, n: Path) -> dict:
    # Run as a script (not -m) so the working directory does not decide which recall_hf the child imports.
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--inputs", str(d), str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(code), cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} ({code or 'this checkout'}) failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> list[dict]:
    """Median phases per (code, mode), and the calibrated / plain ratio per repeat."""
    rows = []
    for code in dict.fromkeys(r["code"] for r in runs):
        mine = [r for r in runs if r["code"] == code]
        plain = [r["timings"]["total"] for r in mine if r["mode"] == "plain"]
        for mode in dict.fromkeys(r["mode"] for r in mine):
            sel = [r for r in mine if r["mode"] == mode]
            row = {"code": code, "mode": mode, "repeats": len(sel)}
            for ph in PHASES:
                row[ph] = statistics.median(r["timings"].get(ph, 0.0) for r in sel)
            for ph in CAL_PHASES:
                row[f"cal_{ph}"] = statistics.median(r["calibration"].get(ph, 0.0) for r in sel)
            totals = [r["timings"]["total"] for r in sel]
            row["x_plain"] = statistics.median(t / p for t, p in zip(totals, plain))
            row["candidates"], row["chosen"] = sel[-1]["candidates"], sel[-1]["chosen"]
            row["objective"] = sel[-1]["objective"]
            rows.append(row)
    return rows


def run_table(runs: list[dict]) -> str:
    """Every run with its calibrated / plain ratio against the plain run of the same code in the same repeat."""
    lines = ["| repeat | code | mode | total | calibrate | search | x plain | chosen |", "|" + "---|" * 8]
    for r in runs:
        plain = next(p for p in runs if p["mode"] == "plain" and p["code"] == r["code"]
                     and p.get("repeat", 0) == r.get("repeat", 0))
        cal = r["calibration"]
        lines.append(f"| {r.get('repeat', 0)} | {Path(r['code']).name} | {r['mode']} | {r['timings']['total']:.2f} | "
                     f"{cal.get('total', 0.0):.2f} | {cal.get('search', 0.0):.2f} | "
                     f"{r['timings']['total'] / plain['timings']['total']:.2f} | {r['chosen']} |")
    return "\n".join(lines)


def report_text(model: str, runs: list[dict], note: str = "") -> str:
    repeats = len({r.get("repeat", 0) for r in runs})
    return (f"Calibrated vs plain merge, {model}, CPU, 1 thread, median of {repeats} (seconds)\n\n"
            f"{table(summarize(runs))}\n\nEvery run (x plain: over the plain merge of the same code, same repeat)"
            f"\n\n{run_table(runs)}\n{note}\n")


def table(rows: list[dict]) -> str:
    head = ["code", "mode", *PHASES, *(f"cal {p}" for p in CAL_PHASES), "x plain", "cands", "chosen", "objective"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [Path(r["code"]).name, r["mode"], *(f"{r[p]:.2f}" for p in PHASES),
                 *(f"{r['cal_' + p]:.2f}" for p in CAL_PHASES), f"{r['x_plain']:.2f}", str(r["candidates"]),
                 str(r["chosen"]), "" if r["objective"] is None else f"{r['objective']:.6f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--code", action="append", default=[], help="another checkout's root to time as well")
    parser.add_argument("--screen", type=int, action="append", default=[],
                        help="also time calibrate_screen=M on this checkout (the cheaper search)")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--render", type=Path, help="only re-render the tables of a saved results JSON")
    parser.add_argument("--note", default="", help="a note appended to the saved tables")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, *args.inputs)
    if args.render:
        text = report_text(args.model, json.loads(args.render.read_text())["runs"], args.note)
        print(text)
        if not args.no_save:
            (RESULTS / f"calibrated-speed-{args.model}.md").write_text(text)
        return None
    d, n = build_inputs(args.model)
    codes = [None, *args.code]
    runs = []
    for rep in range(args.repeats):
        order = [(c, m) for c in codes for m in ("plain", "calibrated")]
        order += [(None, f"screen:{m}") for m in args.screen]
        for code, mode in (order if rep % 2 == 0 else order[::-1]):
            runs.append({**run_child(code, mode, d, n), "repeat": rep})
            print(f"repeat {rep} {Path(runs[-1]['code']).name} {mode}: {runs[-1]['timings']['total']:.2f}s",
                  flush=True)
    rows = summarize(runs)
    text = report_text(args.model, runs, args.note)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"calibrated-speed-{args.model}.json").write_text(json.dumps({"rows": rows, "runs": runs},
                                                                                  indent=1))
        (RESULTS / f"calibrated-speed-{args.model}.md").write_text(text)


if __name__ == "__main__":
    main()
