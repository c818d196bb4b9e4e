"""`make check_env` / `make ensure_dirs`: the machine, the teacher's and the store's variables.

    python -m bitnet_kde.env [check] [storage=s3 teacher=openai paths.root=...]   # make check_env
    python -m bitnet_kde.env ensure_dirs [storage=... paths.root=...]             # make ensure_dirs

`check` prints versions, devices and precision advice, then, for the selected teacher, storage
and run-record database (command line, else TEACHER_PROVIDER / STORAGE from the environment or
`.env`), which variables are set or missing (values are never printed) and whether the store
and the database answer.
It exits 1 with the list of problems when something is missing. `ensure_dirs` creates the
data, reports and checkpoint folders on the configured store and the local logs folder.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from bitnet_kde import cli, records, storage
from bitnet_kde.teachers.api import is_local


def report() -> list[str]:
    import torch

    lines = [
        f"python      {platform.python_version()} ({platform.machine()})",
        f"torch       {torch.__version__}",
        f"cpu threads {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}      {p.name}, {p.total_memory / 2**30:.1f} GiB, "
                         f"bf16={'yes' if torch.cuda.is_bf16_supported() else 'no'}")
        lines.append("advice      trainer=gpu (bf16-mixed)")
    else:
        lines.append("cuda        not available")
        lines.append("advice      trainer=cpu (fp32: bf16 matmuls are far slower than fp32 on most CPUs)")
    return lines


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_GROUPS = ("storage", "paths", "teacher", "records")


def compose_config(argv: list[str]):
    """The train config for the storage/paths/teacher/records overrides in `argv` (others are ignored,
    so `make check_env ARGS=...` accepts the same ARGS as the other targets)."""
    from hydra import compose, initialize_config_dir

    argv = cli.hydra_argv(["env", *argv])[1:]
    overrides = [a for a in argv if cli.override_key(a).split(".")[0] in _GROUPS]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _mark(name: str) -> str:
    return "set (value hidden)" if os.environ.get(name, "").strip() else "not set"


def teacher_lines(cfg) -> tuple[list[str], list[str]]:
    """Report lines and problems for the teacher's variables."""
    t = cfg.get("teacher") or {}
    name = cfg.hydra.runtime.choices.get("teacher") or t.get("provider", "none")
    lines, problems = [f"teacher     {name}"], []
    key_var = t.get("api_key_env")
    if key_var:
        local = is_local(t.get("provider"), t.get("base_url"))
        need = "optional: local server" if local else "required"
        lines.append(f"  {key_var:<32} {_mark(key_var)} ({need})")
        if not local and not os.environ.get(key_var, "").strip():
            problems.append(f"teacher {name}: {key_var} is not set (put it in .env)")
    else:
        lines.append("  no API key needed (in-process teacher)")
    return lines, problems


def storage_lines(cfg) -> tuple[list[str], list[str]]:
    """Report lines and problems for the store: variables, then a real request to it."""
    b = storage.configure(cfg.get("storage"))
    root = str(cfg.paths.root)
    b = storage.backend_of(root) if "://" in root else b
    lines, problems = [f"storage     {cfg.hydra.runtime.choices.get('storage', b.name)} -> {root}"], []
    required = {n for r in storage.required_options(b) for n in r.split("|")}
    for opt, var in storage.variables(b).items():
        lines.append(f"  {var:<32} {_mark(var)} ({'required' if opt in required else 'optional'})")
    problems += [f"storage {b.name}: {m} is not set" for m in storage.missing_variables(b)]
    if storage.bucket_problem(root):
        problems.append(f"storage {b.name}: {storage.bucket_problem(root)}")
    return _reachable(lines, problems, lambda: storage.setup(cfg)[0], storage.StorageError)


def _reachable(lines: list[str], problems: list[str], probe, error: type[Exception]) -> tuple[list[str], list[str]]:
    """Add the reachability line: not checked while variables are missing, else what `probe()`
    answers (an `error` becomes a problem)."""
    if problems:
        lines.append("  reachable                        not checked (variables missing)")
        return lines, problems
    try:
        lines.append(f"  reachable                        yes: {probe()}")
    except error as e:
        lines.append("  reachable                        no")
        problems.append(str(e))
    return lines, problems


def records_lines(cfg) -> tuple[list[str], list[str]]:
    """Report lines and problems for the run-record database (`records=`): variables, then a request."""
    rc = cfg.get("records") or {}
    if not records.enabled(cfg):
        return ["records     none (reports are files only)"], []
    lines, problems = [f"records     {rc.get('backend')}"], []
    try:
        store = records.STORES[rc.get("backend")]
    except KeyError:
        return lines, [f"records: unknown backend {rc.get('backend')!r}; use one of none, {', '.join(records.STORES)}"]
    required = set(rc.get("required") if rc.get("required") is not None else store.required)
    for opt, var in {**store.env, **(rc.get("env") or {})}.items():
        lines.append(f"  {var:<32} {_mark(var)} ({'required' if opt in required else 'optional'})")
    problems += [f"records {store.name}: {m} is not set" for m in records.missing_variables(rc)]
    return _reachable(lines, problems, lambda: records.check(cfg), records.RecordError)


def check(argv: list[str]) -> int:
    lines = report()
    cfg = compose_config(argv)
    problems = []
    for part in (teacher_lines, storage_lines, records_lines):
        more, bad = part(cfg)
        lines += more
        problems += bad
    # the root or a teacher URL may carry credentials (user:password@host): the report shows neither
    print(storage.scrub("\n".join(lines)))
    if problems:
        print(storage.scrub("\nproblems:\n" + "\n".join(f"  - {p}" for p in problems)))
        return 1
    return 0


def ensure_dirs(argv: list[str]) -> int:
    """Create data/, reports/ and checkpoints on the configured store and logs/ locally."""
    cfg = compose_config(argv)
    try:
        storage.configure(cfg.get("storage"))
        if storage.backend_of(cfg.paths.root).name == "local" and cfg.get("storage", {}).get("name") == "colab_drive":
            storage.setup(cfg)  # mounts Drive when asked
        folders = [cfg.paths.root, cfg.paths.data_dir, cfg.paths.report_dir]
        if not storage.is_local(cfg.paths.root):
            folders.append(storage.join(cfg.paths.root, "train"))
        for url in folders:
            storage.makedirs(url)
        os.makedirs(cfg.paths.log_dir, exist_ok=True)
        storage.setup(cfg)  # the store answers with the layout in place
    except storage.StorageError as e:
        print(f"error: {storage.scrub(str(e))}")
        return 1
    print(storage.scrub(f"ensure_dirs: {cfg.paths.data_dir}, {cfg.paths.report_dir} on the store; "
                        f"logs in {cfg.paths.log_dir}"))
    return 0


def main(argv: list[str]) -> int:
    cli.load_dotenv_file()
    command = argv[0] if argv and argv[0] in ("check", "ensure_dirs") else "check"
    rest = argv[1:] if argv and argv[0] in ("check", "ensure_dirs") else argv
    return check(rest) if command == "check" else ensure_dirs(rest)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
