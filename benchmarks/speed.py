"""Speed and memory of merging SmolLM2-135M fp32 checkpoints (BENCHMARK.md, "Speed and memory").

For K task checkpoints (seeded perturbations of the real SmolLM2-135M-Instruct, fp32) this measures, each in a
fresh subprocess so peak RSS is per measurement, with the inputs in the page cache and the method order alternating
across repeats (``--methods`` picks a subset; the floor is always measured):

* ``io-floor``      read every input safetensors file fully and write (and fsync) one file the size of one model;
* ``recall-fusion`` ``recall_hf.fusion.fuse_checkpoints`` alone, fixed uniform weights, no forward passes;
* ``recall-fusion-1t`` the same with ``torch.set_num_threads(1)`` first (diagnostic: thread contention);
* ``recall-merge``  ``recall_hf.recall_merge`` end to end (forward passes over the probes, hashing, report, plot);
* ``mergekit``      mergekit's linear merge of the same inputs (``mergekit-yaml`` in its own virtual env).

Times are compared as ratios to the I/O floor measured in the same run (the machine may be shared and noisy).
"op wall" is timed inside the child around the operation (imports excluded); "proc wall" is the whole child
process seen from outside (interpreter start and imports included); "op CPU" is the child's user+sys time over the
operation. Peak RSS is the child's own ``VmHWM`` (it counts file-backed mmap pages of the inputs too; ``wait4``'s
``ru_maxrss`` is not used: Linux carries the parent's high-water mark across fork+exec). "peak - start" subtracts the
RSS the child had when the operation began (interpreter, torch, transformers); peak anon is the largest ``RssAnon``
(process-private memory) sampled every 20 ms. ``x floor`` is the median over repeats of op wall / I/O-floor op wall
of the same repeat.

Usage::

    python -m benchmarks.speed                      # K=2 and K=5, 3 repeats
    python -m benchmarks.speed --ks 2 --repeats 1   # quick look
    python -m benchmarks.speed --profile            # also cProfile the fusion step at the largest K
    PYTHONPATH=/path/to/patched python -m benchmarks.speed --methods recall-fusion --no-save   # a patched recall_hf

Inputs, the mergekit venv and scratch outputs live under ``$RECALL_HF_CACHE/speed`` (default
``~/.cache/recall-hf/bench/speed``); results go to ``benchmarks/results/speed.{json,md}``.
Only the standard library is imported at module level: the mergekit child runs this file under mergekit's venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("io-floor", "recall-fusion", "recall-fusion-1t", "recall-merge", "mergekit")
MERGEKIT_REQ = "mergekit==0.1.5"
TORCH_REQ = "torch==2.13.0"
INPUT_VERSION = 1
NOISE_SEED = 1234
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "This movie was a delight from start to finish.",
    "Please confirm your account details to claim the prize.",
    "The committee will meet again on Tuesday to review the budget.",
    "Rain is expected across the north of the country tonight.",
    "A balanced diet includes fruit, vegetables and whole grains.",
    "The new phone has a faster chip and a brighter screen.",
    "She finished the marathon in just under four hours.",
    "Researchers found the drug reduced symptoms in most patients.",
    "Our team shipped the release after fixing the last bug.",
    "The oak tree in the garden is more than a hundred years old.",
    "Stock markets fell sharply after the announcement.",
    "He ordered a coffee and sat by the window to read.",
    "The museum opens a new exhibition on ancient Egypt next week.",
    "Turn left at the second light and the station is on your right.",
    "The recipe calls for two eggs, flour, sugar and butter.",
]


# --------------------------------------------------------------------------------------------------- helpers


def speed_root() -> Path:
    return Path(os.environ.get("RECALL_HF_CACHE") or "~/.cache/recall-hf/bench").expanduser() / "speed"


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def proc_status() -> dict[str, int]:
    """kB fields of /proc/self/status (VmHWM, VmRSS, RssAnon, RssFile)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    return out


class AnonSampler:
    """Background thread recording the largest RssAnon / RssFile seen (kB)."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak_anon, self.peak_file = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        s = proc_status()
        self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
        self.peak_file = max(self.peak_file, s.get("RssFile", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> AnonSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class Timer:
    """Wall and CPU (user+sys, all threads) seconds of a block."""

    def __enter__(self) -> Timer:
        import resource

        self._ru = resource.getrusage(resource.RUSAGE_SELF)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import resource

        self.wall = time.perf_counter() - self._t
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu = (ru.ru_utime - self._ru.ru_utime) + (ru.ru_stime - self._ru.ru_stime)


def read_fully(paths: list[Path], chunk: int = 16 << 20) -> int:
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def input_dirs(k: int) -> list[Path]:
    return [speed_root() / "inputs" / f"task{i}" for i in range(k)]


def model_files(dirs: list[Path]) -> list[Path]:
    files = [p for d in dirs for p in sorted(d.glob("*.safetensors"))]
    missing = [str(d) for d in dirs if not any(d.glob("*.safetensors"))]
    if missing:
        raise SystemExit(f"no safetensors in {missing}; run without --child first to prepare the inputs")
    return files


# --------------------------------------------------------------------------------------------------- inputs


def prepare_inputs(k: int) -> list[Path]:
    """K perturbed copies of SmolLM2-135M fp32 (seeded noise on every float tensor), reused when present."""
    from benchmarks.assets import smollm2_dir

    base = smollm2_dir()
    dirs = input_dirs(k)
    for i, d in enumerate(dirs):
        marker = d / "speed_input.json"
        want = {"version": INPUT_VERSION, "seed": NOISE_SEED + i, "base": str(base)}
        if marker.is_file() and json.loads(marker.read_text()) == want:
            continue
        import torch
        from safetensors import safe_open
        from safetensors.torch import save_file

        print(f"preparing {d} ...", flush=True)
        gen = torch.Generator().manual_seed(NOISE_SEED + i)
        tensors = {}
        with safe_open(str(base / "model.safetensors"), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point():
                    scale = 0.01 * float(t.float().std()) if t.numel() > 1 else 0.0
                    scale = scale or 1e-3
                    t = (t.float() + torch.randn(t.shape, generator=gen) * scale).to(t.dtype)
                tensors[name] = t.contiguous()
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}."))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        for name in AUX_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        (tmp / "recall_samples.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SAMPLES))
        (tmp / "speed_input.json").write_text(json.dumps(want))
        shutil.rmtree(d, ignore_errors=True)
        os.rename(tmp, d)
    return dirs


def mergekit_python() -> Path:
    """Python of a separate venv holding mergekit (created on first use: the local CPU torch first, then mergekit)."""
    venv = speed_root().parent / "mergekit-venv"
    py = venv / "bin" / "python"
    ok = (
        py.is_file()
        and subprocess.run([py, "-c", "import mergekit.scripts.run_yaml"], capture_output=True).returncode == 0
    )
    if not ok:
        print(f"creating {venv} ({TORCH_REQ}, then {MERGEKIT_REQ}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", TORCH_REQ], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", MERGEKIT_REQ], check=True)
    return py


def pip_versions(py: Path, names: list[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))"
    )
    res = subprocess.run([py, "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "ram_gb": round(mem_kb / 1024**2, 1),
        "loadavg_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------------- children


def child_io_floor(dirs: list[Path], out: Path) -> dict:
    files = model_files(dirs)
    one_model = sum(p.stat().st_size for p in model_files(dirs[-1:]))
    with Timer() as timer:
        t0 = time.perf_counter()
        read = read_fully(files)
        t1 = time.perf_counter()
        chunk = bytearray(16 << 20)
        view = memoryview(chunk)
        left = one_model
        with open(out / "model.safetensors", "wb", buffering=0) as f:
            while left:
                left -= f.write(view[: min(left, len(view))])
            t2 = time.perf_counter()
            os.fsync(f.fileno())
        t3 = time.perf_counter()
    return {
        "op_wall": timer.wall,
        "op_cpu": timer.cpu,
        "bytes_read": read,
        "parts": {"read": t1 - t0, "write": t2 - t1, "fsync": t3 - t2},
    }


def _fusion_args(dirs: list[Path], out: Path):
    import torch
    import transformers

    from recall_hf.layers import LayerMap
    from recall_hf.safetensors_io import CheckpointReader

    layer_map = LayerMap.from_config(transformers.AutoConfig.from_pretrained(dirs[-1]))
    readers = [CheckpointReader(d) for d in dirs]
    weights = torch.full((layer_map.num_layers + 1, len(dirs)), 1.0 / len(dirs))
    stage = out / "fused"
    stage.mkdir()
    return readers, layer_map, weights, stage


def child_recall_fusion(dirs: list[Path], out: Path, profile: bool = False) -> dict:
    from recall_hf.fusion import fuse_checkpoints

    args = _fusion_args(dirs, out)
    if profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        with Timer() as timer:
            prof.enable()
            stats = fuse_checkpoints(*args, progress=False)
            prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        return {"op_wall": timer.wall, "op_cpu": timer.cpu, "stats": stats, "profile": s.getvalue()}
    with Timer() as timer:
        stats = fuse_checkpoints(*args, progress=False)
    return {"op_wall": timer.wall, "op_cpu": timer.cpu, "stats": stats}


def child_recall_merge(dirs: list[Path], out: Path) -> dict:
    import transformers  # noqa: F401

    import recall_hf  # noqa: F401  (imports outside the timed region)
    from recall_hf import RecallConfig, recall_merge

    with Timer() as timer:
        report = recall_merge(dirs, None, out / "merged", RecallConfig(), progress=False)
    return {
        "op_wall": timer.wall,
        "op_cpu": timer.cpu,
        "parts": report.timings,
        "weights_last_layer": report.weights[-1],
    }


def child_mergekit(dirs: list[Path], out: Path) -> dict:
    import mergekit.scripts.run_yaml as run_yaml

    cfg = out / "mergekit.yml"
    models = "".join(f"  - model: {d}\n    parameters:\n      weight: 1.0\n" for d in dirs)
    cfg.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n{models}")
    argv = [str(cfg), str(out / "merged"), "--lazy-unpickle", "--no-cuda", "--quiet"]
    with Timer() as timer:
        run_yaml.main(argv, standalone_mode=False)
    return {"op_wall": timer.wall, "op_cpu": timer.cpu, "argv": ["mergekit-yaml", *argv]}


def child_main(method: str, k: int, out: Path, profile: bool) -> None:
    dirs = input_dirs(k)
    model_files(dirs)
    # Heavy imports happen before the start snapshot, so "peak - start" is what the operation itself adds.
    if method.startswith("recall"):
        import torch
        import transformers  # noqa: F401

        import recall_hf
        import recall_hf.full  # noqa: F401
        import recall_hf.fusion  # noqa: F401
        import recall_hf.merge  # noqa: F401

        if method == "recall-fusion-1t":
            torch.set_num_threads(1)
    elif method == "mergekit":
        import mergekit.scripts.run_yaml  # noqa: F401
    start = proc_status()
    with AnonSampler() as sampler:
        if method == "io-floor":
            res = child_io_floor(dirs, out)
        elif method in ("recall-fusion", "recall-fusion-1t"):
            res = child_recall_fusion(dirs, out, profile)
        elif method == "recall-merge":
            res = child_recall_merge(dirs, out)
        elif method == "mergekit":
            res = child_mergekit(dirs, out)
        else:
            raise SystemExit(f"unknown method {method}")
    st = proc_status()
    res.update(
        vm_hwm_kb=st["VmHWM"],
        start_rss_kb=start["VmRSS"],
        start_anon_kb=start.get("RssAnon", 0),
        peak_anon_kb=sampler.peak_anon,
        peak_file_kb=sampler.peak_file,
    )
    if "torch" in sys.modules:
        res["torch_threads"] = sys.modules["torch"].get_num_threads()
    if "recall_hf" in sys.modules:
        res["recall_hf_file"] = sys.modules["recall_hf"].__file__
    print("SPEED_RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------------- parent


def run_child(method: str, k: int, mk_python: Path | None, profile: bool = False, keep: Path | None = None) -> dict:
    """Run one measurement in a fresh process; returns the child's JSON plus the whole process's wall and CPU."""
    read_fully(model_files(input_dirs(k)))  # warm the page cache
    runs = speed_root() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(dir=runs, prefix=f"{method}-k{k}-"))
    py = mk_python if method == "mergekit" else Path(sys.executable)
    cmd = [str(py), str(Path(__file__).resolve()), "--child", method, "--k", str(k), "--out", str(out)]
    if profile:
        cmd.append("--profile")
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=HERE.parent)
        # Read both pipes in threads so a chatty child never blocks, then reap it with wait4 for its own rusage.
        chunks: dict[str, bytes] = {}
        readers = [
            threading.Thread(target=lambda n=n, s=s: chunks.__setitem__(n, s.read()))
            for n, s in (("out", proc.stdout), ("err", proc.stderr))
        ]
        for t in readers:
            t.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        for t in readers:
            t.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = chunks["out"].decode(errors="replace"), chunks["err"].decode(errors="replace")
        line = next((ln for ln in stdout.splitlines() if ln.startswith("SPEED_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{method} K={k} failed (exit {proc.returncode}):\n{tail}")
        res = json.loads(line.split(" ", 1)[1])
        res.update(
            method=method, k=k, proc_wall=wall, proc_cpu=usage.ru_utime + usage.ru_stime, loadavg=os.getloadavg()[0]
        )
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.move(str(out), keep)
        return res
    finally:
        shutil.rmtree(out, ignore_errors=True)


def compare_outputs(a: Path, b: Path) -> dict:
    """Same tensor names and max |difference| between two merged safetensors folders."""
    from safetensors import safe_open

    fa, fb = sorted(a.rglob("*.safetensors")), sorted(b.rglob("*.safetensors"))
    ta, tb = {}, {}
    for files, into in ((fa, ta), (fb, tb)):
        for p in files:
            with safe_open(str(p), framework="pt") as f:
                for n in f.keys():
                    into[n] = p
    common = sorted(set(ta) & set(tb))
    diff = 0.0
    for n in common:
        with safe_open(str(ta[n]), framework="pt") as f1, safe_open(str(tb[n]), framework="pt") as f2:
            x, y = f1.get_tensor(n), f2.get_tensor(n)
            diff = max(diff, float((x.float() - y.float()).abs().max()))
    return {
        "only_recall": sorted(set(ta) - set(tb)),
        "only_mergekit": sorted(set(tb) - set(ta)),
        "common": len(common),
        "max_abs_diff": diff,
    }


def summarize(runs: list[dict], ks: list[int], methods: list[str], model_bytes: int) -> list[dict]:
    rows = []
    for k in ks:
        floor = statistics.median(r["op_wall"] for r in runs if r["k"] == k and r["method"] == "io-floor")
        floor_proc = statistics.median(r["proc_wall"] for r in runs if r["k"] == k and r["method"] == "io-floor")
        for m in methods:
            rs = [r for r in runs if r["k"] == k and r["method"] == m]
            if not rs:
                continue
            op = statistics.median(r["op_wall"] for r in rs)
            pw = statistics.median(r["proc_wall"] for r in rs)
            rss = statistics.median(r["vm_hwm_kb"] for r in rs) * 1024
            delta = statistics.median(r["vm_hwm_kb"] - r["start_rss_kb"] for r in rs) * 1024
            anon = statistics.median(r["peak_anon_kb"] for r in rs) * 1024
            ratios = [
                r["op_wall"] / f["op_wall"]
                for r in rs
                for f in runs
                if f["k"] == k and f["method"] == "io-floor" and f.get("repeat") == r.get("repeat")
            ]
            rows.append(
                {
                    "k": k,
                    "method": m,
                    "n": len(rs),
                    "op_wall_s": op,
                    "op_wall_all": [r["op_wall"] for r in rs],
                    "x_floor": statistics.median(ratios) if ratios else op / floor,
                    "x_floor_of_medians": op / floor,
                    "op_cpu_s": statistics.median(r["op_cpu"] for r in rs),
                    "proc_wall_s": pw,
                    "proc_x_floor": pw / floor_proc,
                    "peak_rss_mb": rss / 1e6,
                    "rss_x_model": rss / model_bytes,
                    "delta_rss_mb": delta / 1e6,
                    "delta_x_model": delta / model_bytes,
                    "peak_anon_mb": anon / 1e6,
                    "anon_x_model": anon / model_bytes,
                }
            )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    m = meta["machine"]
    lines = [
        "# Speed and memory: merging SmolLM2-135M fp32 checkpoints",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gb']} GB RAM, load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_start'])} (shared machine). "
        f"One model = {meta['model_bytes'] / 1e6:.0f} MB. "
        f"Median of {meta['repeats']} repeats, order alternating, page cache warm.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}; mergekit venv: "
        f"{', '.join(f'{k} {v}' for k, v in meta['mergekit_versions'].items())}.",
        f"Command: `{meta['command']}`",
        "",
        "| K | method | op wall s | x I/O floor | op CPU s | proc wall s | peak RSS MB | x model |"
        " peak-start MB | x model | peak anon MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['method']} | {r['op_wall_s']:.2f} | {r['x_floor']:.2f} | {r['op_cpu_s']:.2f} | "
            f"{r['proc_wall_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_x_model']:.2f} | {r['delta_rss_mb']:.0f} | "
            f"{r['delta_x_model']:.2f} | {r['peak_anon_mb']:.0f} |"
        )
    lines += [
        "",
        "op wall / op CPU: timed inside the child around the operation (imports excluded); x I/O floor: median over "
        "repeats of op wall / floor op wall in the same repeat; proc wall: whole child process (interpreter, "
        "imports). "
        "Peak RSS: the child's VmHWM (includes file-backed mmap pages of the inputs); peak-start: minus the RSS the "
        "child had when the operation began (interpreter + torch + transformers); peak anon: largest RssAnon sampled "
        "every 20 ms (process-private memory, baseline included).",
        "",
        "## Targets",
        "",
    ]
    for t in meta["targets"]:
        lines.append(f"- {'MET' if t['met'] else 'NOT MET'}: {t['what']} ({t['value']})")
    if meta.get("breakdown"):
        lines += ["", "## recall-merge phases (median s)", ""]
        for k, parts in meta["breakdown"].items():
            lines.append(f"- K={k}: " + ", ".join(f"{p} {v:.2f}" for p, v in parts.items()))
    if meta.get("equivalence"):
        lines += ["", "## Output check (recall fusion with uniform weights vs mergekit linear)", ""]
        for k, eq in meta["equivalence"].items():
            lines.append(f"- K={k}: {eq}")
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[dict]:
    out = []
    get = {(r["k"], r["method"]): r for r in rows}
    for k in sorted({r["k"] for r in rows}):
        f, m, mk = get.get((k, "recall-fusion")), get.get((k, "recall-merge")), get.get((k, "mergekit"))
        if f:
            out.append(
                {
                    "what": f"K={k} fusion within 1.5x of the I/O floor",
                    "met": f["x_floor"] <= 1.5,
                    "value": f"{f['x_floor']:.2f}x",
                }
            )
            out.append(
                {
                    "what": f"K={k} fusion peak RSS well below one model (< 0.5x)",
                    "met": f["rss_x_model"] < 0.5,
                    "value": f"peak RSS {f['rss_x_model']:.2f}x, peak - start {f['delta_x_model']:.2f}x",
                }
            )
        if f and mk:
            out.append(
                {
                    "what": f"K={k} fusion faster than mergekit",
                    "met": f["op_wall_s"] < mk["op_wall_s"],
                    "value": f"{f['op_wall_s']:.2f}s vs {mk['op_wall_s']:.2f}s op; "
                    f"{f['proc_wall_s']:.2f}s vs {mk['proc_wall_s']:.2f}s proc",
                }
            )
        if m:
            out.append(
                {
                    "what": f"K={k} whole merge peak RSS about one model (<= 1.25x)",
                    "met": m["rss_x_model"] <= 1.25,
                    "value": f"peak RSS {m['rss_x_model']:.2f}x, peak - start {m['delta_x_model']:.2f}x",
                }
            )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ks", default="2,5", help="comma-separated numbers of models to merge (default 2,5)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per (K, method); the median is reported")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--profile", action="store_true", help="also cProfile the fusion step at the largest K")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child, args.k, args.out, args.profile)
        return

    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    sys.path.insert(0, str(HERE.parent))
    ks = [int(x) for x in args.ks.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    if "io-floor" not in methods:
        methods.insert(0, "io-floor")
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown method(s) {sorted(unknown)}")
    meta: dict = {
        "machine": machine(),
        "command": "python -m benchmarks.speed " + " ".join(sys.argv[1:]),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "repeats": args.repeats,
        "ks": ks,
        "methods": methods,
    }
    prepare_inputs(max(ks))
    model_bytes = sum(p.stat().st_size for p in model_files(input_dirs(1)))
    meta["model_bytes"] = model_bytes
    mk_py = mergekit_python() if "mergekit" in methods else None
    meta["versions"] = pip_versions(Path(sys.executable), ["recall-hf", "torch", "transformers", "safetensors"])
    meta["mergekit_versions"] = (
        pip_versions(mk_py, ["mergekit", "torch", "transformers", "safetensors"]) if mk_py else {}
    )
    meta["mergekit_install"] = (
        f"separate venv {speed_root().parent / 'mergekit-venv'}: pip install {TORCH_REQ}; pip install {MERGEKIT_REQ}"
    )

    runs: list[dict] = []
    keep: dict[tuple[int, str], Path] = {}
    for rep in range(args.repeats):
        for k in ks:
            order = methods if rep % 2 == 0 else methods[::-1]
            for m in order:
                kp = None
                if rep == 0 and m in ("recall-fusion", "mergekit"):
                    kp = keep[(k, m)] = speed_root() / "keep" / f"{m}-k{k}"
                res = run_child(m, k, mk_py, keep=kp)
                res["repeat"] = rep
                runs.append(res)
                print(
                    f"rep {rep} K={k} {m:16s} op {res['op_wall']:7.2f}s cpu {res['op_cpu']:6.2f}s "
                    f"proc {res['proc_wall']:7.2f}s peak {res['vm_hwm_kb'] / 1e3:6.0f} MB "
                    f"start {res['start_rss_kb'] / 1e3:5.0f} MB anon {res['peak_anon_kb'] / 1e3:6.0f} MB "
                    f"load {res['loadavg']:.1f}",
                    flush=True,
                )

    meta["equivalence"] = {}
    for k in ks:
        a, b = keep.get((k, "recall-fusion")), keep.get((k, "mergekit"))
        if a and b and a.exists() and b.exists():
            meta["equivalence"][k] = compare_outputs(a, b)
        for p in (a, b):
            if p:
                shutil.rmtree(p, ignore_errors=True)

    meta["breakdown"] = {}
    for k in ks:
        merges = [r for r in runs if r["k"] == k and r["method"] == "recall-merge"]
        if merges:
            keys = merges[0]["parts"].keys()
            meta["breakdown"][k] = {p: statistics.median(r["parts"].get(p, 0.0) for r in merges) for p in keys}

    if args.profile:
        res = run_child("recall-fusion", max(ks), None, profile=True)
        meta["profile"] = {"k": max(ks), "op_wall": res["op_wall"], "top_tottime": res["profile"]}
        print(res["profile"])

    rows = summarize(runs, ks, methods, model_bytes)
    meta["targets"] = targets(rows)
    meta["machine"]["loadavg_end"] = os.getloadavg()
    md = markdown(rows, meta)
    print(md)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=2) + "\n")
        (RESULTS / "speed.md").write_text(md)
        print(f"wrote {RESULTS / 'speed.json'} and {RESULTS / 'speed.md'}")


if __name__ == "__main__":
    main()
