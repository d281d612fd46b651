"""Every notebook runs top to bottom against the installed library (code cells only, no Jupyter needed)."""

import json
import pathlib

import matplotlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.chdir(ROOT)
  namespace = {}
  for cell in json.loads(path.read_text())["cells"]:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
