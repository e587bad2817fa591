"""Hostile and unlucky drop ingredients (issue 11) and the invariants every test of them checks.

Each ingredient turns a good drop into a bad one and says which check must refuse it and which path the reason must
name. `Outside` is what lives outside the drop: a secret file, a FIFO and a stolen shard; none of them may ever be
read (the FIFO would hang a reader) or published (the secret's bytes are searched for in the deploy folder).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon_helpers import Deployment

from recall_daemon.intake import content_hash
from recall_daemon.store import REASON_NAME

SECRET = b"SECRET-3f1c9a-must-never-be-published"


@dataclass
class Outside:
    root: Path

    @classmethod
    def make(cls, root: Path, shard_source: Path | None = None) -> Outside:
        root.mkdir(parents=True, exist_ok=True)
        (root / "secret.txt").write_bytes(SECRET + b"\n")
        if not (root / "pipe").exists():
            os.mkfifo(root / "pipe")
        if shard_source is not None:
            shutil.copy(shard_source, root / "stolen.safetensors")
        return cls(root)


@dataclass(frozen=True)
class Ingredient:
    apply: Callable[[Path, Outside, Deployment], None]
    check: str
    names: str  # what the reason's error must mention


def _link(name: str, target: Callable[[Outside, Deployment], str]):
    def apply(d: Path, out: Outside, dep: Deployment) -> None:
        os.symlink(target(out, dep), d / name)

    return apply


def _fifo(d: Path, out: Outside, dep: Deployment) -> None:
    os.mkfifo(d / "notes.txt")


def _code(d: Path, out: Outside, dep: Deployment) -> None:
    (d / "modeling_evil.py").write_text("import os\nos.system('touch /tmp/drop-code-ran')\n")


def _auto_map(d: Path, out: Outside, dep: Deployment) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))


def _task_count(d: Path, out: Outside, dep: Deployment) -> None:
    recall = json.loads((d / "recall.json").read_text())
    recall["task_count"] = 1_000_000
    (d / "recall.json").write_text(json.dumps(recall))


def _index_escape(d: Path, out: Outside, dep: Deployment) -> None:
    """Point one shard of the index outside the drop, at a valid copy of it (the content hash never sees it)."""
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    shutil.copy(d / shard, out.root / "stolen.safetensors")
    (d / shard).unlink()
    rel = os.path.relpath(out.root / "stolen.safetensors", d)
    index["weight_map"] = {k: (rel if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


def _blank_samples(d: Path, out: Outside, dep: Deployment) -> None:
    (d / "recall_samples.jsonl").write_text('{"text": "   "}\n{"text": ""}\n')


def _binary_samples(d: Path, out: Outside, dep: Deployment) -> None:
    (d / "recall_samples.jsonl").write_bytes(b"\xff\xfe\x00\x81binary\n")


INGREDIENTS: dict[str, Ingredient] = {
    "dangling_symlink": Ingredient(_link("merges.txt", lambda o, dep: "/nonexistent/blobs/abc123"), "layout",
                                   "merges.txt"),
    "outside_symlink": Ingredient(_link("vocab.txt", lambda o, dep: str(o.root / "secret.txt")), "layout",
                                  "vocab.txt"),
    "deploy_dir_symlink": Ingredient(_link("cache", lambda o, dep: str(dep.deploy)), "layout", "cache"),
    "fifo_link": Ingredient(_link("added_tokens.json", lambda o, dep: str(o.root / "pipe")), "layout",
                            "added_tokens.json"),
    "fifo": Ingredient(_fifo, "layout", "notes.txt"),
    "dev_zero": Ingredient(_link("special.bin", lambda o, dep: "/dev/zero"), "layout", "special.bin"),
    "python_file": Ingredient(_code, "code", "modeling_evil.py"),
    "auto_map": Ingredient(_auto_map, "code", "config.json"),
    "huge_task_count": Ingredient(_task_count, "recall_json", "task_count"),
    "index_escape": Ingredient(_index_escape, "layout", "stolen.safetensors"),
    "blank_samples": Ingredient(_blank_samples, "samples", "recall_samples.jsonl"),
    "binary_samples": Ingredient(_binary_samples, "samples", "recall_samples.jsonl"),
}


def make_hostile(dep: Deployment, name: str, ingredients: list[str], out: Outside, seed: int = 1) -> Path:
    d = dep.add(name, seed=seed, shards=2)
    for key in ingredients:
        INGREDIENTS[key].apply(d, out, dep)
    return d


def quarantine_reasons(dep: Deployment) -> dict[str, dict]:
    """Drop name -> its REASON.json, for every quarantined drop."""
    out = {}
    for q in dep.store.quarantine_dir.iterdir():
        reason = json.loads((q / REASON_NAME).read_text())
        out[reason["drop"]] = reason
    return out


def assert_refused(dep: Deployment, name: str, ingredients: list[str]) -> dict:
    """The drop is quarantined by one of its ingredients' checks, with the offending path named."""
    reason = quarantine_reasons(dep).get(name)
    assert reason is not None, f"{name!r} was not quarantined; ledger: {dep.ledger()}"
    expected = {INGREDIENTS[k].check: INGREDIENTS[k].names for k in ingredients}
    assert reason["check"] in expected, f"{name!r}: {reason['check']}: {reason['error']} (expected {expected})"
    named = [INGREDIENTS[k].names for k in ingredients if INGREDIENTS[k].check == reason["check"]]
    assert any(n in reason["error"] for n in named), f"{name!r}: {reason['error']!r} names none of {named}"
    assert "\n" not in reason["error"]
    return reason


def assert_nothing_leaked(dep: Deployment) -> None:
    """No byte of the secret outside the drops is anywhere in the deploy folder (walked without following links),
    and nothing published is executable or code."""
    for folder, _, files in os.walk(dep.deploy):
        for f in files:
            p = Path(folder) / f
            if p.is_symlink() or not p.is_file():
                continue
            assert SECRET not in p.read_bytes(), f"{p} holds the secret from outside the drop"
    for version in dep.store.versions_dir.iterdir():
        for p in version.rglob("*"):
            assert not p.is_symlink() and not p.name.endswith(".py"), p
            assert p.is_dir() or p.stat().st_mode & 0o111 == 0, f"{p} is executable"
            if p.name.endswith("config.json"):
                assert "auto_map" not in json.loads(p.read_text()), p


def expected_hashes(drops: dict[str, Path]) -> dict[str, str]:
    """Content hash of each good drop before the daemon sees it: what the ledger must name."""
    return {name: content_hash(path)[0] for name, path in drops.items()}


def assert_ledger_names_what_went_live(dep: Deployment, good: dict[str, str]) -> None:
    """The merged ledger lines are exactly the good drops, with the content hashes they had; the live version's
    lineage is the same list."""
    merged = dep.ledger("merged")
    assert [e["drop"] for e in merged] == list(good), [e["drop"] for e in merged]
    assert [e["hash"] for e in merged] == list(good.values())
    tasks = dep.store.version_info(dep.store.current())["tasks"]
    assert [(t["name"], t["hash"]) for t in tasks] == list(good.items())
