"""`recall-hf daemon | status | rollback` (also `recall-daemon ...`): the drop-folder daemon's command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from typing import TYPE_CHECKING

from recall_hf.cli import run_parsed
from recall_hf.config import RecallConfig
from recall_hf.flags import add_dataclass_args, dataclass_values

if TYPE_CHECKING:
    from .store import DeployStore

COMMANDS = ("daemon", "status", "rollback")
# The RecallConfig fields a daemon's merges take from its flags (the [recall] table of --config takes any).
RECALL_KEYS = ("tau", "similarity", "k", "task_count_prior", "normalize_depth", "fusion", "seed", "batch_size",
               "max_length", "dtype", "device", "device_map", "calibrate", "calibrate_rule")


def _const(value):
    return {"action": "store_const", "const": value, "default": None}


def _add_daemon_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML file of settings (see daemon/example-config.toml); "
                   "command-line flags override it")
    p.add_argument("--drop", dest="drop_dir", default=None, help="drop folder producers write task checkpoints into")
    p.add_argument("--deploy", dest="deploy_dir", default=None,
                   help="deploy folder the daemon owns (versions/, current, ledger.jsonl, quarantine/, status.json)")
    p.add_argument("--base", default=None, help="model (or adapter) dir, or a Hub id resolved from the local cache, "
                   "published as versions/v0000 when the deploy folder is empty (ignored once it holds a version)")
    p.add_argument("--once", action="store_true", help="process the complete drops pending now, then exit "
                   "(exit 1 when a drop had to be deferred, e.g. for disk space; 3 when a drop was quarantined)")
    p.add_argument("--poll", type=float, default=None, help="seconds between rescans of the drop folder (default 30)")
    p.add_argument("--quiet-period", type=float, default=None,
                   help="a drop without READY counts as complete after this many seconds unchanged (default 60)")
    p.add_argument("--keep", type=int, default=None,
                   help="newest versions to keep; the live one, its predecessor and v0000 are always kept (default 3)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (DEPLOY/metrics.prom is always written)")
    p.add_argument("--metrics-addr", default=None,
                   help="address the metrics server binds to (default 127.0.0.1, loopback only; 0.0.0.0 = all)")
    p.add_argument("--probes", default=None, help="probe texts (.jsonl/.txt) for drops without recall_samples.jsonl")
    p.add_argument("--polling-observer", dest="polling_observer", **_const(True),
                   help="watch with a polling observer instead of inotify (network filesystems)")
    p.add_argument("--no-events", dest="events", **_const(False),
                   help="no file watching at all: rescan every --poll seconds only")
    p.add_argument("--after-ingest", default=None, choices=["delete", "move"],
                   help="what to do with a merged drop: delete it (default) or move it to DEPLOY/ingested/")
    p.add_argument("--retry-after", type=float, default=None,
                   help="seconds before retrying a drop deferred for disk space (default 300)")
    p.add_argument("--adapter-max-rank", type=int, default=None,
                   help="adapter deployments: cap of the deployed LoRA rank, compressed by truncated SVD "
                   "(default 64; 0 = uncapped)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="daemon log level (default INFO)")
    _add_hook_args(p)
    _add_gate_args(p)
    g = p.add_argument_group("RECALL merge settings (also the [recall] table of --config)")
    add_dataclass_args(g, RecallConfig, RECALL_KEYS, unset_defaults=True)


def _add_hook_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving hooks, run in the background after a version goes live (retried with backoff; "
                             "hook_retries, hook_backoff and hook_timeout in --config)")
    g.add_argument("--on-publish", dest="on_publish", metavar="CMD", default=None,
                   help="shell command with RECALL_VERSION, RECALL_VERSION_NUMBER, RECALL_VERSION_DIR, "
                   "RECALL_DEPLOY_DIR, RECALL_CURRENT and RECALL_KIND in its environment")
    g.add_argument("--vllm-url", dest="vllm_url", metavar="URL", default=None,
                   help="vLLM server (http://HOST:PORT) that unloads and reloads the adapter of each new version "
                   "(adapter deployments; it needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
    g.add_argument("--vllm-lora-name", dest="vllm_lora_name", metavar="NAME", default=None,
                   help="name the adapter is served under in vLLM (default recall)")
    g.add_argument("--reload-url", dest="reload_url", metavar="URL", default=None,
                   help='URL that gets POST {"version", "number", "path", "kind"} after a version goes live')


def _add_gate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("promotion gates, run on each staged version before it goes live (daemon/README.md)")
    g.add_argument("--gate", dest="gate", metavar="CMD", default=None,
                   help="shell command evaluating the staged version (RECALL_VERSION_DIR, RECALL_VERSION, "
                   "RECALL_DROP, ... in its environment): exit 0 publishes, else the drop is quarantined ('gate')")
    g.add_argument("--gate-timeout", dest="gate_timeout", type=float, metavar="S", default=None,
                   help="seconds the --gate command may run before it counts as failed (default 3600)")
    g.add_argument("--regression-margin", dest="regression_margin", type=float, metavar="KL", default=None,
                   help="calibrate only: largest rise of an earlier task's fingerprint divergence (nats) a merge "
                   "may cause (default 0.1); more quarantines the drop ('regression')")
    g.add_argument("--fingerprint-gate", dest="fingerprint_gate", **_const(True),
                   help="refuse merges that regress an earlier task's fingerprint (the default with calibrate)")
    g.add_argument("--no-fingerprint-gate", dest="fingerprint_gate", **_const(False),
                   help="publish calibrated merges whatever they do to earlier tasks' fingerprints")


GATE_KEYS = ("gate", "gate_timeout", "regression_margin", "fingerprint_gate")
HOOK_KEYS = ("on_publish", "vllm_url", "vllm_lora_name", "reload_url")
DAEMON_KEYS = ("drop_dir", "deploy_dir", "base", "poll", "quiet_period", "keep", "metrics_port", "metrics_addr",
               "probes", "polling_observer", "events", "after_ingest", "retry_after", "adapter_max_rank") + HOOK_KEYS
DAEMON_KEYS += GATE_KEYS


def build_config(args: argparse.Namespace):
    from .config import DaemonConfig

    values = {k: getattr(args, k) for k in DAEMON_KEYS if getattr(args, k, None) is not None}
    recall = dataclass_values(args, RecallConfig, RECALL_KEYS)
    if args.config:
        return DaemonConfig.from_toml(args.config, recall=recall, **values)
    missing = [flag for flag, key in (("--drop", "drop_dir"), ("--deploy", "deploy_dir")) if key not in values]
    if missing:
        raise ValueError(f"missing {' and '.join(missing)} (or give them in a --config file).")
    return DaemonConfig.from_dict({**values, "recall": recall})


def _daemon_logging(level: str) -> None:
    log = logging.getLogger("recall_daemon")
    log.setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_daemon(args: argparse.Namespace) -> int:
    from .service import DaemonService

    _daemon_logging(args.log_level)
    config = build_config(args)
    service = DaemonService(config)
    rc = service.run(once=args.once)
    if service.stop.requested:
        # Stopped by SIGTERM/SIGINT: everything durable is fsynced and the lock released. Skip the interpreter's
        # teardown (seconds with torch loaded) so the process ends within the second RELIABILITY rule 14 promises.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _open_store(deploy: str) -> DeployStore:
    from .store import DeployStore

    store = DeployStore(deploy)
    if not store.versions_dir.is_dir():
        raise ValueError(f"{deploy} is not a deploy folder (no versions/); start the daemon with --base first.")
    return store


def collect_status(store: DeployStore) -> dict:
    """What an operator wants to know, from the files alone (works whether the daemon runs or not)."""
    from .service import lock_held, lock_holder

    status = store.read_status()
    running = lock_held(store.lock_path)
    live = store.current()
    info = store.version_info(live) if live else {}
    ledger = store.ledger.entries()
    return {
        "running": running,
        "pid": lock_holder(store.lock_path) if running else None,
        "state": status.get("state", "unknown") if running else "stopped",
        "current": live,
        "current_path": str(store.current_link.resolve()) if live else None,
        "task_count": info.get("task_count"),
        "rank": info.get("rank"),  # adapter versions: the deployed LoRA rank and the SVD cap's error
        "compression": info.get("compression"),
        "tasks": [{"task": t.get("task"), "hash": t.get("hash"), "version": t.get("version"), "time": t.get("time")}
                  for t in info.get("tasks", [])],
        "versions": store.versions(),
        "queue": status.get("queue", []) if running else [],
        "writing": status.get("writing", []) if running else [],
        "deferred": status.get("deferred", []) if running else [],
        "journal": store.journal.read().state,
        "ledger": dict(Counter(e.get("result", "?") for e in ledger)),
        "quarantine": [{"name": q["name"], "check": q.get("check"), "error": q.get("error")}
                       for q in store.quarantined()],
        "last_error": status.get("last_error"),
        "last_success": status.get("last_success"),
        "updated": status.get("updated"),
        **gate_report(info, status, ledger),
    }


def gate_report(info: dict, status: dict, ledger: list[dict]) -> dict:
    """The live version's per-task fingerprint divergence (calibrate on) and the promotion gates' outcomes."""
    refused = Counter(e.get("check") for e in ledger if e.get("result") == "quarantined"
                      and e.get("check") in ("regression", "gate"))
    return {"divergence": info.get("divergence") or {}, "gates": status.get("gates"),
            "gate_quarantines": dict(refused)}


def print_gates(report: dict) -> None:
    if report["divergence"]:
        print("fingerprint divergence of the live version (lower = closer to the task's own model):")
        for task, value in report["divergence"].items():
            print(f"  {task}: {value:.4g}")
    gates = report["gates"] or {}
    if gates or report["gate_quarantines"]:
        refused = ", ".join(f"{k} {v}" for k, v in sorted(report["gate_quarantines"].items())) or "none"
        print(f"gates: fingerprint {gates.get('fingerprint', '?')}; command {gates.get('command') or 'none'}; "
              f"quarantined by gates: {refused}")
        last = gates.get("last")
        if last:
            print(f"last gate decision: {last.get('gate')} {last.get('result')} for {last.get('drop')} "
                  f"({last.get('version')}, {last.get('time')})")


def cmd_status(args: argparse.Namespace) -> int:
    report = collect_status(_open_store(args.deploy))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    run = f"running (pid {report['pid']}, {report['state']})" if report["running"] else "not running"
    print(f"recall-daemon: {run}")
    print(f"current: {report['current'] or 'MISSING'} ({report['task_count'] or 0} tasks)  "
          f"versions: {', '.join(report['versions']) or 'none'}  journal: {report['journal']}")
    if report["rank"]:
        err = (report["compression"] or {}).get("max_rel_error")
        print(f"adapter rank: {report['rank']}" + (f" (capped; max relative error {err:.2e})" if err else ""))
    for i, t in enumerate(report["tasks"], 1):
        print(f"  {i:>3}. {t['task']}  [{(t['hash'] or '')[:12]}]  {t['version']}  {t['time']}")
    print_gates(report)
    if report["queue"] or report["writing"]:
        print(f"queue: {', '.join(report['queue']) or '-'}  being written: {', '.join(report['writing']) or '-'}")
    print("ledger: " + (", ".join(f"{k} {v}" for k, v in sorted(report["ledger"].items())) or "empty"))
    for q in report["quarantine"]:
        print(f"quarantined: {q['name']}: {q['check']}: {q['error']}")
    if report["last_success"]:
        s = report["last_success"]
        print(f"last success: {s.get('drop')} -> {s.get('version')} at {s.get('time')}")
    if report["last_error"]:
        e = report["last_error"]
        print(f"last error: {e.get('kind')} {e.get('drop', '')}: {e.get('error')} ({e.get('time')})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from .config import hook_config, read_toml

    flags = {k: getattr(args, k) for k in HOOK_KEYS if getattr(args, k) is not None}
    hooks = hook_config({**(read_toml(args.config) if args.config else {}), **flags})  # checked before anything moves
    store = _open_store(args.deploy)
    before, after = store.rollback(args.to)
    print(f"current: {before or 'missing'} -> {after} ({store.current_link} -> {store.current_link.resolve()})")
    return notify_rollback(hooks, store, after)


def notify_rollback(hooks, store: DeployStore, version: str) -> int:
    """Run the serving hooks for the version live again and wait for them, at most `hook_timeout` seconds."""
    from recall_hf.versions import version_number

    from .hooks import Notifier, notify_published

    notifier = Notifier()
    if not notify_published(hooks, store.version_dir(version), version_number(version), store.root, notifier):
        return 0
    finished = notifier.finish(hooks.hook_timeout)
    failed = notifier.failures()
    for o in failed:
        print(f"warning: serving hook {o['hook']} failed for {version}: {o['error']}", file=sys.stderr)
    if not finished:
        print(f"warning: serving hooks still running after {hooks.hook_timeout:.0f}s; the server may still serve "
              "the version rolled back from.", file=sys.stderr)
    elif not failed:
        print(f"serving hooks: {version} announced")
    return 0


def add_daemon_commands(subparsers) -> None:
    """Add `daemon`, `status` and `rollback` to an argparse subparsers object (used by `recall-hf`)."""
    d = subparsers.add_parser(
        "daemon", help="watch a drop folder and fold each task checkpoint into the deployed model",
        description="Watch DROP for task checkpoints (a sub-directory each, complete when it holds READY or stopped "
        "changing for --quiet-period) and fold each into the deployed model with RECALL: verify, merge, validate, "
        "publish as DEPLOY/versions/vNNNN and switch DEPLOY/current atomically. Crash-safe; see daemon/README.md.")
    _add_daemon_args(d)
    d.set_defaults(func=cmd_daemon)

    s = subparsers.add_parser("status", help="show the deploy folder: live version, tasks, queue, errors",
                              description="Report a deploy folder's state from its files (daemon running or not).")
    s.add_argument("--deploy", required=True, help="the deploy folder")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)

    r = subparsers.add_parser("rollback", help="point DEPLOY/current at an earlier version",
                              description="Switch DEPLOY/current atomically to --to, or to the live version's "
                              "predecessor. Safe while the daemon runs: a merge in flight is redone on the new "
                              "live version. Drops already in the ledger are not merged again if re-dropped.")
    r.add_argument("--deploy", required=True, help="the deploy folder")
    r.add_argument("--to", default=None, help="version name, e.g. v0003 (default: the live version's predecessor)")
    r.add_argument("--config", default=None, help="the daemon's TOML settings: its serving hooks run for the version "
                   "live again (flags below override it)")
    _add_hook_args(r)
    r.set_defaults(func=cmd_rollback)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recall-daemon", description="RECALL drop-folder daemon: continual model "
                                     "merging as a crash-safe service (same as `recall-hf daemon|status|rollback`).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_daemon_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "-v", "--verbose"):
        argv.insert(0, "daemon")  # `recall-daemon --drop ... --deploy ...`
    return run_parsed(build_parser().parse_args(argv), "recall-daemon")


if __name__ == "__main__":
    sys.exit(main())
