"""The architecture's rules, read from the source with `ast` (nothing is imported, so this is instant).

- data flows one way: `preprocess` never imports `train`, and `common` imports neither;
- the modules that must answer in a second (options, tasks, architecture, the run-directory
  readers, `train/__main__.py`) never import TensorFlow or Keras at module level, directly or
  through other project modules (imports inside functions are how `__main__` stays fast);
- no import cycle between project modules, counting imports inside functions too (a cycle that
  only a function closes still ties two modules together: neither can be understood or moved alone);
- no module over 300 lines.

Each rule is a function of the import graph, and the last tests feed those functions small
graphs that break them, so every rule is seen to fail.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "preprocess", "train")
HEAVY = ("tensorflow", "keras")
MAX_LINES = 300
FAST_MODULES = (
    "train.__main__", "train.options", "train.network.tasks", "train.network.architecture",
    "train.rundir.layout", "train.rundir.listing", "train.rundir.table", "train.rundir.folders",
    "train.network.precision", "train.tensorflow_import", "train.hardware",
    "preprocess.__main__",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported_names(tree: ast.Module, module: str, is_package: bool) -> tuple[set[str], set[str]]:
    """(module-level imports, imports inside functions), as dotted names; `from X import Y` gives X.Y."""
    top, inner = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join(package[:len(package) - child.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in child.names]
            (inner if in_function else top).update(names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, inner


def import_graph(sources: dict[str, str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """{module: imported names} at module level and anywhere, for modules given as {name: source text}.

    Names are kept as written (third-party ones too), plus the project module each one resolves to.
    """
    packages = {name for name in sources if any(other.startswith(name + ".") for other in sources)}
    top_level, anywhere = {}, {}
    for module, text in sources.items():
        top, inner = imported_names(ast.parse(text), module, module in packages)
        top_level[module] = {resolve(name, sources) for name in top}
        anywhere[module] = top_level[module] | {resolve(name, sources) for name in inner}
    return top_level, anywhere


def resolve(name: str, modules) -> str:
    """The project module a dotted import name loads (`from a.b import C` -> a.b), or the name itself."""
    candidate = name
    while candidate and candidate not in modules:
        candidate = candidate.rpartition(".")[0]
    return candidate or name


def executed_on_import(module: str, graph: dict[str, set[str]]) -> set[str]:
    """Every name imported, directly or through project modules, when `module` is imported (parent packages included)."""
    seen, stack = set(), [module]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in graph:  # a project module: what it imports runs too, and so do its parent packages
            stack += graph[current]
            stack += [".".join(current.split(".")[:index]) for index in range(1, current.count(".") + 1)]
    return seen


def heavy_imports(module: str, graph: dict[str, set[str]]) -> list[str]:
    return sorted(name for name in executed_on_import(module, graph) if name.split(".")[0] in HEAVY)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle between the graph's own modules, as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module], _ = "open", path.append(module)
        for target in sorted(graph[module]):
            if target not in graph or target == module:
                continue
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[module], _ = "done", path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def crossings(graph: dict[str, set[str]], importer: str, forbidden: tuple[str, ...]) -> list[str]:
    """`importer`-package modules that import any of the `forbidden` packages."""
    return sorted(f"{module} imports {name}" for module, names in graph.items()
                  if module.split(".")[0] == importer for name in names if name.split(".")[0] in forbidden)


MODULES = project_modules()
TOP_LEVEL, ANYWHERE = import_graph({name: path.read_text(encoding="utf-8") for name, path in MODULES.items()})


def test_preprocess_never_imports_train_and_common_imports_neither():
    assert crossings(ANYWHERE, "preprocess", ("train",)) == []
    assert crossings(ANYWHERE, "common", ("preprocess", "train")) == []
    assert crossings(ANYWHERE, "preprocess", HEAVY) == []  # `python -m preprocess` never loads TensorFlow


@pytest.mark.parametrize("module", FAST_MODULES)
def test_fast_modules_never_import_tensorflow_at_module_level(module):
    assert module in MODULES, f"{module} no longer exists: update FAST_MODULES"
    assert heavy_imports(module, TOP_LEVEL) == []


def test_no_import_cycle_between_project_modules_counting_imports_inside_functions():
    assert find_cycle(ANYWHERE) is None


RENAMES = re.compile(r"\bos\.(?:replace|rename)\(|\.rename\(|\.replace\(\s*(?:temporary|part|tmp)|shutil\.move\(")


def renames_outside_files(sources: dict[str, str]) -> list[str]:
    """Modules other than common.files that move files into place themselves (no fsync discipline)."""
    return sorted(name for name, text in sources.items() if name != "common.files" and RENAMES.search(text))


def test_atomic_writes_go_through_common_files():
    assert renames_outside_files({name: path.read_text(encoding="utf-8") for name, path in MODULES.items()}) == []
    assert renames_outside_files({"preprocess.synth": "os.replace(temporary, path)\n",
                                  "common.files": "os.replace(temporary, path)\n"}) == ["preprocess.synth"]


def test_no_module_is_over_300_lines():
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    assert {name: lines for name, lines in lengths.items() if lines > MAX_LINES} == {}


# -- the rules fail where they should ---------------------------------------------------------
def test_the_rules_catch_what_they_forbid():
    top, anywhere = import_graph({
        "common": "", "common.files": "import train.fit\n",
        "preprocess": "", "preprocess.cache": "def read():\n    from train.options import FitOptions\n",
        "train": "", "train.options": "from train.network import tasks\n",
        "train.network": "", "train.network.tasks": "import numpy\nfrom train.loop.loop import fit\n",
        "train.loop": "", "train.loop.loop": "import keras\nfrom train.options import FitOptions\n",
        "train.fit": "def run():\n    import tensorflow\n",
    })
    assert crossings(anywhere, "preprocess", ("train",)) == ["preprocess.cache imports train.options"]
    assert crossings(anywhere, "common", ("preprocess", "train")) == ["common.files imports train.fit"]
    assert heavy_imports("train.options", top) == ["keras"]  # through tasks and the loop
    assert heavy_imports("train.fit", top) == []  # inside a function: allowed
    assert find_cycle(top) == ["train.loop.loop", "train.options", "train.network.tasks", "train.loop.loop"]


def test_a_cycle_closed_only_inside_a_function_counts():
    # the shape of the cycle the reader registry removed: volume picked a reader, and the DICOM reader imported volume
    top, anywhere = import_graph({
        "preprocess": "", "preprocess.volume": "def open_any_scan():\n    from preprocess.dicom import open_series\n",
        "preprocess.dicom": "from preprocess.volume import canonical_scan\n",
    })
    assert find_cycle(top) is None
    assert find_cycle(anywhere) == ["preprocess.dicom", "preprocess.volume", "preprocess.dicom"]


def test_a_heavy_import_in_a_parent_package_counts():
    top, _ = import_graph({"train": "", "train.rundir": "import tensorflow as tf\n", "train.rundir.layout": ""})
    assert heavy_imports("train.rundir.layout", top) == ["tensorflow"]
