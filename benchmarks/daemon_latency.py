"""Drop-to-live latency of the daemon and its idle CPU use, on a tiny model or SmolLM2-135M.

A real `recall-hf daemon` process watches a fresh drop folder; each drop (the base with seeded noise, typical
samples, READY written last) is timed from its READY marker to `DEPLOY/current` pointing at the new version.

    python -m benchmarks.daemon_latency --model smollm2 --drops 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SAMPLES = ["Task: classify the review. Text: a wonderful film. Answer:", "Task: is this spam? Text: win money now.",
           "Task: which category? Text: a small furry animal.", "Task: classify the review. Text: dull and slow."]


def make_drop(base: Path, out: Path, seed: int) -> None:
    """A task checkpoint: the base's weights plus seeded noise, its config and tokenizer, samples, READY last."""
    stage = out.with_name(f".{out.name}.tmp")
    shutil.copytree(base, stage, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", "recall*", "READY"))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for f in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(f))
    noisy = {k: (v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype)) if v.is_floating_point() else v
             for k, v in tensors.items()}
    save_file(noisy, str(stage / "model.safetensors"), metadata={"format": "pt"})
    (stage / "recall_samples.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLES))
    (stage / "READY").touch()
    os.rename(stage, out)


def live(deploy: Path) -> str | None:
    cur = deploy / "current"
    return os.readlink(cur).rsplit("/", 1)[-1] if cur.is_symlink() else None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--drops", type=int, default=3, help="drops to time, one after another")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default benchmarks/results/daemon-latency-MODEL.json)")
    args = p.parse_args(argv)
    out = args.out or Path(__file__).resolve().parent / "results" / f"daemon-latency-{args.model}.json"
    root = Path(tempfile.mkdtemp(prefix="recall-latency-"))
    if args.model == "smollm2":
        from benchmarks.assets import smollm2_dir

        base = smollm2_dir()
    else:
        from recall_hf.tiny import build_tiny_model

        base = root / "base"
        build_tiny_model("llama", base, texts=SAMPLES)
    drop, deploy = root / "drop", root / "deploy"
    drop.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "recall_hf.cli", "daemon", "--drop", str(drop), "--deploy", str(deploy), "--base",
           str(base), "--poll", "30"]
    daemon = subprocess.Popen(cmd, env=env, stdout=open(root / "daemon.log", "w"), stderr=subprocess.STDOUT)
    try:
        while live(deploy) != "v0000":
            time.sleep(0.2)
        time.sleep(2)
        cpu0, t0 = cpu_seconds(daemon.pid), time.time()
        time.sleep(args.idle)
        idle = (cpu_seconds(daemon.pid) - cpu0) / (time.time() - t0)
        latencies, steps = [], []
        for i in range(1, args.drops + 1):
            make_drop(base, drop / f"task{i}", seed=i)
            ready = (drop / f"task{i}" / "READY").stat().st_mtime
            while live(deploy) != f"v{i:04d}":
                if daemon.poll() is not None:
                    raise RuntimeError(f"daemon exited; see {root / 'daemon.log'}")
                time.sleep(0.05)
            latencies.append(time.time() - ready)
            report = json.loads((deploy / "versions" / f"v{i:04d}" / "recall_report.json").read_text())
            steps.append(report["timings"])
    finally:
        daemon.terminate()
        daemon.wait(60)
    lat = sorted(latencies)
    print(f"model {args.model}: drop-to-live latency over {len(lat)} drops: median {lat[len(lat) // 2]:.2f}s "
          f"(min {lat[0]:.2f}s, max {lat[-1]:.2f}s); idle CPU {100 * idle:.3f}% of one core over {args.idle:.0f}s")
    # Where the time goes: the merge's own timings (recall_report.json); the rest is the daemon's verification
    # (content hash, every tensor read and checked), post-merge validation and the fsynced publish.
    median = {k: sorted(t[k] for t in steps)[len(steps) // 2] for k in steps[0]}
    median["daemon (verify, validate, publish)"] = lat[len(lat) // 2] - median["total"]
    print("median seconds per drop: " + ", ".join(f"{k} {v:.2f}" for k, v in median.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "drops": args.drops, "latency_seconds": latencies,
                               "merge_timings": steps, "median_breakdown": median, "idle_cpu_fraction": idle,
                               "idle_seconds": args.idle, "cpus": os.cpu_count(),
                               "torch": torch.__version__}, indent=1))
    print(f"results in {out}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
