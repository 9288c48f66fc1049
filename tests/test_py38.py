"""The package must run on the Poplar SDK's Python 3.8 (vermin stands in for an interpreter that
cannot be installed here)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_package_needs_nothing_newer_than_python_3_8():
    vermin = shutil.which("vermin") or str(Path(sys.executable).parent / "vermin")
    if not Path(vermin).exists():
        pytest.skip("vermin is not installed (pip install -e '.[test]' brings it)")
    proc = subprocess.run([vermin, "--no-tips", "--target=3.8-", "--eval-annotations", "--violations",
                           str(ROOT / "ipu_t5")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
