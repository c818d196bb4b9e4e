"""Real storage servers on 127.0.0.1 for the storage tests: S3 (moto) and WebDAV (wsgidav + cheroot).

Both speak their protocol over HTTP exactly as a remote store would; nothing is mocked inside
the client libraries. Each context manager yields what a user would put in `.env`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

S3_KEY_ID = "AKIATESTSTORAGE0001"


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
