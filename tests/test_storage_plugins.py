"""Dropbox, OneDrive / SharePoint and Box through their fsspec plugins, as far as a machine
without those services allows: the configs compose, `check_env` lists the variables, a missing
variable or plugin is one clear message, and URLs resolve to the plugin's filesystem with the
credentials from the environment. Nothing here talks to the live services."""

from __future__ import annotations

import sys
import uuid

import fsspec
import pytest

from bitnet_kde import env, storage

PLUGINS = {
    # backend: (package, config root, variables -> test values)
    "dropbox": ("dropboxdrivefs", "dropbox://bitnet-kde", {"DROPBOX_TOKEN": f"sl.dbx-{uuid.uuid4().hex}"}),
    "onedrive": ("msgraphfs", "msgd://Team/Documents/bitnet-kde",
                 {"MSGRAPHFS_CLIENT_ID": "client-1", "MSGRAPHFS_TENANT_ID": "tenant-1",
                  "MSGRAPHFS_CLIENT_SECRET": f"graph-{uuid.uuid4().hex}", "MSGRAPHFS_SITE": "Team"}),
    "box": ("boxfs", "box://bitnet-kde", {"BOX_JWT_CONFIG_FILE": "<file>"}),
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for _, _, variables in PLUGINS.values():
        for var in variables:
            monkeypatch.delenv(var, raising=False)
    yield
    storage._env_names.clear()
    storage._required.clear()
    storage._extra_options.clear()


def set_variables(backend: str, monkeypatch, tmp_path) -> dict[str, str]:
    values = dict(PLUGINS[backend][2])
    if backend == "box":
        values["BOX_JWT_CONFIG_FILE"] = str(tmp_path / "box_config.json")
        (tmp_path / "box_config.json").write_text("{}")
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


@pytest.mark.parametrize("backend", sorted(PLUGINS))
def test_config_composes_and_check_env_lists_the_missing_variables(backend, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if backend == "onedrive":
        monkeypatch.setenv("MSGRAPHFS_SITE", "Team")
    cfg = env.compose_config([f"storage={backend}"])
    assert str(cfg.paths.root) == PLUGINS[backend][1]
    assert str(cfg.paths.data_dir) == PLUGINS[backend][1] + "/data"
    lines, problems = env.storage_lines(cfg)
    variables = [v for v in PLUGINS[backend][2] if v != "MSGRAPHFS_SITE"]
    for var in variables:
        assert any(line.split()[:2] == [var, "not"] for line in lines), lines
    assert problems == [f"storage {backend}: {var} is not set" for var in variables]


def test_onedrive_without_a_site_says_which_variable_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MSGRAPHFS_SITE", raising=False)
    cfg = env.compose_config(["storage=onedrive"])
    assert storage.bucket_problem(cfg.paths.root) == (
        "no bucket/container in msgd://None/Documents/bitnet-kde: set MSGRAPHFS_SITE in .env (or storage.site=...) "
        "or paths.root=<url>")


@pytest.mark.parametrize("backend", sorted(PLUGINS))
def test_missing_variable_and_missing_plugin_are_one_clear_message(backend, tmp_path, monkeypatch):
    package, root, _ = PLUGINS[backend]
    with pytest.raises(storage.StorageError, match=f"'{backend}'.*missing environment variable") as e:
        storage.resolve(root + "/data")
    assert all(v in str(e.value) for v in PLUGINS[backend][2] if v != "MSGRAPHFS_SITE")
    values = set_variables(backend, monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, package, None)  # as if the extra were not installed
    with pytest.raises(storage.StorageError) as e:
        storage.resolve(root + "/data")
    assert f"needs the package '{package}'" in str(e.value)
    assert f"pip install 'bitnet-kde[{backend}]'" in str(e.value)
    assert not any(v in str(e.value) for v in values.values())


def test_box_config_file_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("BOX_JWT_CONFIG_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(storage.StorageError, match="'box'.*BOX_JWT_CONFIG_FILE names a file that does not exist"):
        storage.resolve("box://bitnet-kde")


def test_dropbox_and_onedrive_urls_resolve_to_the_plugin_with_the_credentials(monkeypatch, tmp_path):
    """Constructing these filesystems makes no request: the URL, class and credentials are checked offline."""
    DropboxDriveFileSystem = pytest.importorskip("dropboxdrivefs").DropboxDriveFileSystem
    MSGDriveFS = pytest.importorskip("msgraphfs").MSGDriveFS

    values = set_variables("dropbox", monkeypatch, tmp_path)
    fs, path = storage.resolve("dropbox://bitnet-kde/data/kd-1.parquet")
    assert isinstance(fs, DropboxDriveFileSystem) and path == "bitnet-kde/data/kd-1.parquet"
    assert fs.dbx._oauth2_access_token == values["DROPBOX_TOKEN"]

    values = set_variables("onedrive", monkeypatch, tmp_path)
    fs, path = storage.resolve("msgd://Team/Documents/bitnet-kde/reports/evaluation.json")
    assert isinstance(fs, MSGDriveFS) and path == "Team/Documents/bitnet-kde/reports/evaluation.json"
    assert (fs.client_id, fs.tenant_id, fs.client_secret) == (
        values["MSGRAPHFS_CLIENT_ID"], values["MSGRAPHFS_TENANT_ID"], values["MSGRAPHFS_CLIENT_SECRET"])


def test_box_url_goes_to_boxfs_with_the_config_file(monkeypatch, tmp_path):
    """boxfs signs in when it is constructed (a request to Box), so only the class and options are checked."""
    BoxFileSystem = pytest.importorskip("boxfs").BoxFileSystem

    values = set_variables("box", monkeypatch, tmp_path)
    assert storage.backend_of("box://bitnet-kde").name == "box"
    assert fsspec.get_filesystem_class("box") is BoxFileSystem
    storage._import_backend(storage.BACKENDS["box"])
    assert storage._fs_options(storage.BACKENDS["box"], storage._env_values(storage.BACKENDS["box"])) == {
        "oauth": values["BOX_JWT_CONFIG_FILE"]}


def test_plugin_secrets_are_scrubbed_from_messages(monkeypatch, tmp_path):
    values = {**set_variables("dropbox", monkeypatch, tmp_path), **set_variables("onedrive", monkeypatch, tmp_path)}
    text = f"failed with {values['DROPBOX_TOKEN']} and {values['MSGRAPHFS_CLIENT_SECRET']}"
    assert storage.scrub(text) == "failed with *** and ***"
