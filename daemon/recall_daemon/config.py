"""DaemonConfig: every knob of the drop-folder daemon in one place, loadable from a TOML file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from recall_hf.config import RecallConfig, dataclass_from_dict

from .gate import check_gate_settings

AFTER_INGEST = ("delete", "move")
HOOK_FIELDS = ("on_publish", "vllm_url", "vllm_lora_name", "reload_url", "hook_retries", "hook_backoff",
               "hook_timeout")


@dataclass
class DaemonConfig:
    """Configuration of `recall-hf daemon` (see `daemon/README.md`).

    Args:
        drop_dir (`str`):
            Folder producers write task checkpoints into, one sub-directory per task.
        deploy_dir (`str`):
            Folder the daemon owns: `versions/`, the `current` symlink, ledger, journal, quarantine, status, metrics.
        base (`str`, *optional*, defaults to `None`):
            Model (or adapter) directory, or a Hugging Face Hub id (resolved once from the local cache, its commit
            recorded), copied to `versions/v0000` when the deploy folder has no version yet.
        poll (`float`, *optional*, defaults to `30.0`):
            Seconds between rescans of the drop folder when no file event arrives (events are only hints).
        quiet_period (`float`, *optional*, defaults to `60.0`):
            A drop without a `READY` marker is complete once none of its files changed for this many seconds.
        keep (`int`, *optional*, defaults to `3`):
            Newest versions kept; the live version, its predecessor and `v0000` (the base) are always kept too.
        metrics_port (`int`, *optional*, defaults to `None`):
            Serve Prometheus metrics over HTTP on this port (the textfile `metrics.prom` is always written).
        metrics_addr (`str`, *optional*, defaults to `"127.0.0.1"`):
            Address the metrics HTTP server binds to: loopback unless told otherwise (`0.0.0.0` for every interface).
        probes (`str`, *optional*, defaults to `None`):
            A `.jsonl`/`.txt` of probe texts used for drops that ship no `recall_samples.jsonl`.
        polling_observer (`bool`, *optional*, defaults to `False`):
            Watch with watchdog's `PollingObserver` instead of inotify (network filesystems). Also the fallback when
            inotify cannot start.
        events (`bool`, *optional*, defaults to `True`):
            Watch the drop folder for file events; `False` relies on the periodic rescan alone.
        after_ingest (`str`, *optional*, defaults to `"delete"`):
            What happens to a drop once it is merged (or found to be a duplicate): `delete` it (only the rolling
            merged model is kept, SPEC 1) or `move` it to `DEPLOY/ingested/<name>-<hash>`.
        retry_after (`float`, *optional*, defaults to `300.0`):
            Seconds before a drop deferred for lack of disk space is tried again.
        space_factor (`float`, *optional*, defaults to `1.2`):
            Free space needed before staging, as a multiple of the live version's size.
        validate_samples (`int`, *optional*, defaults to `8`):
            Typical samples run through the merged model before it may go live.
        on_publish (`str`, *optional*, defaults to `None`):
            Shell command run (in the background, retried) after a version goes live; the version is in its
            environment (`RECALL_VERSION`, `RECALL_VERSION_DIR`, ... see `recall_daemon.hooks`).
        vllm_url (`str`, *optional*, defaults to `None`):
            vLLM OpenAI server (`http://HOST:PORT`) that gets each new adapter version loaded at runtime.
        vllm_lora_name (`str`, *optional*, defaults to `"recall"`):
            Name the adapter is served under in vLLM (clients ask for this model name).
        reload_url (`str`, *optional*, defaults to `None`):
            URL that gets `POST {"version", "number", "path", "kind"}` after a version goes live.
        hook_retries (`int`, *optional*, defaults to `5`):
            Retries of a failed hook (after the first attempt), with exponential backoff.
        hook_backoff (`float`, *optional*, defaults to `2.0`):
            Seconds before a hook's first retry; doubled for each further retry.
        hook_timeout (`float`, *optional*, defaults to `60.0`):
            Seconds one hook attempt (command or HTTP request) may take.
        adapter_max_rank (`int`, *optional*, defaults to `64`):
            Adapter deployments: every deployed version's LoRA rank is at most this (merged factors compressed by
            truncated SVD, the error recorded per version); `0` or `None` leaves the stacked rank uncapped.
            `recall.max_rank`, when set, caps it too (the smaller wins).
        gate (`str`, *optional*, defaults to `None`):
            Shell command that evaluates each staged version before it may go live (`recall_daemon.gate`): exit 0
            publishes, anything else quarantines the drop with check `gate`. The staged folder, version and drop
            are in its environment (`RECALL_VERSION_DIR`, `RECALL_VERSION`, `RECALL_DROP`, ...), never in its
            command line.
        gate_timeout (`float`, *optional*, defaults to `3600.0`):
            Seconds the gate command may run; past it, its process group is killed and the drop quarantined.
        fingerprint_gate (`bool`, *optional*, defaults to `True`):
            With `recall.calibrate`: refuse (check `regression`) a merge whose fingerprint divergence on a task the
            live version already carries exceeds the live version's by more than `regression_margin`. Without
            calibrate there are no fingerprints and it does not apply.
        regression_margin (`float`, *optional*, defaults to `0.1`):
            Largest increase of an earlier task's fingerprint divergence (KL, nats) a merge may cause and still go
            live. Zero or negative refuses every merge that does not improve every earlier task.
        recall (`RecallConfig`, *optional*):
            RECALL merge settings (TOML table `[recall]`); the daemon always merges in `continual` mode.
    """

    drop_dir: str = field(metadata={"help": "Folder producers write task checkpoints into."})
    deploy_dir: str = field(metadata={"help": "Folder the daemon owns (versions, current, ledger, ...)."})
    base: str | None = field(default=None, metadata={"help": "Model dir or Hub id copied to versions/v0000."})
    poll: float = field(default=30.0, metadata={"help": "Seconds between rescans of the drop folder."})
    quiet_period: float = field(default=60.0, metadata={"help": "Seconds unchanged before a marker-less drop counts."})
    keep: int = field(default=3, metadata={"help": "Newest versions kept (plus live, its predecessor, v0000)."})
    metrics_port: int | None = field(default=None, metadata={"help": "Serve Prometheus metrics on this port."})
    metrics_addr: str = field(default="127.0.0.1", metadata={"help": "Bind address of the metrics HTTP server."})
    probes: str | None = field(default=None, metadata={"help": "Probe texts for drops without recall_samples.jsonl."})
    polling_observer: bool = field(default=False, metadata={"help": "Use watchdog's PollingObserver, not inotify."})
    events: bool = field(default=True, metadata={"help": "Watch for file events (False: periodic rescan only)."})
    after_ingest: str = field(default="delete", metadata={"help": "delete or move (to DEPLOY/ingested/) a done drop."})
    retry_after: float = field(default=300.0, metadata={"help": "Seconds before retrying a drop deferred for space."})
    space_factor: float = field(default=1.2, metadata={"help": "Free space needed, times the live version's size."})
    validate_samples: int = field(default=8, metadata={"help": "Samples run through a merged model first."})
    on_publish: str | None = field(default=None, metadata={"help": "Shell command run after a version goes live."})
    vllm_url: str | None = field(default=None, metadata={"help": "vLLM server that loads each new adapter version."})
    vllm_lora_name: str = field(default="recall", metadata={"help": "Name of the adapter served by vLLM."})
    reload_url: str | None = field(default=None, metadata={"help": "URL POSTed to after a version goes live."})
    hook_retries: int = field(default=5, metadata={"help": "Retries of a failed hook, with backoff."})
    hook_backoff: float = field(default=2.0, metadata={"help": "Seconds before a hook's first retry (doubling)."})
    hook_timeout: float = field(default=60.0, metadata={"help": "Seconds one hook attempt may take."})
    adapter_max_rank: int | None = field(default=64, metadata={"help": "Cap of the deployed adapter rank (0: none)."})
    gate: str | None = field(default=None, metadata={"help": "Shell command judging a staged version (0: publish)."})
    gate_timeout: float = field(default=3600.0, metadata={"help": "Seconds the gate command may run."})
    fingerprint_gate: bool = field(default=True, metadata={"help": "Refuse merges that regress an earlier task."})
    regression_margin: float = field(default=0.1, metadata={"help": "Allowed rise of an earlier task's divergence."})
    recall: RecallConfig = field(default_factory=RecallConfig, metadata={"help": "RECALL merge settings."})

    def __post_init__(self) -> None:
        if isinstance(self.recall, dict):
            self.recall = RecallConfig.from_dict(self.recall)
        if self.recall.mode != "continual":
            raise ValueError(f"The daemon folds each drop into the deployed model: recall.mode must be 'continual', "
                             f"got {self.recall.mode!r}.")
        if not self.drop_dir or not self.deploy_dir:
            raise ValueError("DaemonConfig needs both drop_dir and deploy_dir.")
        if Path(self.drop_dir).resolve() == Path(self.deploy_dir).resolve():
            raise ValueError(f"drop_dir and deploy_dir are the same folder ({self.drop_dir}); use two folders.")
        if not self.poll > 0:
            raise ValueError(f"poll must be > 0 seconds, got {self.poll}.")
        if self.quiet_period < 0:
            raise ValueError(f"quiet_period must be >= 0 seconds, got {self.quiet_period}.")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}.")
        if self.after_ingest not in AFTER_INGEST:
            raise ValueError(f"after_ingest must be one of {', '.join(AFTER_INGEST)}; got {self.after_ingest!r}.")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be a TCP port (0-65535), got {self.metrics_port}.")
        if not math.isfinite(self.recall.tau):
            raise ValueError(f"recall.tau must be a finite number > 0, got {self.recall.tau}.")
        if not (math.isfinite(self.poll) and math.isfinite(self.retry_after) and self.retry_after >= 0):
            raise ValueError(f"poll and retry_after must be finite seconds >= 0, got {self.poll}, {self.retry_after}.")
        if self.space_factor < 1.0:
            raise ValueError(f"space_factor must be >= 1.0, got {self.space_factor}.")
        if self.validate_samples < 1:
            raise ValueError(f"validate_samples must be >= 1, got {self.validate_samples}.")
        check_hook_settings(self)
        check_gate_settings(self)
        rank = self.adapter_max_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"adapter_max_rank must be an integer >= 0 (0: uncapped), got {rank!r}.")

    @property
    def merge_max_rank(self) -> int | None:
        """The rank merged adapters are compressed to: the smaller of `adapter_max_rank` and `recall.max_rank`."""
        caps = [r for r in (self.adapter_max_rank, self.recall.max_rank) if r]
        return min(caps) if caps else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DaemonConfig:
        return dataclass_from_dict(cls, data, "daemon settings")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> DaemonConfig:
        """Settings from a TOML file (top-level keys, plus a `[recall]` table), then `overrides` on top."""
        data = read_toml(path)
        recall = dict(data.pop("recall", {}) or {})
        recall.update(overrides.pop("recall", {}) or {})
        data.update({k: v for k, v in overrides.items() if v is not None})
        data["recall"] = recall
        return cls.from_dict(data)


def check_hook_settings(config: DaemonConfig) -> None:
    """The serving-hook fields (`recall_daemon.hooks`): http(s) URLs, a command, a name, sane retry numbers."""
    for name in ("vllm_url", "reload_url"):
        url = getattr(config, name)
        if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise ValueError(f"{name} must be an http:// or https:// URL, got {url!r}.")
    if config.on_publish is not None and not (isinstance(config.on_publish, str) and config.on_publish.strip()):
        raise ValueError(f"on_publish must be a shell command, got {config.on_publish!r}.")
    if not (isinstance(config.vllm_lora_name, str) and config.vllm_lora_name.strip()):
        raise ValueError(f"vllm_lora_name must be a non-empty name, got {config.vllm_lora_name!r}.")
    if isinstance(config.hook_retries, bool) or not isinstance(config.hook_retries, int) or config.hook_retries < 0:
        raise ValueError(f"hook_retries must be an integer >= 0, got {config.hook_retries!r}.")
    for name in ("hook_backoff", "hook_timeout"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}.")


def hook_config(values: dict[str, Any]) -> SimpleNamespace:
    """Only the serving-hook settings (`recall-hf rollback`): the `HOOK_FIELDS` of `values` over `DaemonConfig`'s
    defaults, validated; other keys (a daemon's whole TOML file) are ignored."""
    config = SimpleNamespace(**{f.name: f.default for f in fields(DaemonConfig) if f.name in HOOK_FIELDS})
    for key in HOOK_FIELDS:
        if values.get(key) is not None:
            setattr(config, key, values[key])
    check_hook_settings(config)
    return config


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise RuntimeError("Reading a TOML config needs Python 3.11+ or `pip install tomli`.") from None
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Config file {path} does not exist.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML ({err}).") from None
