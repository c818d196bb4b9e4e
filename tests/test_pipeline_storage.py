"""`python pipeline.py` checks the folder its summary is written into (atomically: a temporary file
renamed there), and its storage line names that folder, not the summary file."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_the_storage_line_names_the_summary_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), f"paths.root={tmp_path}", "pipeline.stages=[]"],
                          check=False, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln.split("storage: ", 1)[1] for ln in (proc.stdout + proc.stderr).splitlines() if "storage: " in ln]
    assert f"local path, to be created, {tmp_path / 'reports'} (writable)" in lines, lines
    assert not any("pipeline_summary.json" in ln for ln in lines), lines
    assert (tmp_path / "reports" / "pipeline_summary.json").is_file()
