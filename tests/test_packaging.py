"""The installed package list in pyproject.toml must name every package folder on disk."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _on_disk(folder: str, import_name: str) -> set[str]:
  base = ROOT / folder
  return {".".join([import_name, *p.parent.relative_to(base).parts]) for p in base.rglob("__init__.py")}


def test_every_package_folder_is_installed():
  listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
  on_disk = _on_disk("pangu", "pangu") | _on_disk("kernels", "pangu_kernels")
  assert on_disk <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(on_disk - listed)}"
  assert listed <= on_disk, f"listed but missing on disk: {sorted(listed - on_disk)}"
