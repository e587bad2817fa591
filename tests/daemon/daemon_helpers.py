"""Helpers of the daemon tests: task drops made from a tiny base, a deployment to run the daemon against, and the
consistency check every test ends with (RELIABILITY.md: `current` loads, nothing half-written is visible, each
complete drop is merged exactly once or quarantined with a reason, the ledger is consistent)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from recall_daemon import DaemonConfig, DaemonService, DeployStore
from recall_daemon.intake import safe_name
from recall_daemon.journal import IDLE
from recall_daemon.store import REASON_NAME
from recall_hf.modeldir import READY, weight_hashes

SAMPLES = [
    "the movie was good and the acting was great",
    "this email is spam buy now",
    "answer yes or no to the question",
    "a bad review of a bad movie",
]
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json")
REPO = Path(__file__).resolve().parents[2]
_TENSORS: dict[Path, dict[str, torch.Tensor]] = {}


def base_tensors(base: Path) -> dict[str, torch.Tensor]:
    if base not in _TENSORS:
        _TENSORS[base] = load_file(str(base / "model.safetensors"))
    return {k: v.clone() for k, v in _TENSORS[base].items()}


def write_shards(d: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(d / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))


def make_drop(drop_dir: Path, name: str, base: Path, seed: int = 1, scale: float = 0.05, ready: bool = True,
              samples: list[str] | None = SAMPLES, shards: int = 1, mutate=None, recall_json: bool = True,
              config_patch: dict | None = None, source: Path | None = None) -> Path:
    """A task checkpoint: the base (or `source`) with seeded noise on every weight, samples, recall.json, READY."""
    src = source or base
    d = Path(drop_dir) / name
    d.mkdir(parents=True)
    for f in AUX_FILES:
        if (src / f).exists():
            shutil.copy(src / f, d / f)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base_tensors(src).items()}
    if mutate is not None:
        mutate(tensors)
    write_shards(d, tensors, shards)
    if config_patch:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config_patch)
        (d / "config.json").write_text(json.dumps(cfg))
    if samples:
        (d / "recall_samples.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in samples))
    if recall_json:
        (d / "recall.json").write_text(json.dumps({"kind": "task-checkpoint", "task": f"task {name}",
                                                   "task_count": 1, "sha256": weight_hashes(d)}))
    if ready:
        (d / READY).touch()
    return d


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "daemon"), os.environ.get("PYTHONPATH", "")])}
    env.update(extra)
    return env


@dataclass
class Deployment:
    """A drop folder and a deploy folder (initialised with the tiny base as v0000) under one tmp dir."""

    root: Path
    base: Path

    @property
    def drop(self) -> Path:
        return self.root / "drop"

    @property
    def deploy(self) -> Path:
        return self.root / "deploy"

    @property
    def store(self) -> DeployStore:
        return DeployStore(self.deploy)

    def config(self, **kw) -> DaemonConfig:
        values = {"drop_dir": str(self.drop), "deploy_dir": str(self.deploy), "base": str(self.base),
                  "quiet_period": 60.0, "poll": 1.0, **kw}
        return DaemonConfig(**values)

    def run_once(self, **kw) -> int:
        return DaemonService(self.config(**kw)).run(once=True)

    def add(self, name: str, **kw) -> Path:
        return make_drop(self.drop, name, self.base, **kw)

    def ledger(self, result: str | None = None) -> list[dict]:
        return [e for e in self.store.ledger.entries() if result is None or e.get("result") == result]

    def cli_args(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "recall_daemon", "daemon", "--drop", str(self.drop), "--deploy",
                str(self.deploy), *extra]

    def spawn(self, *extra: str, **env: str) -> subprocess.Popen:
        log = open(self.root / f"daemon-{time.monotonic_ns()}.log", "w")
        return subprocess.Popen(self.cli_args(*extra), env=subprocess_env(**env), stdout=log,
                                stderr=subprocess.STDOUT, cwd=self.root)

    def run_subprocess(self, *extra: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.cli_args("--once", *extra), env=subprocess_env(**env), capture_output=True,
                              text=True, timeout=timeout, cwd=self.root)

    def run_forked(self, **env: str) -> int:
        """Run `--once` in a forked child (a real process, minus the interpreter start-up of `run_subprocess`).

        Returns its exit code, or minus the signal that killed it.
        """
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 70
            try:
                os.environ.update(env)
                torch.set_num_threads(1)
                code = self.run_once()
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def fork_daemon(self, env: dict[str, str] | None = None, once: bool = False, **config) -> int:
        """Start the daemon (long-running, or `--once`) in a forked child; returns its pid (see `wait_exit`)."""
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.environ.update(env or {})
                torch.set_num_threads(1)
                code = DaemonService(self.config(**config)).run(once=once)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                os._exit(code)
        return pid

    def status(self) -> dict:
        try:
            return json.loads(self.store.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def wait_for(self, predicate, timeout: float = 60.0, proc: subprocess.Popen | None = None, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode} while waiting for {what}:\n"
                                     + self.logs())
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(p.read_text()[-4000:] for p in sorted(self.root.glob("daemon-*.log")))

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def wait_exit(pid: int, timeout: float = 60.0) -> int:
    """Exit code of a forked child (minus the signal that killed it); SIGKILLs it after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"process {pid} did not exit within {timeout}s")


def make_adapter_drop(drop_dir: Path, name: str, base: Path, seed: int = 1, ready: bool = True, r: int = 2,
                      samples: list[str] | None = SAMPLES) -> Path:
    """A LoRA task checkpoint of `base` (B = 0 when `seed` is 0, i.e. a fresh adapter that changes nothing)."""
    from peft import LoraConfig, get_peft_model

    d = Path(drop_dir) / name
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n and seed:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(d)
    if samples:
        (d / "recall_samples.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in samples))
    if ready:
        (d / READY).touch()
    return d


def load_live(model_dir: Path):
    """The model a server would load from `DEPLOY/current`: a full model, or base + LoRA adapter."""
    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        base = json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = transformers.LlamaForCausalLM.from_pretrained(base)
        return PeftModel.from_pretrained(model, str(model_dir)).eval(), base
    return transformers.LlamaForCausalLM.from_pretrained(model_dir).eval(), model_dir


def forward_is_finite(model_dir: Path) -> bool:
    model, tok_dir = load_live(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    with torch.no_grad():
        logits = model(**tok(SAMPLES[:2], return_tensors="pt", padding=True)).logits
    return bool(torch.isfinite(logits).all())


def assert_consistent(dep: Deployment, merged: list[str] = (), quarantined: dict[str, str] | None = None) -> None:
    """The invariants of RELIABILITY.md, checked on the files.

    Args:
        merged: drop names that must be folded into the live version exactly once.
        quarantined: drop name -> the check that must have rejected it.
    """
    store = dep.store
    live = store.current()
    assert live is not None, f"`current` is missing or dangling: {os.listdir(dep.deploy)}"
    assert (dep.deploy / "current").resolve() == store.version_dir(live).resolve()
    assert forward_is_finite(dep.deploy / "current"), "the live version does not load or gives NaN/Inf"
    # Nothing half-written visible.
    leftovers = [p for p in dep.root.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, f"half-written leftovers: {leftovers}"
    if store.incoming_dir.exists():
        stuck = sorted(p.name for p in store.incoming_dir.iterdir())
        assert not stuck, f"taken drops never finished: {stuck}"
    assert store.journal.read().state == IDLE
    # The ledger: every line complete JSON, no content merged twice.
    raw = store.ledger.path.read_text()
    assert raw.endswith("\n")
    lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
    merged_hashes = [e["hash"] for e in lines if e.get("result") == "merged"]
    assert len(merged_hashes) == len(set(merged_hashes)), "a drop was merged twice"
    # The live version's lineage: each task once, each in the ledger.
    tasks = store.version_info(live).get("tasks", [])
    lineage = [t["hash"] for t in tasks]
    assert len(lineage) == len(set(lineage)), "the live version folds a drop in twice"
    assert set(lineage) <= set(merged_hashes)
    names = [t["name"] for t in tasks]
    for name in merged:
        assert names.count(name) == 1, f"{name} folded in {names.count(name)} times (lineage {names})"
        left = {e.get("drop") for e in lines if e.get("left_in_place")}  # merged from a copy, recorded once
        assert name in left or not (dep.drop / name).exists(), f"merged drop {name} still in the drop folder"
    for name, check in (quarantined or {}).items():
        reason = json.loads((store.quarantine_dir / safe_name(name) / REASON_NAME).read_text())
        assert reason["check"] == check, f"{name}: quarantined by {reason['check']} ({reason['error']}), not {check}"
        assert reason["error"] and reason["hash"] and reason["drop"] == name
        assert name not in names
        assert reason.get("left_in_place") or not os.path.lexists(dep.drop / name)
    for q in store.quarantine_dir.iterdir():
        assert (q / REASON_NAME).is_file(), f"quarantined {q.name} has no {REASON_NAME}"
