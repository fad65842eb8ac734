"""W&B without a network: with an API key but no route to the server (or a server that refuses the
key), start-up takes a few seconds, warns in one line naming `wandb sync`, and the run logs offline;
`logger.wandb.require_online=true` fails in one line instead. No test leaves 127.0.0.1."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from ldm.utils import instantiate as inst
from ldm.utils import wandb_offline
from ldm.utils.errors import UserError
from ldm.utils.wandb_offline import probe_server
from tests.conftest import compose_config
from tests.train_cli import FAST, explain, train_cli

FAKE_KEY = "f" * 40


def closed_port() -> int:
    """A local port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Refusing(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(401)
        self.end_headers()
        self.wfile.write(b'{"errors": [{"message": "user is not logged in"}]}')

    def log_message(self, *args):
        pass


class Silent(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        time.sleep(30)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """Start a local HTTP server with a handler class; yields its base URL."""
    servers = []

    def start(handler) -> str:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def no_network_wandb(monkeypatch):
    """A W&B key in the environment and WANDB_BASE_URL at a closed local port."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(wandb_offline, "_PROBED", {})
    monkeypatch.setattr(inst, "_WARNED", set())


def test_probe_names_what_is_wrong_within_the_timeout(server):
    started = time.monotonic()
    reason = probe_server(f"http://127.0.0.1:{closed_port()}", FAKE_KEY, timeout=3)
    assert reason.startswith("cannot reach http://127.0.0.1:") and time.monotonic() - started < 3
    assert probe_server(server(Refusing), FAKE_KEY, 3).endswith("refused the API key (HTTP 401)")
    started = time.monotonic()
    assert probe_server(server(Silent), FAKE_KEY, 1).startswith("no answer from")
    assert time.monotonic() - started < 5


def test_unreachable_server_means_offline_logging_with_one_warning(
    no_network_wandb, tmp_path, caplog
):
    cfg = compose_config(["logger=wandb", "logger.wandb.init_timeout=2"], tmp_path)
    started = time.monotonic()
    (logger,) = inst.instantiate_loggers(cfg.logger, name="n", group="g")
    again = inst.instantiate_loggers(cfg.logger, name="n", group="g")  # stage 2: asked once
    assert time.monotonic() - started < 4
    assert logger._offline and again[0]._offline
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("W&B: cannot reach http://127.0.0.1:")
    assert f"wandb sync {tmp_path / 'run'}/wandb/offline-run-*" in warnings[0]


def test_require_online_without_credentials_fails_instead_of_going_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(inst, "wandb_logged_in", lambda: False)
    cfg = compose_config(["logger=wandb"], tmp_path)
    assert inst.wandb_offline(cfg.logger.wandb)  # without require_online: offline, as before
    cfg = compose_config(["logger=wandb", "logger.wandb.require_online=true"], tmp_path)
    with pytest.raises(UserError, match="require_online=true but no W&B credentials") as err:
        inst.wandb_offline(cfg.logger.wandb)
    assert "\n" not in str(err.value)


def test_require_online_fails_in_one_line(no_network_wandb, tmp_path, server, monkeypatch):
    cfg = compose_config(["logger=wandb", "logger.wandb.require_online=true"], tmp_path)
    with pytest.raises(UserError, match="require_online=true but W&B is not usable: cannot reach"):
        inst.instantiate_loggers(cfg.logger, name="n", group="g")
    # a server that answers with an error (a bad key) is the same
    monkeypatch.setenv("WANDB_BASE_URL", server(Refusing))
    with pytest.raises(UserError, match=r"refused the API key \(HTTP 401\)") as err:
        inst.instantiate_loggers(cfg.logger, name="n", group="g")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_train_without_a_route_to_wandb_trains_offline(tmp_path):
    """Before: about 2 minutes of retries, then a traceback before training."""
    env = {
        "WANDB_API_KEY": FAKE_KEY,
        "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}",
        "WANDB_MODE": None,
    }
    run_dir = tmp_path / "run"
    args = [o for o in FAST if not o.startswith("logger=")]
    started = time.monotonic()
    refused = train_cli(
        *args, "logger=wandb", "logger.wandb.require_online=true", cwd=tmp_path, env=env
    )
    refused_seconds = time.monotonic() - started
    result = train_cli(
        *args,
        "logger=wandb",
        "stage=autoencoder",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env=env,
    )
    assert refused.returncode == 2, explain(refused)
    (line,) = refused.stderr.strip().splitlines()
    assert "require_online=true but W&B is not usable: cannot reach" in line
    assert refused_seconds < 60
    assert result.returncode == 0, explain(result)
    log = (run_dir / "train.log").read_text()
    assert log.count("logging offline instead (upload later: wandb sync") == 1
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run_dir / "checkpoints" / "autoencoder" / "last.ckpt").is_file()
