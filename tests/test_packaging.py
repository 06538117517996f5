"""The wheel ships every module, including the top-level callbacks/ folder as ftframe.callbacks."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.helpers import ROOT


def test_wheel_contains_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("ftframe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"ftframe/{p.relative_to(ROOT / 'ftframe').as_posix()}" for p in (ROOT / "ftframe").rglob("*.py")}
    expected |= {f"ftframe/callbacks/{p.name}" for p in (ROOT / "callbacks").glob("*.py")}
    expected |= {"ftframe/evaluation/benchmarks.yaml", "ftframe/evaluation/suites/standard.yaml"}  # data, not code
    assert expected <= names, sorted(expected - names)
    assert "ftframe/callbacks/adapter_export.py" in expected  # the callbacks/ folder was read
    # callbacks/ ships once, as ftframe.callbacks: no top-level package (a second copy of each class); no tests
    assert not [n for n in names if n.split("/")[0] in ("callbacks", "tests")], sorted(names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ftframe = ftframe.__main__:main" in zipfile.ZipFile(wheel).read(entry).decode()
