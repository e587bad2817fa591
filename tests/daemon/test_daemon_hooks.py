"""Serving hooks against a small HTTP server on 127.0.0.1: vLLM adapter loading, a reload URL, --on-publish."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from recall_daemon.hooks import Notifier, notify_published

pytest_plugins = ["daemon_fixtures"]


class FakeServer:
    """Records every POST; answers `fail` times with 500 first (per path), then 200; `delay` seconds per answer."""

    def __init__(self, fail: int = 0, delay: float = 0.0):
        self.requests: list[tuple[str, dict]] = []
        self.fail, self.delay, self.failed = fail, delay, {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                server.requests.append((self.path, body))
                time.sleep(server.delay)
                failing = server.failed.get(self.path, 0) < server.fail
                server.failed[self.path] = server.failed.get(self.path, 0) + failing
                code = 500 if failing else 200
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b'{"error": "busy"}' if failing else b"ok")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.httpd.shutdown()


def version(tmp_path: Path, number: int, adapter: bool) -> Path:
    path = tmp_path / "deploy" / "versions" / f"v{number:04d}"
    path.mkdir(parents=True)
    (path / ("adapter_config.json" if adapter else "config.json")).write_text("{}")
    return path


def config(**fields) -> SimpleNamespace:
    return SimpleNamespace(**{"hook_retries": 3, "hook_backoff": 0.05, "hook_timeout": 5.0, **fields})


def test_vllm_adapter_is_unloaded_then_loaded_under_a_stable_name_with_retries(server, tmp_path):
    server.fail = 1  # the first load (and unload) answer 500: retried
    v3 = version(tmp_path, 3, adapter=True)
    notifier = Notifier()
    notify_published(config(vllm_url=server.url + "/"), v3, 3, notifier=notifier)
    assert notifier.wait(10)
    loads = [body for path, body in server.requests if path == "/v1/load_lora_adapter"]
    assert loads[-1] == {"lora_name": "recall", "lora_path": str(v3.absolute())}
    assert server.paths()[0] == "/v1/unload_lora_adapter"
    assert notifier.outcomes[-1] | {"time": 0} == {"hook": "vllm", "version": "v0003", "result": "ok",
                                                   "attempts": 3, "error": None, "time": 0}


def test_reload_url_for_full_models_and_vllm_alone_does_nothing(server, tmp_path, caplog):
    v1 = version(tmp_path, 1, adapter=False)
    notifier = Notifier()
    notify_published(config(reload_url=server.url + "/reload", vllm_url=server.url), v1, 1, notifier=notifier)
    assert notifier.wait(10)
    assert server.requests == [("/reload", {"version": "v0001", "number": 1, "path": str(v1.absolute()),
                                            "kind": "full"})]
    assert "vLLM cannot swap full weights" in caplog.text


def test_on_publish_command_gets_the_version_and_is_retried(tmp_path):
    v2 = version(tmp_path, 2, adapter=False)
    seen, count = tmp_path / "seen.txt", tmp_path / "count"
    # Fails the first time (no count file yet), then records its environment.
    command = (f'if [ ! -f {count} ]; then touch {count}; echo "not yet" >&2; exit 3; fi; '
               'echo "$RECALL_VERSION $RECALL_VERSION_NUMBER $RECALL_VERSION_DIR $RECALL_KIND $RECALL_CURRENT" '
               f"> {seen}")
    notifier = Notifier()
    notify_published(config(on_publish=command, deploy_dir=str(tmp_path / "deploy")), v2, 2, notifier=notifier)
    assert notifier.wait(20)
    assert seen.read_text().split() == ["v0002", "2", str(v2.absolute()), "full", str(tmp_path / "deploy" / "current")]
    assert notifier.outcomes[-1]["result"] == "ok" and notifier.outcomes[-1]["attempts"] == 2


def test_failures_never_block_and_give_up_after_the_retries(tmp_path, caplog):
    slow = FakeServer(fail=100, delay=0.5)
    v4 = version(tmp_path, 4, adapter=False)
    notifier = Notifier()
    t0 = time.perf_counter()
    threads = notify_published(config(reload_url=slow.url, hook_retries=1), v4, 4, notifier=notifier)
    assert time.perf_counter() - t0 < 0.3 and len(threads) == 1  # the publish path goes on at once
    assert notifier.wait(10)
    assert notifier.outcomes[-1]["result"] == "failed" and "answered 500" in notifier.outcomes[-1]["error"]
    assert len(slow.requests) == 2 and "giving up" in caplog.text
    slow.httpd.shutdown()
    unreachable = notify_published(config(reload_url=slow.url, hook_retries=0), v4, 4, notifier=notifier)
    assert notifier.wait(10) and unreachable and notifier.outcomes[-1]["result"] == "failed"


def test_a_newer_version_stops_retries_of_an_older_one(tmp_path):
    failing = FakeServer(fail=100)
    ok = FakeServer()
    notifier = Notifier()
    old, new = version(tmp_path, 5, adapter=False), version(tmp_path, 6, adapter=False)
    notify_published(config(reload_url=failing.url, hook_retries=50, hook_backoff=0.2), old, 5, notifier=notifier)
    time.sleep(0.1)
    notify_published(config(reload_url=ok.url), new, 6, notifier=notifier)
    assert notifier.wait(10)
    results = {o["version"]: o["result"] for o in notifier.outcomes}
    assert results == {"v0005": "superseded", "v0006": "ok"} and len(failing.requests) < 5
    failing.httpd.shutdown()
    ok.httpd.shutdown()


def test_no_hooks_configured_is_a_no_op(tmp_path):
    assert notify_published(SimpleNamespace(), version(tmp_path, 1, adapter=True), 1) == []


# ---- Wired into the daemon: config, CLI, publisher, rollback -------------------------------------------------------


@pytest.mark.parametrize("field, value, match", [
    ("vllm_url", "127.0.0.1:8000", "vllm_url must be an http"), ("reload_url", "ftp://x", "reload_url must be"),
    ("on_publish", "  ", "on_publish must be a shell command"), ("vllm_lora_name", "", "vllm_lora_name must be"),
    ("hook_retries", -1, "hook_retries must be an integer >= 0"), ("hook_retries", 1.5, "hook_retries must be"),
    ("hook_backoff", 0.0, "hook_backoff must be a finite"), ("hook_timeout", float("inf"), "hook_timeout must be"),
])
def test_hook_settings_are_validated(tmp_path, field, value, match):
    from recall_daemon.config import DaemonConfig, hook_config

    with pytest.raises(ValueError, match=match):
        DaemonConfig(drop_dir=str(tmp_path / "d"), deploy_dir=str(tmp_path / "p"), **{field: value})
    with pytest.raises(ValueError, match=match):
        hook_config({field: value, "drop_dir": "ignored"})


def test_hook_flags_reach_the_daemon_config(tmp_path):
    from recall_daemon.cli import build_config, build_parser

    args = build_parser().parse_args(["daemon", "--drop", str(tmp_path / "d"), "--deploy", str(tmp_path / "p"),
                                      "--on-publish", "true", "--vllm-url", "http://127.0.0.1:8000",
                                      "--vllm-lora-name", "movies", "--reload-url", "https://example.org/r"])
    config = build_config(args)
    assert (config.on_publish, config.vllm_url, config.vllm_lora_name, config.reload_url) == (
        "true", "http://127.0.0.1:8000", "movies", "https://example.org/r")
    assert (config.hook_retries, config.hook_backoff, config.hook_timeout) == (5, 2.0, 60.0)
    default = build_config(build_parser().parse_args(["daemon", "--drop", "d", "--deploy", "p"]))
    assert default.vllm_lora_name == "recall" and default.on_publish is None


def test_a_real_daemon_once_announces_v0000_each_version_and_a_rollback(tmp_path, tiny_base):
    from daemon_helpers import Deployment

    from recall_daemon import cli

    dep = Deployment(tmp_path, tiny_base)
    seen = tmp_path / "published.txt"
    hook = f'echo "$RECALL_VERSION $RECALL_KIND $RECALL_VERSION_DIR" >> {seen}'
    done = dep.run_subprocess("--base", str(tiny_base), "--on-publish", hook)
    assert done.returncode == 0, done.stderr
    dep.add("alpha", seed=1)
    done = dep.run_subprocess("--on-publish", hook)  # the process waits (bounded) for its hooks before it exits
    assert done.returncode == 0, done.stderr
    versions = dep.store.versions_dir
    assert seen.read_text().splitlines() == [f"v0000 full {versions / 'v0000'}", f"v0001 full {versions / 'v0001'}"]
    hooks = json.loads(dep.store.status_path.read_text())["hooks"]
    assert [(h["hook"], h["version"], h["result"]) for h in hooks] == [("on-publish", "v0001", "ok")]
    assert cli.main(["rollback", "--deploy", str(dep.deploy), "--on-publish", hook]) == 0
    assert dep.store.current() == "v0000" and seen.read_text().splitlines()[-1].startswith("v0000 ")


def test_rollback_reads_the_hooks_from_the_daemon_config_and_warns_when_one_fails(tmp_path, tiny_base, capsys):
    from daemon_helpers import Deployment

    from recall_daemon import cli

    dep = Deployment(tmp_path, tiny_base)
    assert dep.run_once() == 0
    dep.add("alpha", seed=1)
    assert dep.run_once() == 0
    failing = FakeServer(fail=100)
    toml = tmp_path / "daemon.toml"
    toml.write_text(f'drop_dir = "{dep.drop}"\ndeploy_dir = "{dep.deploy}"\nreload_url = "{failing.url}/reload"\n'
                    "hook_retries = 1\nhook_backoff = 0.05\nhook_timeout = 5.0\n")
    assert cli.main(["rollback", "--deploy", str(dep.deploy), "--config", str(toml)]) == 0
    err = capsys.readouterr().err
    assert dep.store.current() == "v0000" and "serving hook reload-url failed for v0000" in err
    assert [b["version"] for _, b in failing.requests] == ["v0000", "v0000"]  # first attempt + 1 retry
    failing.httpd.shutdown()


def test_an_adapter_deployment_loads_each_new_version_into_vllm(tmp_path, tiny_base, server):
    from daemon_helpers import Deployment, make_adapter_drop

    make_adapter_drop(tmp_path, "initial", tiny_base, seed=0, ready=False)
    dep = Deployment(tmp_path, tmp_path / "initial")
    assert dep.run_once(vllm_url=server.url, vllm_lora_name="movies", hook_backoff=0.05) == 0
    make_adapter_drop(dep.drop, "lora-a", tiny_base, seed=1)
    assert dep.run_once(vllm_url=server.url, vllm_lora_name="movies", hook_backoff=0.05) == 0
    loads = [body for path, body in server.requests if path == "/v1/load_lora_adapter"]
    versions = dep.store.versions_dir
    assert loads == [{"lora_name": "movies", "lora_path": str((versions / v).absolute())} for v in ("v0000", "v0001")]
    assert server.paths() == ["/v1/unload_lora_adapter", "/v1/load_lora_adapter"] * 2
