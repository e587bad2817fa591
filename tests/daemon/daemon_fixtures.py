"""Fixtures of the daemon tests: one tiny Llama base per session (hidden 16, 2 layers), a fresh deployment per test.

A plugin each test module loads with `pytest_plugins = ["daemon_fixtures"]`, not a `conftest.py`: the top-level
tests import names with `from conftest import ...`, which a second `conftest` module would shadow.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import transformers  # noqa: E402
from daemon_helpers import SAMPLES, Deployment  # noqa: E402

from recall_daemon.faults import CRASH_ENV, FAULT_ENV  # noqa: E402
from recall_hf.tiny import build_tiny_model  # noqa: E402

transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("daemon_base") / "base"
    build_tiny_model("llama", path, texts=SAMPLES, hidden=16, layers=2)
    return path


@pytest.fixture(scope="session")
def other_models(tmp_path_factory):
    """Tiny models that do not fit the base: another model type, hidden size, layer count."""
    root = tmp_path_factory.mktemp("daemon_other")
    made = {}
    for key, kwargs in {"qwen2": {"arch": "qwen2"}, "hidden32": {"hidden": 32}, "layers3": {"layers": 3}}.items():
        arch = kwargs.pop("arch", "llama")
        build_tiny_model(arch, root / key, texts=SAMPLES, hidden=kwargs.get("hidden", 16),
                         layers=kwargs.get("layers", 2))
        made[key] = root / key
    return made


@pytest.fixture
def deployment(tmp_path, tiny_base, monkeypatch) -> Deployment:
    """A deploy folder initialised with the base as v0000 and an empty drop folder."""
    monkeypatch.delenv(CRASH_ENV, raising=False)
    monkeypatch.delenv(FAULT_ENV, raising=False)
    dep = Deployment(tmp_path, tiny_base)
    assert dep.run_once() == 0
    assert dep.store.current() == "v0000"
    return dep
