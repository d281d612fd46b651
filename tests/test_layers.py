"""Package layering: imports point down the layers, and every module of pangu and pangu_kernels imports alone.

A package may import any package of a lower layer in LAYERS, and a package of its own layer only through
SIBLING_EDGES; ALLOWED is the resulting table, spelled out in WORKSPACE.md ("Allowed layer edges"). The edges come
from reading the source with `ast`, so imports inside functions count too, and experiments/ is checked without
running its side effects. Run as a script, this file is the fresh-import driver of test_every_module_imports_alone.
"""

import ast
import dataclasses
import importlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Folder -> import name of the source trees whose imports are checked; kernels/ installs as pangu_kernels.
TREES = {"pangu": "pangu", "kernels": "pangu_kernels", "experiments": "experiments"}

# Bottom-up. Packages are the top-level names under pangu/ (config_checks is a module) plus pangu_kernels and
# experiments; reason is not built yet and sits where the architecture puts it.
LAYERS = (
  ("config_checks", "pangu_kernels"),
  ("parallel", "data"),
  ("nn",),
  ("models",),
  ("train", "infer", "interop", "compress", "reason", "diffusion"),
  ("sim",),
  ("experiments",),
)
# Same-layer imports, each one in use: the generate CLI (pangu/infer/generate.py) reads the params of a pangu.train
# checkpoint or loads a Hugging Face folder through pangu.interop. Pangu Embedded samples its students with the
# pangu.infer decode engine and trains them with the shared pangu.train step (distillation: pangu/reason/distill.py,
# pipeline.py; GRPO: grpo.py, a pangu.train LossFn). The DiTs of pangu.diffusion train through the shared step with
# the DDPM loss injected (pangu/diffusion/train.py).
SIBLING_EDGES = {"infer": {"train", "interop"}, "reason": {"train", "infer"}, "diffusion": {"train"}}
_RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}
ALLOWED = {package: {other for other in _RANK if _RANK[other] < _RANK[package]} | SIBLING_EDGES.get(package, set())
           for package in _RANK}

# Third-party packages the driver imports once before forking, so each child pays only for the pangu modules it
# imports; nothing of pangu or pangu_kernels is loaded before the fork, so every child builds that graph afresh.
_PRELOADED = ("numpy", "scipy.stats", "scipy.optimize", "jax", "jax.numpy", "flax.linen", "flax.struct", "optax",
              "chex", "orbax.checkpoint", "absl.app", "absl.flags", "safetensors.numpy", "tokenizers")
_WORKERS = 2


@dataclasses.dataclass(frozen=True)
class Edge:
  path: str  # importing file, relative to ROOT
  line: int
  importer: str  # dotted module name of the importing file
  imported: str  # dotted name the import statement reads


def _modules() -> list[tuple[str, pathlib.Path]]:
  """(dotted name, file) of every .py file in TREES."""
  found = []
  for folder, import_name in TREES.items():
    for path in sorted((ROOT / folder).rglob("*.py")):
      parts = [import_name, *path.relative_to(ROOT / folder).with_suffix("").parts]
      found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
  return found


def import_edges() -> list[Edge]:
  """Every import of pangu, pangu_kernels or experiments written anywhere in TREES, relative imports resolved."""
  edges = []
  for module, path in _modules():
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module
        if node.level:
          base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        # `from pangu import data` imports a package by name; `from pangu.nn import moe` reads pangu.nn's layer.
        names = [f"{base}.{alias.name}" for alias in node.names] if "." not in base else [base]
      else:
        continue
      edges += [Edge(str(path.relative_to(ROOT)), node.lineno, module, name)
                for name in names if name.split(".")[0] in TREES.values()]
  return edges


def _package(module: str) -> str:
  """The LAYERS name of a module: its top-level name under pangu, else its root."""
  parts = module.split(".")
  return parts[1] if parts[0] == "pangu" and len(parts) > 1 else parts[0]


def _broken_rule(edge: Edge) -> str | None:
  source, target = _package(edge.importer), _package(edge.imported)
  if source == target or target in ALLOWED.get(source, set()):
    return None
  for package in (source, target):
    if package not in _RANK:
      return f"{package} is in no layer; add it to LAYERS here and to WORKSPACE.md"
  where = f"{source} is layer {_RANK[source]}, {target} layer {_RANK[target]}"
  if _RANK[target] > _RANK[source]:
    return f"a lower layer never imports a higher one ({where})"
  return f"an edge inside one layer must be listed in SIBLING_EDGES and WORKSPACE.md ({where})"


def test_imports_follow_the_layers():
  broken = [f"{edge.path}:{edge.line} imports {edge.imported}: {rule}"
            for edge in import_edges() if (rule := _broken_rule(edge))]
  assert not broken, f"{len(broken)} imports break the layering:\n" + "\n".join(broken)


def test_kernels_import_nothing_from_pangu():
  broken = [f"{edge.path}:{edge.line} imports {edge.imported}" for edge in import_edges()
            if edge.importer.startswith("pangu_kernels") and not edge.imported.startswith("pangu_kernels")]
  assert not broken, "pangu_kernels depends on JAX only:\n" + "\n".join(broken)


def test_workspace_lists_the_allowed_edges():
  section = (ROOT / "WORKSPACE.md").read_text().split("## Allowed layer edges\n", 1)[1].split("\n## ", 1)[0]
  rows = {}
  for line in section.splitlines():
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    if len(cells) == 2 and (package := re.match(r"`(\w+)`", cells[0])):
      rows[package[1]] = set(re.findall(r"`(\w+)`", cells[1]))
  assert rows == ALLOWED, "WORKSPACE.md's 'Allowed layer edges' table must match ALLOWED in tests/test_layers.py"


def test_every_module_imports_alone():
  modules = [module for module, path in _modules()
             if not module.startswith("experiments") and not path.name.startswith("test_")]
  # PYTHONPATH puts this checkout's pangu ahead of whatever copy the environment installed.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, __file__, *modules], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  failed = result.returncode != 0
  assert not failed, result.stdout + result.stderr


def _import_each_alone(modules: list[str]) -> int:
  """Imports each module in a child forked from this fresh interpreter; prints every failure, returns their count.

  Forking shares the preloaded third-party modules (3-9 s of imports here) instead of starting one interpreter per
  module, which costs that again for each of the ~80 modules.
  """
  for name in _PRELOADED:
    importlib.import_module(name)
  loaded = [name for name in sys.modules if name.split(".")[0] in ("pangu", "pangu_kernels")]
  assert not loaded, f"the driver must fork before importing pangu, but has {loaded}"
  pending, running, failures = list(modules), {}, 0
  while pending or running:
    while pending and len(running) < _WORKERS:
      module, log = pending.pop(), tempfile.TemporaryFile()
      pid = os.fork()
      if pid == 0:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        status = 0
        try:
          importlib.import_module(module)
        except BaseException:  # a SystemExit raised at import time is a failure too
          traceback.print_exc()
          status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
      running[pid] = (module, log)
    pid, status = os.wait()
    module, log = running.pop(pid)
    code = os.waitstatus_to_exitcode(status)
    if code:
      log.seek(0)
      print(f"--- import {module} alone failed (exit {code}):\n{log.read().decode(errors='replace')}")
      failures += 1
    log.close()
  return failures


if __name__ == "__main__":
  sys.exit(1 if _import_each_alone(sys.argv[1:]) else 0)
