"""Serving hooks: tell the serving side that a new version is live, without ever holding up publishing.

After `current` switches, the worker calls `notify_published(config, version_dir, number)`. Each configured hook
runs in a background thread; a failure is logged and retried with exponential backoff, and a retry is dropped as
soon as a newer notification exists (a late retry must never load an older version over a newer one).

Hooks (fields read from the daemon config; absent fields mean "off"):
- `on_publish` (`--on-publish CMD`): a shell command, with the new version in its environment: `RECALL_VERSION`
  (`v0003`), `RECALL_VERSION_NUMBER` (`3`), `RECALL_VERSION_DIR` (absolute path), `RECALL_DEPLOY_DIR`,
  `RECALL_CURRENT` (the `current` symlink) and `RECALL_KIND` (`adapter` or `full`). Non-zero exit = failure.
- `vllm_url` (`--vllm-url http://HOST:PORT`): vLLM's OpenAI server. For adapter deployments the new adapter is
  loaded under the stable name `vllm_lora_name` (`--vllm-lora-name`, default `recall`): `POST
  /v1/unload_lora_adapter`, then `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` (the server needs
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). Unload-then-load instead of `load_inplace=true`, which some vLLM versions
  keep on the stored request and then re-read from disk on every step. vLLM cannot swap full weights at runtime:
  full deployments use `reload_url` or `on_publish` (e.g. a restart), and `vllm_url` alone only logs that.
- `reload_url` (`--reload-url URL`): `POST URL` with `{"version", "number", "path", "kind"}`; any 2xx is success.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_LORA_NAME = "recall"


@dataclass(frozen=True)
class HookSettings:
    """The hook fields of a daemon config (see the module docstring); `retries` attempts after the first."""

    on_publish: str | None = None
    vllm_url: str | None = None
    vllm_lora_name: str = DEFAULT_LORA_NAME
    reload_url: str | None = None
    retries: int = 5
    backoff: float = 2.0
    timeout: float = 60.0

    @classmethod
    def from_config(cls, config) -> HookSettings:
        """From any object carrying the fields (`DaemonConfig`); `hook_retries`/`hook_backoff`/`hook_timeout`."""
        return cls(on_publish=getattr(config, "on_publish", None), vllm_url=getattr(config, "vllm_url", None),
                   vllm_lora_name=getattr(config, "vllm_lora_name", None) or DEFAULT_LORA_NAME,
                   reload_url=getattr(config, "reload_url", None), retries=getattr(config, "hook_retries", 5),
                   backoff=getattr(config, "hook_backoff", 2.0), timeout=getattr(config, "hook_timeout", 60.0))

    @property
    def any(self) -> bool:
        return bool(self.on_publish or self.vllm_url or self.reload_url)


@dataclass(frozen=True)
class Published:
    """The version a notification is about."""

    path: Path
    number: int
    deploy_dir: Path

    @property
    def name(self) -> str:
        return f"v{self.number:04d}"

    @property
    def kind(self) -> str:
        return "adapter" if (self.path / "adapter_config.json").is_file() else "full"


# ---- One attempt of each hook: raise on failure ---------------------------------------------------------------------


def hook_environment(version: Published) -> dict[str, str]:
    return {"RECALL_VERSION": version.name, "RECALL_VERSION_NUMBER": str(version.number),
            "RECALL_VERSION_DIR": str(version.path.absolute()), "RECALL_DEPLOY_DIR": str(version.deploy_dir),
            "RECALL_CURRENT": str(version.deploy_dir / "current"), "RECALL_KIND": version.kind}


def run_command(command: str, version: Published, timeout: float) -> None:
    """Run the on-publish command in a shell; a non-zero exit or a timeout raises `RuntimeError`."""
    try:
        done = subprocess.run(command, shell=True, env={**os.environ, **hook_environment(version)},
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"--on-publish command ran past {timeout:.0f}s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"--on-publish command exited {done.returncode}: {tail[0][:200]}")


def post_json(url: str, body: dict, timeout: float) -> tuple[int, str]:
    """POST JSON; `(status, text)` for any HTTP answer, `OSError` when the server cannot be reached."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def vllm_load_adapter(base_url: str, lora_name: str, version: Published, timeout: float) -> None:
    """Unload `lora_name` (absent is fine) and load the new version's adapter under that name."""
    base = base_url.rstrip("/")
    status, text = post_json(f"{base}/v1/unload_lora_adapter", {"lora_name": lora_name}, timeout)
    if status >= 500:
        raise RuntimeError(f"vLLM unload_lora_adapter answered {status}: {text[:200]}")
    body = {"lora_name": lora_name, "lora_path": str(version.path.absolute())}
    status, text = post_json(f"{base}/v1/load_lora_adapter", body, timeout)
    if not 200 <= status < 300:
        raise RuntimeError(f"vLLM load_lora_adapter answered {status}: {text[:200]}")


def call_reload_url(url: str, version: Published, timeout: float) -> None:
    body = {"version": version.name, "number": version.number, "path": str(version.path.absolute()),
            "kind": version.kind}
    status, text = post_json(url, body, timeout)
    if not 200 <= status < 300:
        raise RuntimeError(f"reload URL {url} answered {status}: {text[:200]}")


def hook_calls(settings: HookSettings, version: Published) -> list[tuple[str, Callable[[], None]]]:
    """`(name, one attempt)` for every hook that applies to this version."""
    calls = []
    if settings.on_publish:
        calls.append(("on-publish", lambda: run_command(settings.on_publish, version, settings.timeout)))
    if settings.vllm_url and version.kind == "adapter":
        calls.append(("vllm", lambda: vllm_load_adapter(settings.vllm_url, settings.vllm_lora_name, version,
                                                        settings.timeout)))
    elif settings.vllm_url:
        logger.warning("%s is a full model: vLLM cannot swap full weights at runtime; use --reload-url or "
                       "--on-publish (e.g. a restart) to serve it.", version.name)
    if settings.reload_url:
        calls.append(("reload-url", lambda: call_reload_url(settings.reload_url, version, settings.timeout)))
    return calls


# ---- Running them: background threads, retries with backoff, newest notification wins ------------------------------


class Notifier:
    """Runs hooks in daemon threads. Each `notify` gets a sequence number; a retry of an older one is dropped once a
    newer notification exists (after a rollback the older version number is the newer notification)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seq = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.outcomes: list[dict] = []  # the finished attempts' results, newest last (status, tests)

    def notify(self, settings: HookSettings, version: Published) -> list[threading.Thread]:
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._threads = [t for t in self._threads if t.is_alive()]
        threads = [threading.Thread(target=self._run, args=(name, attempt, seq, version, settings), daemon=True,
                                    name=f"recall-hook-{name}-{version.name}")
                   for name, attempt in hook_calls(settings, version)]
        for t in threads:
            t.start()
        with self._lock:
            self._threads += threads
        return threads

    def _superseded(self, seq: int) -> bool:
        return self._stop.is_set() or seq != self._seq

    def _run(self, name: str, attempt: Callable[[], None], seq: int, version: Published,
             settings: HookSettings) -> None:
        delay = settings.backoff
        for n in range(1, settings.retries + 2):
            if self._superseded(seq):
                self._record(name, version, "superseded", n - 1)
                return
            try:
                attempt()
            except Exception as err:  # noqa: BLE001 - a hook failure is logged and retried, never raised
                last = n == settings.retries + 1
                logger.warning("Hook %s for %s failed (attempt %d of %d): %s%s", name, version.name, n,
                               settings.retries + 1, err, "; giving up" if last else f"; retrying in {delay:.1f}s")
                if last or self._stop.wait(delay):
                    self._record(name, version, "failed", n, str(err))
                    return
                delay *= 2
                continue
            logger.info("Hook %s for %s done (attempt %d).", name, version.name, n)
            self._record(name, version, "ok", n)
            return

    def _record(self, name: str, version: Published, result: str, attempts: int, error: str | None = None) -> None:
        with self._lock:
            self.outcomes.append({"hook": name, "version": version.name, "result": result, "attempts": attempts,
                                  "error": error, "time": time.time()})
            del self.outcomes[:-100]

    def wait(self, timeout: float | None = None) -> bool:
        """Join the running hooks (tests, a graceful stop); True when all finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in list(self._threads):
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        """Stop retrying (on SIGTERM): pending backoff waits end at once; a running attempt finishes on its own."""
        self._stop.set()

    def finish(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for the running hooks (a `--once` run, a rollback), then stop retrying;
        True when all finished in time."""
        done = self.wait(timeout)
        if not done:
            logger.warning("Serving hooks still running after %.0fs; no more retries (see the log for each hook).",
                           timeout)
            self.close()
        return done

    def failures(self) -> list[dict]:
        """Outcomes that did not end in success (failed or still running is not listed; see `finish`)."""
        with self._lock:
            return [o for o in self.outcomes if o["result"] == "failed"]


NOTIFIER = Notifier()


def notify_published(config, version_dir: str | Path, number: int, deploy_dir: str | Path | None = None,
                     notifier: Notifier | None = None) -> list[threading.Thread]:
    """Run every configured hook for a version that just went live, in the background; returns their threads.

    Call it after `current` switched (after a publish, and after a rollback with the version now live). It never
    raises for a hook's failure and never waits for one.
    """
    settings = HookSettings.from_config(config)
    if not settings.any:
        return []
    deploy = Path(deploy_dir or getattr(config, "deploy_dir", None) or Path(version_dir).parent.parent)
    return (notifier or NOTIFIER).notify(settings, Published(Path(version_dir), int(number), deploy.absolute()))
