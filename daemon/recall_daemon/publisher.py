"""The journaled publisher: a drop's merge goes `intent -> merged -> published -> idle` (RELIABILITY rules 4, 6, 12).

- `begin`: journal `intent` (nothing visible yet; the staging dir is `versions/vNNNN.tmp-<pid>/`).
- `build`: RECALL merge of the live version and the taken drop into the staging dir, the fingerprint gate, model
  card, post-merge validation, the `--gate` command (gate.py). Interruptible: a stop or a failure `abandon`s the
  staging dir and the journal goes back to idle; a crash leaves `intent`, so nothing ungated is ever published.
- `seal`: fsync everything, journal `merged`.
- `publish`: under `publish.lock`, rename to `versions/vNNNN`, fsync, switch `current`, journal `published`
  (False when `current` moved meanwhile: a rollback; the drop is merged again on top of it).
- `record` + `complete`: the ledger line naming the content that went live, then journal `idle`.

Also `publish_base`: the base model as `versions/v0000` when a deploy folder is empty (`--base` a local folder or a
Hub id, resolved once at start by `resolve_base_source`).

Adapter deployments on a bare base merge every adapter drop against v0000 (the deployment's own base), whatever base
the drop's `adapter_config.json` names; every adapter version names the deployment's base in
`base_model_name_or_path` (`deployment_base_name`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from recall_hf.durable import apply_umask, fsync_dir, fsync_tree, write_json
from recall_hf.merge import recall_merge
from recall_hf.modeldir import ADAPTER_CONFIG, NOT_COPIED, RECALL_JSON, is_adapter_dir, read_recall_json, weight_hashes
from recall_hf.versions import version_number

from .config import DaemonConfig
from .faults import crash_point
from .gate import GATE_LOGS, candidate_divergence, check_regression, gate_environment, retention_history, run_command
from .hooks import Notifier, notify_published
from .intake import TakenDrop, check_contents, scan_layout
from .journal import IDLE, INTENT, MERGED, PUBLISHED, JournalEntry
from .ledger import Result
from .metrics import Metrics
from .modelcard import version_info, weight_summary, write_version_files
from .stop import StopToken
from .store import TMP_MARK, DeployStore, now_iso
from .validation import DropInfo, DropRejected, drop_kind, open_weights, validate_version

logger = logging.getLogger(__name__)

SMOKE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world!"]


def recorded_hashes(version: Path) -> dict[str, str]:
    """The weight-file sha256 a version recorded in its `recall.json` when it was written; `{}` if unreadable."""
    try:
        hashes = read_recall_json(version).get("sha256")
    except (OSError, ValueError):
        return {}
    return hashes if isinstance(hashes, dict) else {}


def rank_info(stats: dict) -> dict:
    """An adapter version's deployed rank and, when capped, its compression error (for version.json/status)."""
    if "rank_max" not in stats:
        return {}
    return {"rank": stats["rank_max"], "compression": stats.get("compression")}


def record_compression(stage: Path, stats: dict) -> None:
    """Add the merge's rank and compression error to the version's `recall.json` (sha256 are unaffected)."""
    extra = rank_info(stats)
    if extra:
        path = stage / RECALL_JSON
        write_json(path, {**json.loads(path.read_text()), **extra})


def resolve_base_source(name: str) -> tuple[Path, dict]:
    """`--base` as a local folder, and where it came from. A Hub id is resolved once, at start, from the local cache
    (downloaded first when online); its id and the snapshot's commit are returned for the version record.

    Returns:
        `(folder, origin)`: `origin` is `{"base_model": hub id, "revision": commit}` for a Hub model (also a cache
        snapshot path given as a folder), else `{}`.
    """
    from recall_hf.hub import hub_id_of, looks_like_hub_id, resolve_hub_id

    path = Path(name).expanduser()
    if not path.exists() and looks_like_hub_id(name):
        try:
            path = resolve_hub_id(name)
        except ValueError as err:
            raise ValueError(f"--base {err}") from None
    hub_id = hub_id_of(path) if path.exists() else None
    if hub_id is None:
        return path, {}
    return path, {"base_model": hub_id, "revision": path.name if path.parent.name == "snapshots" else None}


def name_base(stage: Path, base_name: str) -> None:
    """Name the deployment's base in an adapter version: `base_model_name_or_path` and `recall.json`'s `base_model`
    (neither is a weight file: the recorded sha256 are unaffected)."""
    for path, key in ((stage / ADAPTER_CONFIG, "base_model_name_or_path"), (stage / RECALL_JSON, "base_model")):
        if path.is_file():
            write_json(path, {**json.loads(path.read_text()), key: base_name})


class Publisher:
    """Stages, validates and publishes versions of one deploy folder, every step journaled."""

    def __init__(self, config: DaemonConfig, store: DeployStore, metrics: Metrics, stop: StopToken,
                 set_state: Callable[[str], None]):
        self.config, self.store, self.metrics, self.stop = config, store, metrics, stop
        self.set_state = set_state
        self.notifier = Notifier()  # serving hooks: background threads, closed by the service on SIGTERM
        self.pending_gates: dict = {}  # the staged version's gate results, journaled by `seal`
        self.last_gate: dict | None = None

    def announce(self, version: str) -> None:
        """Tell the serving side (`--on-publish`, `--vllm-url`, `--reload-url`) that `version` is live; never waits.
        Runs again when recovery re-publishes after a crash: at least once, never for a version that is not live."""
        notify_published(self.config, self.store.version_dir(version), version_number(version), self.store.root,
                         self.notifier)

    # -- a drop's merge -------------------------------------------------------------------------------------------
    def begin(self, taken: TakenDrop, digest: str, task: str, parent: str) -> JournalEntry:
        version = self.store.next_version()
        stage = self.store.versions_dir / f"{version}{TMP_MARK}{os.getpid()}"
        entry = JournalEntry(INTENT, drop=taken.name, drop_path=str(taken.path), hash=digest, task=task,
                             version=version, parent=parent, staging=str(stage), started=now_iso())
        entry = self.store.journal.write(entry)
        crash_point("intent")
        return entry

    def build(self, entry: JournalEntry, taken: TakenDrop, info: DropInfo) -> None:
        """Merge, card and validate into the staging dir; raises on anything that must keep it from going live."""
        stage, drop = Path(entry.staging), taken.path
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        parent_dir = self.store.version_dir(entry.parent)
        if info.kind == "adapter" and not is_adapter_dir(parent_dir):  # the bare base's first adapter
            from recall_hf.lora.merge import adopt_adapter

            stats = adopt_adapter(drop, stage, self.config.merge_max_rank, self.config.recall.dtype)
            weights, task_count, kind, calibration = None, 1, "adopt-adapter", None
            write_json(stage / RECALL_JSON, {"kind": "recall-daemon-adapter", "task_count": 1, "parents": [str(drop)],
                                             "created": now_iso(), "sha256": weight_hashes(stage)})
        else:
            report = self._merge(entry, drop, info, stage)
            stats, weights, task_count = report.stats, weight_summary(report.weights), report.output_task_count
            kind, calibration = f"merge-{report.kind}", report.calibration
        created = now_iso()
        self.pending_gates = {}
        retention = self._fingerprint_gate(calibration, entry, created)
        tasks = list(self.store.version_info(entry.parent).get("tasks", []))
        tasks.append({"task": info.task, "name": taken.name, "hash": entry.hash, "time": created,
                      "version": entry.version, "weights": weights})
        record_compression(stage, stats)
        if info.kind == "adapter" and self.adapter_base() is not None:
            name_base(stage, self.deployment_base_name())
        write_version_files(stage, {**version_info(entry.version, entry.parent, created, task_count, tasks, kind),
                                    **rank_info(stats), **retention})
        apply_umask(stage)  # nothing executable, readable by a server running as another user
        self.set_state(f"validating {entry.version}")
        result = validate_version(stage, info.texts, self.config.validate_samples, self.config.recall.max_length,
                                  self.config.recall.device, self.config.recall.device_map, self.adapter_base())
        logger.info("Version %s validated: forward pass on %d typical samples is finite", entry.version,
                    result["texts"])
        self._command_gate(entry, info.task, stage)

    # -- promotion gates (gate.py): both run while the journal says `intent` ---------------------------------------
    def _fingerprint_gate(self, calibration: dict | None, entry: JournalEntry, created: str) -> dict:
        """Refuse a calibrated merge that regresses an earlier task; the version's retention record otherwise."""
        if not calibration:
            return {}  # calibrate off: no fingerprint scores, the gate does not apply (gate_status says so)
        divergence, parent = candidate_divergence(calibration), self.store.version_info(entry.parent)
        if self.config.fingerprint_gate:
            verdict = check_regression(calibration, self.config.regression_margin, parent.get("divergence"))
            self.metrics.gate_checks.labels("fingerprint", "passed" if verdict.passed else "failed").inc()
            self.last_gate = {"gate": "fingerprint", "version": entry.version, "drop": entry.drop,
                              "result": "passed" if verdict.passed else "failed", "time": now_iso()}
            if not verdict.passed:
                raise DropRejected("regression", verdict.message(), verdict.details())
            self.pending_gates["fingerprint"] = {"result": "passed", **verdict.details()}
        else:
            self.pending_gates["fingerprint"] = {"result": "off"}
        return {"divergence": {t: round(v, 6) for t, v in sorted(divergence.items())},
                "retention": retention_history(parent, entry.version, created, divergence),
                "gates": {"fingerprint": self.pending_gates["fingerprint"]}}

    def _command_gate(self, entry: JournalEntry, task: str, stage: Path) -> None:
        """Run `--gate CMD` on the staged version; a non-zero exit (or a timeout) refuses it (check `gate`)."""
        if not self.config.gate:
            return
        self.set_state(f"gating {entry.version}")
        env = gate_environment(stage, entry.version, self.store.root, entry.parent, entry.drop, entry.hash, task)
        log = self.store.root / GATE_LOGS / f"{entry.version}-{entry.hash[:12]}.log"
        result = run_command(self.config.gate, env, self.config.gate_timeout, log, self.stop.check)
        outcome = "passed" if result.passed else "failed"
        self.metrics.gate_checks.labels("command", outcome).inc()
        self.last_gate = {"gate": "command", "version": entry.version, "drop": entry.drop, "result": outcome,
                          "exit_code": result.exit_code, "time": now_iso()}
        if not result.passed:
            raise DropRejected("gate", result.message(self.config.gate_timeout), result.details())
        logger.info("Version %s passed the --gate command (%.1fs)", entry.version, result.seconds)
        self.pending_gates["command"] = {"result": "passed", "seconds": round(result.seconds, 3), "log": result.log}

    def gate_status(self) -> dict:
        """The gates as configured, and the last decision (status.json, `recall-hf status`)."""
        if not self.config.recall.calibrate:
            fingerprint = "not applicable: calibrate is off (no fingerprint scores)"
        else:
            fingerprint = f"on (margin {self.config.regression_margin:g})" if self.config.fingerprint_gate else "off"
        return {"fingerprint": fingerprint, "command": self.config.gate, "last": self.last_gate}

    def _merge(self, entry: JournalEntry, drop: Path, info: DropInfo, stage: Path):
        """RECALL merge of the live version and the drop into `stage` (adapters capped at `merge_max_rank`)."""
        work = stage / "merged"
        # Task-vector fusion measures every task vector from the base (v0000): only for drops fine-tuned from it.
        base = self.store.version_dir("v0000") if self.config.recall.fusion == "task_vector" else None
        if is_adapter_dir(drop):
            # Adapters apply to the deployment's base (a bare v0000), not to whatever their adapter_config.json
            # names; a deployment begun from an adapter v0000 (no full base) keeps that name.
            base = self.adapter_base()
        # Hashes already known: the drop's were computed while it was taken; every version records its own.
        parent_dir = self.store.version_dir(entry.parent)
        known = {str(d): recorded_hashes(d) for d in [parent_dir] + ([base] if base else [])}
        known[str(drop)] = info.weight_hashes
        config = self.config.recall
        if info.kind == "adapter" and config.max_rank != self.config.merge_max_rank:
            config = dataclasses.replace(config, max_rank=self.config.merge_max_rank)
        report = recall_merge([parent_dir, drop], info.texts, work, config, base=base, progress=False,
                              known_hashes=known)
        for p in work.iterdir():
            os.rename(p, stage / p.name)
        work.rmdir()
        return report

    def adapter_base(self) -> Path | None:
        """The deployment's base model when adapter versions run on a bare full-model v0000, else None."""
        v0 = self.store.version_dir("v0000")
        return v0 if v0.is_dir() and not is_adapter_dir(v0) else None

    def deployment_base_name(self) -> str:
        """What adapter versions name as their base: the Hub id the deployment's base came from (`--base` a Hub id),
        else the absolute path of `versions/v0000`, which is never pruned and holds the exact weights every adapter
        version was merged and validated against."""
        v0 = self.store.version_dir("v0000")
        try:
            hub_id = read_recall_json(v0).get("base_model")
        except (OSError, ValueError):
            hub_id = None
        from recall_hf.hub import looks_like_hub_id

        return hub_id if isinstance(hub_id, str) and looks_like_hub_id(hub_id) else str(v0.resolve())

    def seal(self, entry: JournalEntry, started: float) -> JournalEntry:
        fsync_tree(Path(entry.staging))
        entry = self.store.journal.write(entry.advance(MERGED, merge_seconds=round(time.monotonic() - started, 3),
                                                       gates=self.pending_gates))
        crash_point("merged")
        return entry

    def publish(self, entry: JournalEntry, recovering: bool = False) -> bool:
        """Rename the staged version into place and switch `current`; False when `current` moved meanwhile."""
        stage, final = Path(entry.staging), self.store.version_dir(entry.version)
        with self.store.publish_lock():
            live = self.store.current()
            if live != entry.version:
                if live not in (entry.parent, None):
                    logger.warning("`current` moved from %s to %s while %s was merged (a rollback?); the drop %s "
                                   "is merged again into %s.", entry.parent, live, entry.version, entry.drop, live)
                    return False
                if not final.exists():
                    if not stage.is_dir():
                        logger.warning("Neither %s nor its staging dir exists; the drop %s is merged again.",
                                       final, entry.drop)
                        return False
                    os.rename(stage, final)
                    fsync_dir(self.store.versions_dir)
                crash_point("renamed")
                self.store.switch_current(entry.version)
                crash_point("switched")
        self.store.journal.write(entry.advance(PUBLISHED))
        crash_point("published")
        self.announce(entry.version)
        if recovering:
            logger.info("Recovered: %s is live.", entry.version)
        return True

    def record(self, entry: JournalEntry) -> None:
        """The ledger line of a published drop (once, even when recovery runs this again)."""
        if entry.hash not in self.store.ledger.merged():
            version = self.store.version_dir(entry.version)
            self.store.ledger.append(Result.MERGED, hash=entry.hash, drop=entry.drop, task=entry.task,
                                     version=entry.version, parent=entry.parent, merge_seconds=entry.merge_seconds,
                                     version_sha256=recorded_hashes(version),
                                     task_count=self.store.version_info(entry.version).get("task_count"),
                                     **({"gates": entry.gates} if entry.gates else {}))
            self.metrics.ingested.inc()
            if entry.merge_seconds:
                self.metrics.merge_seconds.observe(entry.merge_seconds)
        crash_point("ledger")

    def complete(self, entry: JournalEntry) -> None:
        self.store.journal.write(entry.advance(IDLE))

    def abandon(self, entry: JournalEntry, remove_version: bool = False) -> None:
        """Undo an unpublished merge: remove its staging (and never-live version) dir, journal back to idle."""
        if entry.staging:
            shutil.rmtree(entry.staging, ignore_errors=True)
        final = self.store.versions_dir / entry.version if entry.version else None
        if remove_version and final is not None and final.is_dir() and self.store.current() != entry.version:
            doomed = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}.discarded")
            os.rename(final, doomed)
            fsync_dir(self.store.versions_dir)
            shutil.rmtree(doomed, ignore_errors=True)
        self.store.journal.write(entry.advance(IDLE))

    def produced_task_count(self, weights: dict[str, str]) -> int | None:
        """Task count of the version this deployment published with exactly these weight files, or None."""
        key = json.dumps(weights, sort_keys=True)
        line = self.store.ledger.published_weights().get(key)
        if line is not None and isinstance(line.get("task_count"), int):
            return line["task_count"]  # recorded with the line: still known after the version was pruned
        for name in self.store.versions():
            if json.dumps(recorded_hashes(self.store.version_dir(name)), sort_keys=True) == key:
                return int(self.store.version_info(name).get("task_count") or 0) or None
        return None

    # -- the base -------------------------------------------------------------------------------------------------
    def publish_base(self, base: Path, probe_texts: list[str] | None, origin: dict | None = None) -> str:
        """Copy the base model to `versions/v0000` and make it live; `origin` (`resolve_base_source`) is recorded."""
        origin = origin or {}
        if not base.is_dir():
            raise ValueError(f"--base {base} is not a directory.")
        try:
            kind = drop_kind(base)
            open_weights(base, kind)
        except DropRejected as rej:
            raise ValueError(f"--base {base} is not a usable model: {rej.message}") from None
        stage = self.store.versions_dir / f"v0000{TMP_MARK}{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            with self.stop.interruptible():
                self._stage_base(base, stage, kind, probe_texts, origin)
            fsync_tree(stage)
            os.rename(stage, self.store.version_dir("v0000"))
            fsync_dir(self.store.versions_dir)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        self.store.switch_current("v0000")
        self.announce("v0000")
        self.store.ledger.append(Result.INIT, event="init", version="v0000", kind=kind, source=str(base.resolve()),
                                 **origin)
        logger.info("Initialised %s with the base model %s as v0000 (%s).", self.store.root, base, kind)
        return "v0000"

    def _stage_base(self, base: Path, stage: Path, kind: str, probe_texts: list[str] | None, origin: dict) -> None:
        for p in sorted(base.iterdir()):
            if p.is_file() and p.name not in NOT_COPIED and not p.name.startswith("."):
                shutil.copy2(p, stage / p.name)  # an operator's base may be a cache snapshot of symlinks
        try:
            check_contents(stage, scan_layout(stage))
        except DropRejected as rej:
            raise ValueError(f"--base {base}: {rej.message}") from None
        created = now_iso()
        write_json(stage / RECALL_JSON, {"kind": "recall-daemon-base", "task_count": 0,
                                         "source": str(base.resolve()), **origin, "created": created,
                                         "sha256": weight_hashes(stage)})
        write_version_files(stage, {**version_info("v0000", None, created, 0, [], "base", str(base.resolve())),
                                    **origin})
        try:
            validate_version(stage, probe_texts or SMOKE_TEXTS, self.config.validate_samples,
                             self.config.recall.max_length, self.config.recall.device, self.config.recall.device_map)
        except DropRejected as rej:
            raise ValueError(f"--base {base} fails validation: {rej.message}") from None
        apply_umask(stage)  # copied base files keep their modes (transformers writes weights 0600)
