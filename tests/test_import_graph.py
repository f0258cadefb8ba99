"""The import graph of ``gaze_jax`` and ``pallas_kernels``, read from the source (``ast``; nothing
is imported): every import counts, at a module's top or inside a function alike, since a
function-level import is a dependency too, only a hidden one.

* No cycle between modules of ``gaze_jax`` (``KNOWN_CYCLE_EDGES`` would list an exception, and why).
* No cycle between its parts (``gaze_jax.train``, ``gaze_jax.runs``, ``gaze_jax.data``, ...): a
  lower layer never imports a higher one, e.g. ``gaze_jax.train`` never imports
  ``gaze_jax.runs`` (``KNOWN_PART_EDGES`` would list an exception).
* ``gaze_jax.gaze`` (the method) never imports ``pallas_kernels`` (the kernels build on it).
* A function-level import in ``gaze_jax`` says why it is not at the top, in a comment on its
  line or just above it (an optional dependency, a module that must import without one, ...).

Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` first, so an import is an edge to
those packages too (except the importer's own, already running). Only what ``importlib``
loads by a computed name (the lazy ``__getattr__`` of ``gaze_jax.data`` and ``gaze_jax.train``)
is not seen.
"""

from __future__ import annotations

import ast
import dataclasses
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gaze_jax", "pallas_kernels")

# (importer, imported) edges allowed to close a cycle; each must still exist (else drop it).
KNOWN_CYCLE_EDGES: set = set()
# Module edges allowed to close a cycle between parts of gaze_jax; each must still exist.
KNOWN_PART_EDGES: set = set()
# Function-level imports without a comment, in files being changed elsewhere:
# (file, imported module). Each should gain its reason or move to the top.
UNEXPLAINED_LATE_IMPORTS: set = set()


@dataclasses.dataclass(frozen=True)
class Import:
  importer: str          # module name
  target: str            # the module it loads (the longest name that is one of ours)
  file: str              # the importer's path, relative to the repository
  line: int
  late: bool             # inside a function


def _modules() -> dict[str, tuple[Path, bool]]:
  """module name -> (file, is a package)."""
  out = {}
  for pkg in PACKAGES:
    for f in sorted((ROOT / pkg).rglob("*.py")):
      parts = list(f.relative_to(ROOT).with_suffix("").parts)
      is_pkg = parts[-1] == "__init__"
      out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
  return out


MODULES = _modules()


def _ours(name: str):
  """The longest prefix of ``name`` that is one of our modules, or None."""
  parts = name.split(".")
  while parts:
    if ".".join(parts) in MODULES:
      return ".".join(parts)
    parts.pop()
  return None


def _imports(module: str) -> list[Import]:
  file, is_pkg = MODULES[module]
  rel = str(file.relative_to(ROOT))
  package = module if is_pkg else module.rpartition(".")[0]
  out = []

  def add(name: str, node, late: bool):
    if name and _ours(name) is not None:
      out.append(Import(module, _ours(name), rel, node.lineno, late))

  def visit(node, late: bool):
    for child in ast.iter_child_nodes(node):
      inner = late or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        for alias in child.names:
          add(alias.name, child, late)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          up = package.split(".")[:len(package.split(".")) - (child.level - 1)]
          base = ".".join(up + ([base] if base else []))
        for alias in child.names:         # ``from a import b``: b may be a module of a
          full = f"{base}.{alias.name}"
          add(full if _ours(full) == full else base, child, late)
      visit(child, inner)

  visit(ast.parse(file.read_text(), rel), False)
  return out


IMPORTS = [i for m in sorted(MODULES) for i in _imports(m)]


def _graph(imports) -> dict[str, dict[str, list[Import]]]:
  """importer -> {module loaded: [the imports that load it]}: the target and the packages
  above it whose ``__init__`` runs first (not the importer's own packages)."""
  g = defaultdict(lambda: defaultdict(list))
  for imp in imports:
    parts = imp.target.split(".")
    for n in range(1, len(parts) + 1):
      loaded = ".".join(parts[:n])
      if loaded in MODULES and not (imp.importer == loaded
                                    or imp.importer.startswith(loaded + ".")):
        g[imp.importer][loaded].append(imp)
  return g


def _cycles(graph: dict[str, dict[str, list]]) -> list[list[str]]:
  """The strongly connected components of more than one node (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, {}):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _describe(comp, graph) -> str:
  return "\n".join(f"  {a} -> {b}: " + ", ".join(
      f"{i.file}:{i.line}{' (in a function)' if i.late else ''}" for i in graph[a][b])
      for a in comp for b in sorted(graph.get(a, {})) if b in comp)


def _part(module: str) -> str:
  """``gaze_jax.train.config`` -> ``gaze_jax.train``; ``gaze_jax.runs`` -> itself."""
  return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules():
  ours = [i for i in IMPORTS if i.importer.startswith("gaze_jax")
          and i.target.startswith("gaze_jax")]
  have = {(i.importer, i.target) for i in ours}
  assert KNOWN_CYCLE_EDGES <= have, f"gone, drop them: {KNOWN_CYCLE_EDGES - have}"
  graph = _graph([i for i in ours if (i.importer, i.target) not in KNOWN_CYCLE_EDGES])
  cycles = _cycles(graph)
  assert not cycles, "import cycles:\n" + "\n".join(_describe(c, graph) for c in cycles)
  # The exceptions do close a cycle (else they are not exceptions: drop them).
  for a, b in KNOWN_CYCLE_EDGES:
    assert a in _reachable(graph, b), f"{a} -> {b} closes no cycle any more: drop it"


def _reachable(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    v = todo.pop()
    if v not in seen:
      seen.add(v)
      todo.extend(graph.get(v, {}))
  return seen


def test_no_import_cycle_between_parts_of_gaze_jax():
  ours = [i for i in IMPORTS if i.importer.startswith("gaze_jax.")
          and i.target.startswith("gaze_jax.") and _part(i.importer) != _part(i.target)]
  have = {(i.importer, i.target) for i in ours}
  assert KNOWN_PART_EDGES <= have, f"gone, drop them: {KNOWN_PART_EDGES - have}"
  graph = defaultdict(lambda: defaultdict(list))
  for i in ours:
    if (i.importer, i.target) not in KNOWN_PART_EDGES:
      graph[_part(i.importer)][_part(i.target)].append(i)
  cycles = _cycles(graph)
  assert not cycles, ("parts of gaze_jax that import each other (a lower layer must not "
                      "import a higher one):\n" + "\n".join(_describe(c, graph) for c in cycles))


def test_the_train_package_does_not_import_the_runs_layer():
  above = ("gaze_jax.runs", "gaze_jax.predict", "gaze_jax.exports")
  bad = [f"{i.file}:{i.line} imports {i.target}" for i in IMPORTS
         if i.importer.startswith("gaze_jax.train") and i.target in above]
  assert not bad, bad


def test_the_method_does_not_import_the_kernels():
  bad = [f"{i.file}:{i.line} imports {i.target}" for i in IMPORTS
         if _part(i.importer) == "gaze_jax.gaze" and i.target.split(".")[0] == "pallas_kernels"]
  assert not bad, bad
  assert any(i.importer.startswith("gaze_jax.gaze") for i in IMPORTS)   # the graph sees gaze


def _late_imports_without_reason() -> list[tuple[str, int, str]]:
  """(file, line, imported name) of the function-level imports in gaze_jax (ours or not) with
  no comment on their line, nor a comment line just above them (or above their group of
  imports)."""
  out = []
  for module in sorted(m for m in MODULES if m.startswith("gaze_jax")):
    file, _ = MODULES[module]
    rel = str(file.relative_to(ROOT))
    lines = file.read_text().splitlines()
    tree = ast.parse("\n".join(lines), rel)
    late = set()
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        late.update(n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in sorted(late, key=lambda n: n.lineno):
      if "#" in lines[node.lineno - 1]:
        continue
      above = node.lineno - 2             # the first line above the group of imports
      while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
        above -= 1
      if above >= 0 and lines[above].strip().startswith("#"):
        continue
      if isinstance(node, ast.ImportFrom):
        full = f"{node.module}.{node.names[0].name}"
        name = full if _ours(full) == full else node.module
      else:
        name = node.names[0].name
      out.append((rel, node.lineno, _ours(name or "") or name))
  return out


def test_a_function_level_import_says_why():
  found = _late_imports_without_reason()
  unexplained = [f"{f}:{n} imports {name}" for f, n, name in found
                 if (f, name) not in UNEXPLAINED_LATE_IMPORTS]
  assert not unexplained, ("move these imports to the module's top, or say in a comment why "
                           f"they cannot be there: {unexplained}")
