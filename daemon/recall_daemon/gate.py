"""Promotion gates: what a staged version must pass before it may go live, and the per-task retention it records.

Both gates run inside `Publisher.build`, while the journal still says `intent`: a crash (even `kill -9`) during a
gate leaves an `intent` journal, so recovery discards the staged version and the drop, still in `incoming/`, is
merged and gated again. A version that did not pass its gates is never published, by a restart or otherwise.

- **Fingerprint gate** (`fingerprint_gate`, `regression_margin`; needs `[recall] calibrate = true`): the calibrated
  fold scores every folded task's fingerprint on each candidate, `keep` (the live version as it is) among them. A
  task the live version already carries whose divergence on the chosen fold exceeds its divergence on `keep` by
  more than `regression_margin` is a regression: the drop is quarantined with check `regression` and the scores.
  The live side comes from the same merge's `keep` candidate: the live model replayed on the same fingerprints with
  the same code, so it costs no extra forward pass and compares like with like (it equals what the live version
  recorded when it was made, unless the drop replaced a task's fingerprint; a search without `keep` falls back to
  that record). The staged side is the chosen candidate's score as searched (fp32, before the output is cast to
  `recall.dtype`). Without calibrate there are no fingerprint scores and this gate does not apply.
- **Command gate** (`--gate CMD`): the operator's own evaluation runs on the staged folder (`RECALL_VERSION_DIR`,
  see `gate_environment`); exit 0 publishes, anything else (or running past `gate_timeout`) quarantines the drop
  with check `gate`, its exit code and the tail of its output. The command comes from the daemon's settings and
  runs in a shell; drop and task names reach it only through the environment, never through the command line.
  Its output goes to a bounded log, `DEPLOY/gate-logs/<version>-<hash12>.log`.

Retention: each version's `version.json` records `divergence` (every folded task's divergence on that version) and
`retention` (the same for each version of its lineage, oldest first), which status, metrics and the card show.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

GATE_LOGS = "gate-logs"
LOG_BYTES = 256 * 1024  # the end of a gate command's output kept in its log
TAIL_CHARS = 2000  # the end of it kept in REASON.json and the ledger
LOGS_KEPT = 50
RETENTION_KEPT = 200  # lineage entries a version records (the card shows the newest few)


# ---- The fingerprint gate: pure functions of the merge report's `calibration` ---------------------------------------


def candidate_divergence(calibration: dict, name: str | None = None) -> dict[str, float]:
    """Per-task divergence of one candidate of a calibrated fold: the chosen one (`name=None`) or e.g. `keep`."""
    if name is None:
        cand = calibration.get("chosen") or {}
    else:
        cand = next((c for c in calibration.get("candidates", []) if c.get("name") == name), {})
    return {str(t): float(s["divergence"]) for t, s in (cand.get("scores") or {}).items()}


@dataclass
class Regression:
    """The fingerprint gate's verdict on a calibrated merge."""

    live: dict[str, float]  # earlier tasks: divergence of the live version (the `keep` candidate)
    staged: dict[str, float]  # every task: divergence of the staged fold (the chosen candidate)
    margin: float
    worse: dict[str, float]  # earlier tasks whose increase exceeds the margin -> the increase

    @property
    def passed(self) -> bool:
        return not self.worse

    def details(self) -> dict:
        """What REASON.json and the ledger carry: per-task live vs staged, the margin, the chosen candidate."""
        tasks = {t: {"live": round(self.live[t], 6), "staged": round(self.staged[t], 6),
                     "increase": round(self.staged[t] - self.live[t], 6)} for t in sorted(self.live)}
        return {"margin": self.margin, "tasks": tasks, "regressed": sorted(self.worse)}

    def message(self) -> str:
        t = max(self.worse, key=self.worse.get)
        return (f"fingerprint divergence on earlier task {t!r} rose from {self.live[t]:.4g} (live) to "
                f"{self.staged[t]:.4g} (staged), more than the margin {self.margin:g}"
                + (f"; {len(self.worse) - 1} more task(s) regressed" if len(self.worse) > 1 else "")
                + "; raise regression_margin or turn the gate off (--no-fingerprint-gate) to publish it anyway.")


def check_regression(calibration: dict, margin: float, recorded: dict | None = None) -> Regression:
    """Compare the chosen fold with the live version on every task the live version already carries: its `keep`
    candidate, or (a search without one) the divergence the live version `recorded` when it was made."""
    staged, live = candidate_divergence(calibration), candidate_divergence(calibration, "keep")
    if not live and recorded:
        live = {str(t): float(v) for t, v in recorded.items() if isinstance(v, (int, float))}
    earlier = sorted(set(live) & set(staged) - {calibration.get("new_task")})
    live = {t: live[t] for t in earlier}
    worse = {t: staged[t] - live[t] for t in earlier if staged[t] - live[t] > margin}
    return Regression(live, staged, margin, worse)


def retention_history(parent_info: dict, version: str, created: str, divergence: dict[str, float]) -> list[dict]:
    """The lineage's per-task divergence, oldest first: the parent's record plus this version's."""
    history = [r for r in parent_info.get("retention") or [] if isinstance(r, dict)]
    history.append({"version": version, "created": created,
                    "divergence": {t: round(v, 6) for t, v in sorted(divergence.items())}})
    return history[-RETENTION_KEPT:]


def retention_table(history: list[dict], columns: int = 8) -> str:
    """Markdown: one row per task, one column per version (the newest `columns`), cells = divergence."""
    shown = history[-columns:]
    tasks = list(dict.fromkeys(t for r in history for t in r.get("divergence", {})))
    head = "| task | " + " | ".join(r["version"] for r in shown) + " |\n|---|" + "---|" * len(shown) + "\n"
    rows = "".join(f"| {t} | " + " | ".join(_cell(r.get("divergence", {}).get(t)) for r in shown) + " |\n"
                   for t in tasks)
    return head + rows


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def plot_retention(history: list[dict], path: Path) -> None:
    """One line per task across versions (divergence, log scale when positive). Names and numbers only: the
    plot is published with the version, so it holds no sample text."""
    from matplotlib.figure import Figure

    versions = [r["version"] for r in history]
    tasks = list(dict.fromkeys(t for r in history for t in r.get("divergence", {})))
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for t in tasks:
        xs = [i for i, r in enumerate(history) if t in r.get("divergence", {})]
        ax.plot(xs, [history[i]["divergence"][t] for i in xs], marker="o", label=t[:40])
    ax.set_xticks(range(len(versions)), versions, rotation=45, fontsize=7)
    values = [v for r in history for v in r.get("divergence", {}).values()]
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_ylabel("fingerprint divergence (lower = closer to the task's own model)")
    ax.set_title("Retention: each folded task across versions")
    if tasks:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---- The command gate ---------------------------------------------------------------------------------------------


@dataclass
class CommandResult:
    """How the gate command ended: `exit_code` None when it ran past the timeout."""

    exit_code: int | None
    seconds: float
    tail: str
    log: str

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def message(self, timeout: float) -> str:
        last = (self.tail.strip().splitlines() or [""])[-1][:200]
        how = f"ran past gate_timeout ({timeout:g}s)" if self.exit_code is None else f"exited {self.exit_code}"
        return f"the --gate command {how} on the staged version" + (f": {last}" if last else "") + f" (log {self.log})"

    def details(self) -> dict:
        return {"exit_code": self.exit_code, "timed_out": self.exit_code is None, "seconds": round(self.seconds, 3),
                "output_tail": self.tail, "log": self.log}


def gate_environment(stage: Path, version: str, deploy: Path, live: str, drop: str, digest: str,
                     task: str) -> dict[str, str]:
    """The gate command's environment: the serving hooks' variables for the staged version (`RECALL_VERSION`,
    `RECALL_VERSION_NUMBER`, `RECALL_VERSION_DIR` = the staged folder, `RECALL_DEPLOY_DIR`, `RECALL_CURRENT`,
    `RECALL_KIND`), plus `RECALL_STAGED=1`, `RECALL_DROP`, `RECALL_DROP_HASH`, `RECALL_TASK`,
    `RECALL_LIVE_VERSION`, `RECALL_LIVE_DIR` and `RECALL_BASE_DIR` (v0000: adapter versions load on it)."""
    from recall_hf.versions import version_number

    from .hooks import Published, hook_environment

    deploy = deploy.absolute()
    env = hook_environment(Published(stage, version_number(version), deploy))
    env.update(RECALL_STAGED="1", RECALL_DROP=env_value(drop), RECALL_DROP_HASH=digest, RECALL_TASK=env_value(task),
               RECALL_LIVE_VERSION=live, RECALL_LIVE_DIR=str(deploy / "versions" / live),
               RECALL_BASE_DIR=str(deploy / "versions" / "v0000"))
    return env


def env_value(text: str) -> str:
    """A string an environment variable can hold: no NUL, no lone surrogates (a task name from JSON may hold
    either)."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


class _Tail:
    """Keeps the last `limit` bytes a pipe delivers (bounded memory whatever the command prints)."""

    def __init__(self, limit: int):
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = self.total = 0
        self.limit = limit

    def feed(self, pipe) -> None:
        try:
            self._feed(pipe.fileno())
        except (OSError, ValueError):  # the pipe closed under us after a kill: what was read is kept
            pass

    def _feed(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):
            self.chunks.append(chunk)
            self.size += len(chunk)
            self.total += len(chunk)
            while self.size - len(self.chunks[0]) >= self.limit:
                self.size -= len(self.chunks.popleft())

    def text(self) -> str:
        data = b"".join(self.chunks)[-self.limit:]
        cut = self.total - len(data)
        return (f"[... {cut} earlier bytes not kept ...]\n" if cut else "") + data.decode("utf-8", "replace")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the shell gets SIGKILL when the daemon dies (a `kill -9` of the daemon leaves no gate running)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child calls it without importing
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def run_command(command: str, env: dict[str, str], timeout: float, log_path: Path,
                check_stop: Callable[[], None]) -> CommandResult:
    """Run the gate command in a shell in its own process group; its whole group is killed on timeout, on a stop
    (`check_stop` raising, or a signal handler raising into the wait) and on any error. Writes the bounded log."""
    t0 = time.monotonic()
    proc = subprocess.Popen(command, shell=True, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent if _PRCTL is not None else None)
    tail = _Tail(LOG_BYTES)
    reader = threading.Thread(target=tail.feed, args=(proc.stdout,), daemon=True, name="recall-gate-output")
    reader.start()
    code = None
    try:
        while time.monotonic() - t0 < timeout:
            check_stop()
            try:
                code = proc.wait(timeout=min(0.2, max(0.01, timeout - (time.monotonic() - t0))))
                break
            except subprocess.TimeoutExpired:
                continue
        code = proc.poll() if code is None else code  # it may have ended just as the time ran out
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        _drain(proc, reader)
    text = tail.text()
    write_log(log_path, command, code, time.monotonic() - t0, text)
    return CommandResult(code, time.monotonic() - t0, text[-TAIL_CHARS:], str(log_path))


def _drain(proc: subprocess.Popen, reader: threading.Thread) -> None:
    """Let the reader reach the end of the output. A background child still holding the pipe is killed with the
    group; the pipe is closed only once nothing reads it (closing an fd a thread reads could hand it another file)."""
    reader.join(5)
    if reader.is_alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        reader.join(5)
    if not reader.is_alive():
        proc.stdout.close()
    else:
        logger.warning("The --gate command left a process holding its output (pid group %d); not waiting for it.",
                       proc.pid)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def write_log(path: Path, command: str, code: int | None, seconds: float, output: str) -> None:
    """The gate run's log (command, exit code, time, the end of its output); keeps the newest `LOGS_KEPT` logs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = f"command: {command}\nexit code: {'timeout' if code is None else code}\nseconds: {seconds:.1f}\n\n"
    path.write_text(head + output, errors="replace")
    logs = sorted(path.parent.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-LOGS_KEPT]:
        old.unlink(missing_ok=True)


def check_gate_settings(config) -> None:
    """The gate fields of a `DaemonConfig`: a command, finite positive timeout, a finite margin, a boolean switch."""
    if config.gate is not None and not (isinstance(config.gate, str) and config.gate.strip()):
        raise ValueError(f"gate must be a shell command, got {config.gate!r}.")
    t = config.gate_timeout
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise ValueError(f"gate_timeout must be a finite number of seconds > 0, got {t!r}.")
    m = config.regression_margin
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise ValueError(f"regression_margin must be a finite number (a KL divergence in nats), got {m!r}.")
    if not isinstance(config.fingerprint_gate, bool):
        raise ValueError(f"fingerprint_gate must be true or false, got {config.fingerprint_gate!r}.")
