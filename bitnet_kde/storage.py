"""Where data, checkpoints and reports live: every path is an fsspec URL resolved here.

A plain path or `file://` URL is the local disk (a mounted Colab Drive folder or a synced
iCloud Drive folder is one too); `s3://`, `gs://`, `az://`/`abfs://` and `webdav://` go to
object stores and WebDAV servers, `dropbox://`, `msgd://` (OneDrive / SharePoint) and `box://`
to those services' APIs, each through its fsspec package (optional extras:
`pip install bitnet-kde[s3]` and so on).

Credentials and endpoints are never part of a config. Each backend names the *environment
variables* that hold them (`BACKENDS`; a Hydra `storage` config may rename them); their values
are read from the environment (or `.env`) when a filesystem is created and handed to fsspec
through its in-memory defaults (`fsspec.config.conf`), so Lightning's own checkpoint IO reaches
the same store with the same settings. Nothing here writes a value to disk or to a log; error
messages name variables, never their values.

Writes are atomic: the bytes go to a hidden temporary key next to the target (`.<name>.<uuid>.tmp`)
and are then renamed (local `os.replace`, WebDAV `MOVE`) or copied and deleted (object stores,
whose copy is server-side and all-or-nothing). A reader therefore sees the old object, the new
one, or nothing, never half of one; readers skip names that start with a dot.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import fsspec
import fsspec.asyn
import fsspec.config
import fsspec.exceptions
from omegaconf import OmegaConf

__all__ = [
    "BACKENDS",
    "StorageError",
    "backend_of",
    "check_store",
    "configure",
    "exists",
    "is_local",
    "join",
    "makedirs",
    "open_atomic",
    "open_url",
    "read_json",
    "redact_urls",
    "resolve",
    "setup",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


class StorageError(RuntimeError):
    """The configured store cannot be used; the message names the backend and what to set or install."""


@dataclass(frozen=True)
class Backend:
    """One storage backend: its URL schemes, fsspec package, and the variables it reads.

    `env` maps an option to the environment variable holding it; `required` lists options that
    must be set (`"a|b"`: at least one of them); `secret` options are scrubbed from messages.
    """

    name: str
    protocols: tuple[str, ...]
    module: str | None = None
    extra: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    secret: tuple[str, ...] = ()


BACKENDS: dict[str, Backend] = {
    "local": Backend("local", ("file", "local")),
    "s3": Backend(
        "s3", ("s3", "s3a"), "s3fs", "s3",
        env={"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN",
             "endpoint_url": "S3_ENDPOINT_URL", "region": "AWS_REGION"},
        required=("key", "secret"), secret=("key", "secret", "token")),
    "gcs": Backend(
        "gcs", ("gs", "gcs"), "gcsfs", "gcs",
        env={"token": "GOOGLE_APPLICATION_CREDENTIALS", "project": "GOOGLE_CLOUD_PROJECT",
             "endpoint_url": "STORAGE_EMULATOR_HOST"},
        required=("token",), secret=()),
    "azure": Backend(
        "azure", ("az", "abfs", "abfss"), "adlfs", "azure",
        env={"account_name": "AZURE_STORAGE_ACCOUNT_NAME", "account_key": "AZURE_STORAGE_ACCOUNT_KEY",
             "sas_token": "AZURE_STORAGE_SAS_TOKEN", "connection_string": "AZURE_STORAGE_CONNECTION_STRING"},
        required=("account_name|connection_string", "account_key|sas_token|connection_string"),
        secret=("account_key", "sas_token", "connection_string")),
    "webdav": Backend(
        "webdav", ("webdav",), "webdav4.fsspec", "webdav",
        env={"base_url": "WEBDAV_URL", "username": "WEBDAV_USERNAME", "password": "WEBDAV_PASSWORD"},
        required=("base_url", "username", "password"), secret=("password",)),
    "dropbox": Backend(
        "dropbox", ("dropbox",), "dropboxdrivefs", "dropbox",
        env={"token": "DROPBOX_TOKEN"}, required=("token",), secret=("token",)),
    # OneDrive for Business and SharePoint document libraries through Microsoft Graph, with an
    # app registration's client credentials; the URL is msgd://<site>/<drive>/<path>
    "onedrive": Backend(
        "onedrive", ("msgd",), "msgraphfs", "onedrive",
        env={"client_id": "MSGRAPHFS_CLIENT_ID", "tenant_id": "MSGRAPHFS_TENANT_ID",
             "client_secret": "MSGRAPHFS_CLIENT_SECRET"},
        required=("client_id", "tenant_id", "client_secret"), secret=("client_secret",)),
    # `oauth` is the path of a Box app's JWT configuration file (it holds the private key)
    "box": Backend(
        "box", ("box",), "boxfs", "box",
        env={"oauth": "BOX_JWT_CONFIG_FILE"}, required=("oauth",), secret=()),
}
"""Backends by name, with the default names of the variables each one reads."""

log = logging.getLogger(__name__)

_PROTOCOL_BACKEND = {p: b for b in BACKENDS.values() for p in b.protocols}
_env_names: dict[str, dict[str, str]] = {}      # backend -> option -> variable (renamed by a storage config)
_required: dict[str, tuple[str, ...]] = {}      # backend -> required options (overridden by a storage config)
_extra_options: dict[str, dict[str, Any]] = {}  # backend -> non-secret fsspec options from the config


# -- URLs -------------------------------------------------------------------------------------
def protocol_of(url: str | os.PathLike) -> str:
    s = os.fspath(url)
    return s.split("://", 1)[0].lower() if "://" in s else "file"


def backend_of(url: str | os.PathLike) -> Backend:
    """The backend serving `url` (a plain path is local)."""
    proto = protocol_of(url)
    if proto not in _PROTOCOL_BACKEND:
        known = ", ".join(sorted(p + "://" for p in _PROTOCOL_BACKEND))
        raise StorageError(f"{url}: unsupported storage protocol {proto!r}; use a local path or one of {known}")
    return _PROTOCOL_BACKEND[proto]


def is_local(url: str | os.PathLike) -> bool:
    return backend_of(url).name == "local"


def local_path(url: str | os.PathLike) -> str:
    """`file://x` -> `x`; a plain path unchanged."""
    s = os.fspath(url)
    for prefix in ("file://", "local://"):
        if s.startswith(prefix):
            return s[len(prefix):]
    return s


def join(base: str | os.PathLike, *parts: str) -> str | Path:
    """`base/part/...`: a `Path` for local folders, a URL string otherwise."""
    if is_local(base):
        return Path(local_path(base)).joinpath(*parts)
    return "/".join([os.fspath(base).rstrip("/"), *(p.strip("/") for p in parts)])


def name_of(url: str | os.PathLike) -> str:
    return os.fspath(url).rstrip("/").rsplit("/", 1)[-1]


# -- credentials from the environment ---------------------------------------------------------
def variables(backend: Backend | str) -> dict[str, str]:
    """option -> environment variable name, for `backend` as currently configured."""
    b = BACKENDS[backend] if isinstance(backend, str) else backend
    return {**b.env, **_env_names.get(b.name, {})}


def required_options(backend: Backend | str) -> tuple[str, ...]:
    b = BACKENDS[backend] if isinstance(backend, str) else backend
    return _required.get(b.name, b.required)


def _env_values(b: Backend) -> dict[str, str]:
    out = {}
    for opt, var in variables(b).items():
        value = os.environ.get(var, "").strip() if var else ""
        if value:
            out[opt] = value
    return out


def missing_variables(backend: Backend | str) -> list[str]:
    """Descriptions of required variables that are unset, e.g. `AWS_SECRET_ACCESS_KEY`."""
    b = BACKENDS[backend] if isinstance(backend, str) else backend
    values, names = _env_values(b), variables(b)
    missing = []
    for req in required_options(b):
        alternatives = req.split("|")
        if not any(a in values for a in alternatives):
            missing.append(" or ".join(names.get(a, a) for a in alternatives))
    return missing


def _fs_options(b: Backend, values: Mapping[str, str]) -> dict[str, Any]:
    """fsspec constructor arguments for backend `b` from the variables' values."""
    opts: dict[str, Any] = dict(_extra_options.get(b.name, {}))
    if b.name == "s3":
        for k in ("key", "secret", "token", "endpoint_url"):
            if k in values:
                opts[k] = values[k]
        # us-east-1 is the default and must not be sent as a bucket LocationConstraint
        if values.get("region", "us-east-1") != "us-east-1":
            opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "region_name": values["region"]}
    elif b.name == "gcs":
        opts.update({k: values[k] for k in ("token", "project", "endpoint_url") if k in values})
    elif b.name in ("azure", "dropbox", "onedrive", "box"):
        opts.update({k: values[k] for k in b.env if k in values})
    elif b.name == "webdav":
        if "base_url" in values:
            opts["base_url"] = values["base_url"]
        if "username" in values:
            opts["auth"] = (values["username"], values.get("password", ""))
    return opts


def _apply(b: Backend) -> None:
    """Put backend `b`'s options (from the environment, now) into fsspec's in-memory defaults."""
    if b.name == "local":
        return
    opts = _fs_options(b, _env_values(b))
    for proto in b.protocols:
        fsspec.config.conf[proto] = dict(opts)
    if b.name == "gcs" and "endpoint_url" in opts:
        # gcsfs's default class first asks each bucket's type (zonal, hierarchical) over gRPC,
        # which an HTTP-only endpoint such as an emulator never answers (60 s per bucket); the
        # plain class speaks only the JSON API, all such an endpoint serves.
        for proto in b.protocols:
            fsspec.register_implementation(proto, "gcsfs.core.GCSFileSystem", clobber=True)


_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s?#@]*(?:@[^/\s?#@]*)*@")
"""`scheme://user:password@` (greedy up to the authority's last `@`: a password may hold one)."""


def redact_urls(text: str) -> str:
    """`text` with the `user:password@` part of every URL in it replaced by `***@`.

    Credentials written into a URL (`http://user:secret@host/v1`) are meant for the connection;
    anything recorded or logged about that URL must show only where it points.
    """
    return _URL_USERINFO.sub(r"\g<scheme>***@", str(text))


def scrub(text: str) -> str:
    """`text` with every configured credential value, and every URL's userinfo, replaced by `***`."""
    for b in BACKENDS.values():
        for opt, value in _env_values(b).items():
            if opt in b.secret and len(value) >= 4:
                text = text.replace(value, "***")
    return redact_urls(text)


def _import_backend(b: Backend) -> None:
    if b.module is None:
        return
    try:
        importlib.import_module(b.module)
    except ImportError as e:
        raise StorageError(
            f"storage backend '{b.name}' needs the package {b.module.split('.')[0]!r}, which is not installed: "
            f"pip install 'bitnet-kde[{b.extra}]' (or pip install {b.module.split('.')[0]})") from e


def _check_variables(b: Backend, url: str) -> None:
    missing = missing_variables(b)
    if missing:
        raise StorageError(
            f"storage backend '{b.name}' ({url}): missing environment variable(s): {', '.join(missing)}. "
            "Set them in .env or the environment (see .env.example and docs/STORAGE.md).")
    values = _env_values(b)
    token = values.get("token")
    if b.name == "gcs" and token and token not in ("google_default", "cloud", "anon") and not Path(token).is_file():
        raise StorageError(f"storage backend 'gcs' ({url}): {variables(b)['token']} names a file that does not "
                           "exist; point it to your service-account JSON key file")
    if b.name == "box" and "oauth" in values and not Path(values["oauth"]).is_file():
        raise StorageError(f"storage backend 'box' ({url}): {variables(b)['oauth']} names a file that does not "
                           "exist; point it to the JWT configuration file of your Box app")


# -- resolving and file operations ------------------------------------------------------------
def resolve(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `url`, with the backend's settings from the environment.

    Raises `StorageError` naming the backend and the pip extra or variable when it cannot work.
    """
    s = os.fspath(url)
    b = backend_of(s)
    if b.name == "local":
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(local_path(s)))
    _import_backend(b)
    _check_variables(b, s)
    _apply(b)
    fs, path = fsspec.core.url_to_fs(s)
    return fs, path


def exists(url: str | os.PathLike) -> bool:
    fs, path = resolve(url)
    return fs.exists(path)


def makedirs(url: str | os.PathLike) -> None:
    """Create the folder `url` and its parents (object stores: the bucket if needed)."""
    fs, path = resolve(url)
    if backend_of(url).name in ("gcs", "azure"):
        # gcsfs's and adlfs's makedirs do nothing (these stores have no folders): create the
        # bucket / container itself
        bucket = path.split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    else:
        fs.makedirs(path, exist_ok=True)


def open_url(url: str | os.PathLike, mode: str = "rb", **kwargs):
    """Open `url` like `open()` (text modes too). For writing prefer the atomic helpers."""
    fs, path = resolve(url)
    if "w" in mode and is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode, **kwargs)


def read_json(url: str | os.PathLike) -> Any:
    with open_url(url, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def _rename(fs, src: str, dst: str) -> None:
    if getattr(fs, "protocol", None) in ("webdav", ("webdav", "dav")) and hasattr(fs, "client"):
        fs.client.move(src, dst, overwrite=True)  # a WebDAV MOVE: one rename on the server
    else:
        # object stores: a server-side copy (all-or-nothing), then delete. Spelled out rather than
        # `mv` because gcsfs's mv first tries GCS's newer moveTo call and, where an endpoint lacks
        # it, retries it with back-off for ~30 s before copying anyway.
        fs.copy(src, dst)
        fs.rm_file(src)


@contextlib.contextmanager
def open_atomic(url: str | os.PathLike) -> Iterator[BinaryIO]:
    """`with open_atomic(url) as f: f.write(...)`: the bytes appear under `url` only when the block
    ends without an exception; readers see the old content, the new content, or nothing.

    The file is written to a hidden temporary name next to the target (`.<name>.<uuid>.tmp`), then
    renamed into place (local `os.replace`, WebDAV `MOVE`) or copied and deleted (object stores).
    On an exception the temporary file is removed; a killed writer leaves only a hidden name,
    which every reader skips.
    """
    fs, path = resolve(url)
    parent, name = path.rstrip("/").rsplit("/", 1) if "/" in path else ("", path)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    if is_local(url):
        os.makedirs(parent or ".", exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        _rename(fs, tmp, path)
    finally:
        try:
            if fs.exists(tmp):
                fs.rm_file(tmp)
        except Exception:  # noqa: BLE001 - a stale hidden temp key is ignored by every reader
            pass


def write_bytes_atomic(url: str | os.PathLike, data: bytes) -> str | Path:
    """Write `data` to `url` atomically (see `open_atomic`); returns `url` (a `Path` when local)."""
    with open_atomic(url) as f:
        f.write(data)
    return Path(local_path(url)) if is_local(url) else os.fspath(url)


def write_text_atomic(url: str | os.PathLike, text: str) -> str | Path:
    return write_bytes_atomic(url, text.encode("utf-8"))


def write_json_atomic(url: str | os.PathLike, obj: Any, *, indent: int = 2) -> str | Path:
    """Write `obj` as JSON (UTF-8, `ensure_ascii=False`) to `url`, atomically."""
    return write_text_atomic(url, json.dumps(obj, indent=indent, ensure_ascii=False))


# -- configuration from Hydra and store checks ------------------------------------------------
def configure(storage_cfg: Mapping | None) -> Backend:
    """Take variable names and non-secret options from a Hydra `storage` config node.

    The node has `backend` (a key of `BACKENDS`), optionally `env` (option -> variable name),
    `required` (options that must be set) and `options` (non-secret fsspec arguments). Values of
    variables are never read into the config.
    """
    if storage_cfg is None:
        return BACKENDS["local"]
    cfg = OmegaConf.to_container(storage_cfg, resolve=True) if OmegaConf.is_config(storage_cfg) else dict(storage_cfg)
    name = cfg.get("backend", "local")
    if name not in BACKENDS:
        raise StorageError(f"storage.backend={name!r} is not one of {sorted(BACKENDS)}")
    b = BACKENDS[name]
    if cfg.get("env"):
        unknown = set(cfg["env"]) - set(b.env)
        if unknown:
            raise StorageError(f"storage backend '{name}': unknown option(s) in storage.env: {sorted(unknown)}; "
                               f"known: {sorted(b.env)}")
        _env_names[name] = {k: str(v) for k, v in cfg["env"].items() if v}
    if cfg.get("required") is not None:
        _required[name] = tuple(cfg["required"])
    if cfg.get("options"):
        _extra_options[name] = dict(cfg["options"])
    return b


def check_store(url: str | os.PathLike, *, timeout_s: float = 10.0) -> str:
    """Check that the store behind `url` can be used: package, variables, then a real request.

    Returns a one-line description; raises `StorageError` naming the backend and the variable,
    extra or endpoint to fix. Local paths: the folder that would be written must be writable (an
    existing file's folder, since files are replaced through a temporary file beside them, else
    the nearest existing parent).
    """
    s = os.fspath(url)
    b = backend_of(s)
    if b.name == "local":
        p = Path(os.path.expanduser(local_path(s))).absolute()
        parent = next(q for q in (p, *p.parents) if q.exists() and not q.is_file())
        if not os.access(parent, os.W_OK):
            raise StorageError(f"storage backend 'local': {parent} is not writable (needed for {s})")
        kind = "folder" if p.is_dir() else "file" if p.is_file() else "path, to be created,"
        return f"local {kind} {p} (writable)"
    _import_backend(b)
    _check_variables(b, s)
    _apply(b)
    values = _env_values(b)
    opts = {**_fs_options(b, values), "skip_instance_cache": True}
    fs_cls = fsspec.get_filesystem_class(protocol_of(s))
    endpoint = values.get("endpoint_url") or values.get("base_url") or "default endpoint"
    if b.name == "s3":
        opts["config_kwargs"] = {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                 "retries": {"max_attempts": 1}}
    elif b.name == "webdav":
        opts["timeout"] = timeout_s
        opts["retry"] = False
    if b.name == "azure":
        endpoint = _azure_endpoint(values) or endpoint
    path = fs_cls._strip_protocol(s)
    top = path.split("/", 1)[0]
    try:
        fs = fs_cls(**opts)
        if b.name in ("gcs", "azure"):
            # their clients retry a refused connection with back-off for a minute or more and
            # take no setting for it: bound the whole request instead
            fsspec.asyn.sync(fs.loop, fs._ls, top, timeout=timeout_s)
        elif b.name == "s3":
            fs.ls(top)  # the bucket / container: credentials and endpoint must both work
        else:
            fs.ls("")
    except fsspec.exceptions.FSTimeoutError:
        names = variables(b)
        settings = names.get("endpoint_url") or ", ".join(names.values())
        raise StorageError(f"storage backend '{b.name}': cannot use {s} at {endpoint}: no answer within "
                           f"{timeout_s:.0f} s; check {settings} (the endpoint), the network and the credentials"
                           ) from None
    except FileNotFoundError:
        raise StorageError(f"storage backend '{b.name}' at {endpoint}: bucket or folder {top!r} does not exist "
                           f"({s}); create it (make ensure_dirs) or fix the URL") from None
    except Exception as e:  # noqa: BLE001 - every transport/auth failure becomes one clear message
        names = variables(b)
        creds = ", ".join(v for k, v in names.items() if k not in ("endpoint_url", "base_url", "region", "project"))
        where = names.get("endpoint_url") or names.get("base_url")
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, PermissionError) or status in (401, 403):
            hint = f"the store refused the credentials: check {creds}"
        else:
            hint = f"check {where + ' (the endpoint), ' if where else ''}the network, and {creds}"
        raise StorageError(scrub(
            f"storage backend '{b.name}': cannot use {s} at {endpoint}: {type(e).__name__}: {e}; {hint}")) from None
    return f"{b.name} store {s} at {endpoint} (reachable)"


def _azure_endpoint(values: Mapping[str, str]) -> str | None:
    """The blob endpoint an Azure configuration points to (never a key): a connection string's
    `BlobEndpoint`, else the account's public endpoint."""
    conn = dict(part.split("=", 1) for part in values.get("connection_string", "").split(";") if "=" in part)
    if "BlobEndpoint" in conn:
        return conn["BlobEndpoint"]
    name = conn.get("AccountName") or values.get("account_name")
    return f"https://{name}.blob.core.windows.net" if name else None


def _colab_drive(cfg: Mapping) -> None:
    """Mount Google Drive when asked (`AUTO_MOUNT_GDRIVE`) and running in Colab; else check it is mounted."""
    mount = str(cfg.get("mount_point") or "/content/drive")
    var = cfg.get("auto_mount_env") or "AUTO_MOUNT_GDRIVE"
    if os.path.isdir(os.path.join(mount, "MyDrive")):
        return
    wanted = os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from google.colab import drive  # type: ignore[import-not-found]
    except ImportError:
        drive = None
    if wanted and drive is not None:
        drive.mount(mount)
        return
    how = (f"set {var}=1 to mount it on start" if drive is not None
           else "storage=colab_drive needs Google Colab (elsewhere use storage=local with paths.root=<folder>)")
    raise StorageError(f"storage backend 'colab_drive': Google Drive is not mounted at {mount}; {how}")


def setup(cfg: Mapping, *urls: str | os.PathLike | None, exit_on_error: bool = False) -> list[str]:
    """What every entry point calls before any work: configure the store and check it.

    Reads `cfg.storage` (variable names, options), mounts Colab Drive if asked, and checks each
    distinct store among `cfg.paths.root` and `urls` (package, variables, reachability). Returns
    one line per store; raises `StorageError` with the backend and variable to fix, or with
    `exit_on_error` exits the program with that message (what the entry points use).
    """
    try:
        lines = _setup(cfg, urls)
    except StorageError as e:
        if exit_on_error:
            raise SystemExit(f"error: {scrub(str(e))}") from None
        raise
    for line in lines:
        log.info("storage: %s", scrub(line))
    return lines


_BUCKET_SETTING = {
    "s3": "S3_BUCKET in .env (or storage.bucket=...)",
    "gcs": "GCS_BUCKET in .env (or storage.bucket=...)",
    "azure": "AZURE_STORAGE_CONTAINER in .env (or storage.container=...)",
    "onedrive": "MSGRAPHFS_SITE in .env (or storage.site=...)",
}
"""Where each backend's default config reads its bucket or container from (configs/storage/)."""


def bucket_problem(url: str | os.PathLike) -> str | None:
    """What to set when a remote URL has no bucket/container (e.g. `s3://None/...`), else None."""
    url = os.fspath(url)
    b = backend_of(url)
    if b.name == "local" or url.split("://", 1)[1].split("/", 1)[0] not in ("", "None", "null"):
        return None
    return (f"no bucket/container in {url}: set {_BUCKET_SETTING.get(b.name, 'storage.bucket')} "
            "or paths.root=<url>")


def _setup(cfg: Mapping, urls) -> list[str]:
    storage_cfg = cfg.get("storage") if hasattr(cfg, "get") else None
    configure(storage_cfg)
    if storage_cfg is not None and storage_cfg.get("name") == "colab_drive":
        _colab_drive(storage_cfg)
    paths = cfg.get("paths") or {}
    candidates = [paths.get("root"), *urls]
    seen, lines = set(), []
    for url in candidates:
        if url is None or str(url) in ("", "None"):
            continue
        url = os.fspath(url)
        b = backend_of(url)
        problem = bucket_problem(url)
        if problem:
            raise StorageError(f"storage backend '{b.name}': {problem}")
        key = (b.name, url.split("://", 1)[-1].split("/", 1)[0] if b.name != "local" else url)
        if key in seen:
            continue
        seen.add(key)
        lines.append(check_store(url))
    return lines


# -- Hydra resolvers (configs/paths) ----------------------------------------------------------
def _local_dir(root: str) -> str:
    """`root` when it is a local folder, else "." (logs and `.hydra/` always stay on local disk)."""
    return local_path(root) if is_local(root) else "."


def _run_dir_on_store(root: str, log_dir: str, output_dir: str) -> str:
    """The run's folder for checkpoints: the local run folder, or the same layout under a remote root."""
    if is_local(root):
        return output_dir
    rel = os.path.relpath(os.path.abspath(output_dir), os.path.abspath(log_dir))
    if rel.startswith(".."):
        rel = os.path.basename(output_dir.rstrip("/"))
    return "/".join([root.rstrip("/"), rel.replace(os.sep, "/")])


def register_resolvers() -> None:
    """Register `local_dir` and `run_dir_on_store`, which configs/paths uses (idempotent)."""
    OmegaConf.register_new_resolver("local_dir", _local_dir, replace=True)
    OmegaConf.register_new_resolver("run_dir_on_store", _run_dir_on_store, replace=True)


# At import, not only in the entry points' start-up: a launcher such as submitit unpickles the
# task in a fresh worker process and resolves the config there, after importing this module.
register_resolvers()
