"""The soak benchmark's script, small: a seeded fault mix, one kill -9, resume, every check holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_soak_script_small(tmp_path):
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak_collect.py"), "--prompts", "60",
                           "--chunk-size", "10", "--kills", "1", "--seed", "3", "--work", str(tmp_path / "work"),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["lost"] == 0 and result["duplicated"] == 0
    assert result["failures"] == result["expected_failures"] and sum(result["failures"].values()) > 0
    assert [r["killed"] for r in result["runs"]] == [True, False]
