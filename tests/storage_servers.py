"""Real servers on 127.0.0.1 for the storage and run-record tests: S3 and DynamoDB (moto),
WebDAV (wsgidav + cheroot), GCS (gcp-storage-emulator), Azure Blob (Azurite) and PostgreSQL.

Each speaks its protocol over the network exactly as the remote service would; nothing is
mocked inside the client libraries. Each context manager yields what a user would put in
`.env`. `*_binary()` says where an external server program is, or why it is missing (the
tests skip with that reason, or fail under CI, which installs both programs).
"""

from __future__ import annotations

import base64
import contextlib
import glob
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

S3_KEY_ID = "AKIATESTSTORAGE0001"
AZURITE_VERSION = "3.35.0"


def unavailable(why: str) -> None:
    """Skip a test whose server program is not installed, saying what to install; fail instead
    under CI (`CI` set, as `.ci/run` runs), which installs every one of them."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must have it")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """An S3-compatible endpoint (moto's server) on a free port; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def webdav_server(root: Path, user: str, password: str) -> Iterator[str]:
    """A WebDAV server (wsgidav on cheroot) serving `root` with HTTP basic auth; yields its base URL."""
    from cheroot import wsgi
    from wsgidav.wsgidav_app import WsgiDAVApp

    config = {
        "host": "127.0.0.1", "port": 0, "provider_mapping": {"/": str(root)},
        "simple_dc": {"user_mapping": {"*": {user: {"password": password}}}},
        "http_authenticator": {"accept_basic": True, "accept_digest": False, "default_to_digest": False},
        "verbose": 0, "logging": {"enable": False}, "lock_storage": True,
    }
    logging.getLogger("wsgidav").setLevel(logging.WARNING)
    server = wsgi.Server(("127.0.0.1", 0), WsgiDAVApp(config), numthreads=4)
    server.prepare()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.bind_addr[1]}"
    finally:
        server.stop()
        thread.join(timeout=10)


@contextlib.contextmanager
def gcs_emulator() -> Iterator[str]:
    """A GCS JSON-API endpoint (gcp-storage-emulator, in memory) on a free port; yields its URL."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    try:
        # the emulator binds port 0 itself and keeps the socket on its API thread
        yield f"http://127.0.0.1:{server._api._httpd.socket.getsockname()[1]}"
    finally:
        server.stop()


def azurite_binary() -> tuple[str | None, str]:
    """(path of `azurite-blob`, "") or (None, why it is missing)."""
    for candidate in (Path(sys.prefix) / "node" / "node_modules" / ".bin" / "azurite-blob",
                      shutil.which("azurite-blob")):
        if candidate and Path(candidate).is_file() and shutil.which("node"):
            return str(candidate), ""
    return None, (f"Azurite is not installed: npm install --prefix {Path(sys.prefix) / 'node'} azurite@{AZURITE_VERSION} "
                  "(needs Node.js; .ci/run does this)")


@contextlib.contextmanager
def azurite(root: Path, account: str = "bitnetkde") -> Iterator[str]:
    """Azurite's blob service with one account and a fresh random key, storing under `root`;
    yields the account's connection string (what AZURE_STORAGE_CONNECTION_STRING holds)."""
    binary, why = azurite_binary()
    if binary is None:
        raise RuntimeError(why)
    key = base64.b64encode(os.urandom(32)).decode()
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(root), "--silent",
         "--skipApiVersionCheck", "--disableTelemetry"],
        env={**os.environ, "AZURITE_ACCOUNTS": f"{account}:{key}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc, "azurite-blob")
        yield (f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={key};"
               f"BlobEndpoint=http://127.0.0.1:{port}/{account};")
    finally:
        stop(proc)


def postgres_binaries() -> tuple[str | None, str]:
    """(folder holding initdb/pg_ctl/postgres, "") or (None, why they are missing)."""
    folders = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        folders.append(out.stdout.strip())
    folders += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in folders:
        if all(os.access(os.path.join(folder, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return folder, ""
    return None, "PostgreSQL is not installed: apt-get install postgresql (.ci/run does this)"


@contextlib.contextmanager
def postgres_server(password: str) -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (TCP only, password authentication);
    yields its URL `postgresql://bitnet:<password>@127.0.0.1:<port>/bitnet`.

    PostgreSQL refuses to run as root: as root the cluster runs as the `postgres` system user
    that Debian's package creates.
    """
    bindir, why = postgres_binaries()
    if bindir is None:
        raise RuntimeError(why)
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="bitnet-kde-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data, "postgres")
    pwfile = data / "pw"
    pwfile.write_text(password)
    if as_user:
        shutil.chown(pwfile, "postgres")
    cluster, port = data / "cluster", free_port()
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", str(cluster), "-U", "bitnet", "--pwfile", str(pwfile),
                    "-A", "scram-sha-256", "--no-sync"], check=True, capture_output=True)
    start = [*as_user, f"{bindir}/pg_ctl", "-D", str(cluster), "-w", "-l", str(data / "log"), "-o",
             f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off", "start"]
    subprocess.run(start, check=True, capture_output=True)
    try:
        subprocess.run([*as_user, f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "bitnet", "bitnet"],
                       check=True, capture_output=True, env={**os.environ, "PGPASSWORD": password})
        yield f"postgresql://bitnet:{password}@127.0.0.1:{port}/bitnet"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(cluster), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
