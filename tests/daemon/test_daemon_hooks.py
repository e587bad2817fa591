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
