"""A Label Studio server for the tests: ``label-studio start`` from its own virtualenv
(``.ls-venv``, made by ``scripts/label_studio.sh``; ``CIAE_LS_VENV`` names another), on
127.0.0.1 with a free port, its own data dir and SQLite database in a temporary folder, and a
user with a personal access token made for the test.

The token. Label Studio 1.23 turns legacy tokens (``Authorization: Token ...``) off for new
organizations (401 "legacy token authentication has been disabled for this organization"). The
test uses what a user of 1.23 has: a personal access token (a JWT refresh token, which the SDK
trades for short-lived access tokens at ``/api/token/refresh/``). It is made with the server's
own code (``LSAPIToken.for_user``, what ``POST /api/token/`` does for a logged-in user) in the
server's process, before it serves, so no login form or UI is driven.

Start and stop. The first start migrates a new SQLite database (~30 s) and keeps a copy of it,
still empty, beside the virtualenv (``migrated_template``); later starts copy it (~3 s). The
server is started in a new session (``start_new_session``) through a small
boot script that migrates the database, makes the user, organization and token, then runs
``label_studio.server.main`` with ``start --no-browser``; stopping signals exactly that process
group (SIGTERM, then SIGKILL), nothing found by name. The network calls Label Studio makes on
its own (PyPI version check, Sentry, analytics) are switched off by its documented settings.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LS_VENV = Path(os.environ.get("CIAE_LS_VENV", REPO / ".ls-venv"))
START_TIMEOUT_S = 180.0

EMAIL = "ciae-test@localhost"
PASSWORD = "ciae-test-password"   # a throwaway user of a throwaway server

# runs in the server's virtualenv: migrate, make the user, organization and token, then serve
_BOOT = r"""
import json, os, shutil, sys
from label_studio import server

token_file, email, password, host, port, template = sys.argv[1:7]
server._setup_env()
server._apply_database_migrations()
if template and not os.path.exists(template):      # keep the migrated, still empty database
    from django.conf import settings
    from django.db import connections

    connections.close_all()
    try:
        shutil.copyfile(settings.DATABASES["default"]["NAME"], template + f".{os.getpid()}.tmp")
        os.replace(template + f".{os.getpid()}.tmp", template)
    except OSError:
        pass

from jwt_auth.models import LSAPIToken
from organizations.functions import create_organization
from organizations.models import Organization
from users.models import User

user = User.objects.filter(email=email).first()
if user is None:
    user = User.objects.create_user(email=email, password=password)
    user.is_staff = user.is_superuser = True
    user.save()
org = Organization.objects.first() or create_organization(title="ciae tests", created_by=user)
if not org.has_user(user):
    org.add_user(user)
user.active_organization = org
user.save(update_fields=["active_organization"])
token = LSAPIToken.for_user(user).get_full_jwt()
with open(token_file + ".tmp", "w") as f:
    json.dump({"token": token, "organization": org.id}, f)
os.replace(token_file + ".tmp", token_file)

sys.argv = ["label-studio", "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", port,
            "--host", host]
sys.exit(server.main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def label_studio_python() -> Path:
    """The server virtualenv's python, or RuntimeError saying how to make it."""
    python = LS_VENV / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"no Label Studio server at {LS_VENV}: run scripts/label_studio.sh "
                           "(or set CIAE_LS_VENV to a virtualenv with label-studio)")
    return python


def migrated_template() -> Path:
    """Where a migrated, empty database of this Label Studio version is kept (beside its
    virtualenv), copied into each new server's data: migrating one takes ~30 s, starting ~3 s."""
    version = "unknown"
    for d in (LS_VENV / "lib").glob("python*/site-packages/label_studio-*.dist-info"):
        version = d.name[len("label_studio-"):-len(".dist-info")]
    return LS_VENV / f"ciae-migrated-label-studio-{version}.sqlite3"


@dataclass
class LabelStudioServer:
    url: str
    token: str
    root: Path
    proc: subprocess.Popen
    start_seconds: float

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the process group this server was started in (its pid is the group's id)."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start(root: Path, timeout: float = START_TIMEOUT_S) -> LabelStudioServer:
    """Start a server with its data in ``root`` and wait until it answers ``/health`` and the
    token works; RuntimeError (with the server's log) when it does not within ``timeout``."""
    python = label_studio_python()
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token_file = root / "token.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN",
                 "DATABASE_NAME", "DJANGO_DB", "LOG_LEVEL", "DEBUG"):
        env.pop(name, None)         # Label Studio reads these unprefixed names too (get_env)
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(root / "data"),
        "DATABASE_NAME": str(root / "label_studio.sqlite3"),   # DJANGO_DB defaults to SQLite
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    })
    t0 = time.monotonic()
    template = migrated_template()
    if template.exists():
        shutil.copyfile(template, env["DATABASE_NAME"])
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen([str(python), "-c", _BOOT, str(token_file), EMAIL, PASSWORD, url, str(port),
                                 str(template) if os.access(template.parent, os.W_OK) else ""],
                                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = LabelStudioServer(url=url, token="", root=root, proc=proc, start_seconds=0.0)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the Label Studio server exited ({proc.returncode}) before it "
                                   f"served:\n{server.log_tail()}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the Label Studio server did not answer {url}/health in {timeout:.0f} s:"
                                   f"\n{server.log_tail()}")
            if token_file.exists():
                try:
                    status, body = _get(url + "/health", timeout=2.0)
                except OSError:
                    status = 0
                if status == 200:
                    break
            time.sleep(0.25)
        server.token = json.loads(token_file.read_text())["token"]
        server.start_seconds = time.monotonic() - t0
        return server
    except BaseException:
        server.stop()
        raise


if __name__ == "__main__":          # python tests/label_studio_server.py DIR: serve until ^C
    import tempfile

    s = start(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="ciae-ls-")))
    print(f"{s.url}  token {s.token}  ({s.start_seconds:.1f} s to start; log {s.log})", flush=True)
    try:
        s.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        s.stop()
