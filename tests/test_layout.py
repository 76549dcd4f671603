"""The package's layers, read from the source: imports flow one way and never in a circle.

Every `import` and `from ... import` in src/rine (module level and inside functions, but not
under `if TYPE_CHECKING:`) is an edge from one module to another. The layers, bottom up:
config, errors, fileio, metrics (base) -> model, data -> inference, training, evaluation (pipelines)
-> cli, server, cluster, export (interfaces). A module may import its own layer or lower ones,
never a higher one, and no chain of imports may lead back to where it started. Training and
evaluation, side by side in one layer, do not import each other: what both need (the tap
store, the metrics) sits below them.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rine"

LAYERS = {  # top-level folder or module under rine -> its rank
    "config": 0, "errors": 0, "fileio": 0, "metrics": 0,
    "model": 1, "data": 1, "provenance": 1,
    "inference": 2, "training": 2, "evaluation": 2,
    "cli": 3, "server": 3, "cluster": 3, "export": 3, "__main__": 3,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The rine modules that the file at `path` imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join([*base, *([node.module] if node.module else [])])
            else:
                stem = node.module or ""
            # `from .x import y`: y is a submodule or a name in x
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def top(module: str) -> str:
    """The top-level folder or module under rine ('' for rine itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0


def test_every_module_is_in_a_layer():
    unknown = {m for m in import_graph() if m != "rine" and m.split(".")[1] not in LAYERS}
    assert not unknown, f"modules outside the layer map (add their folder to LAYERS): {sorted(unknown)}"


def test_the_graph_sees_imports():
    """The walker itself: it must find relative, absolute and function-level imports."""
    graph = import_graph()
    assert "rine.model.head" in graph["rine.model.rine_model"]
    assert "rine.inference.onnx_backend" in graph["rine.cli.common"]  # imported inside a function
    assert "rine.data.tap_extract" in graph["rine.evaluation.scoring"]  # inside a function
    assert "rine.evaluation.results" not in graph["rine.evaluation.plots"]  # TYPE_CHECKING only


def test_imports_flow_downwards():
    upward = [
        f"{m} imports {t}"
        for m, targets in import_graph().items()
        for t in targets
        if m != "rine" and layer(t) > layer(m)
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_library_code_never_imports_the_cli():
    """Only rine.cli (and the `python -m rine` entry) import rine.cli: the server, the
    cluster and export are interfaces of the same rank, but they load and report through the
    library (`rine.inference.loading`, `rine.errors`), never through the CLI's argparse
    helpers."""
    entry = {"rine", "rine.__main__"}
    into_cli = [
        f"{m} imports {t}"
        for m, targets in import_graph().items()
        for t in targets
        if m not in entry and not _in_cli(m) and _in_cli(t)
    ]
    assert not into_cli, "library code importing the CLI:\n" + "\n".join(sorted(into_cli))


def _in_cli(module: str) -> bool:
    return module == "rine.cli" or module.startswith("rine.cli.")


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_a_cycle_and_an_upward_import_would_be_caught(tmp_path, monkeypatch):
    """Negative control: a fake package with model -> cli and a <-> b is flagged."""
    pkg = tmp_path / "rine"
    (pkg / "model").mkdir(parents=True)
    (pkg / "cli").mkdir()
    for f in ("__init__.py", "model/__init__.py", "cli/__init__.py", "cli/x.py"):
        (pkg / f).write_text("")
    (pkg / "model" / "a.py").write_text("from . import b\nfrom ..cli import x\n")
    (pkg / "model" / "b.py").write_text("def f():\n    from .a import g\n")
    monkeypatch.setattr(__import__(__name__), "SRC", pkg)
    graph = import_graph()
    assert graph["rine.model.a"] == {"rine.model.b", "rine.cli.x"}
    assert graph["rine.model.b"] == {"rine.model.a"}
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="model.a imports rine.cli.x"):
        test_imports_flow_downwards()


def test_a_library_module_importing_the_cli_would_be_caught(tmp_path, monkeypatch):
    """Negative control: cluster/job.py importing rine.cli.common inside a function, and
    server/service.py importing rine.cli.common by its absolute name (both the same rank as
    the CLI, so the layer rule lets them pass) are flagged; cli importing them is not."""
    pkg = tmp_path / "rine"
    for folder in ("cluster", "cli", "server"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "common.py").write_text("from ..cluster import job\nfrom ..server import service\n")
    (pkg / "cluster" / "job.py").write_text("def f():\n    from ..cli.common import error_message\n")
    (pkg / "server" / "service.py").write_text("import rine.cli.common\n")
    monkeypatch.setattr(__import__(__name__), "SRC", pkg)
    test_imports_flow_downwards()  # the layers alone let it through
    with pytest.raises(AssertionError, match="rine.cluster.job imports rine.cli.common") as caught:
        test_library_code_never_imports_the_cli()
    assert "rine.server.service imports rine.cli.common" in str(caught.value)
    assert "rine.cli.common imports" not in str(caught.value)


# Pairs of top-level folders that may not import each other in either direction.
SEPARATE = (("training", "evaluation"),)


def test_training_and_evaluation_stay_apart():
    crossing = [
        f"{m} imports {t}"
        for m, targets in import_graph().items()
        for t in targets
        for a, b in SEPARATE
        if {top(m), top(t)} == {a, b}
    ]
    assert not crossing, "training and evaluation import each other (move what both need below them):\n" + "\n".join(
        sorted(crossing)
    )


def test_a_training_evaluation_import_would_be_caught(tmp_path, monkeypatch):
    """Negative control: evaluation -> training (inside a function) and training -> evaluation
    are both flagged, although neither goes against the layers."""
    pkg = tmp_path / "rine"
    for folder in ("training", "evaluation", "data"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "store.py").write_text("")
    (pkg / "training" / "trainer.py").write_text("from ..evaluation import metrics\nfrom ..data import store\n")
    (pkg / "evaluation" / "metrics.py").write_text("")
    (pkg / "evaluation" / "scoring.py").write_text("def f():\n    from ..training.trainer import g\n")
    monkeypatch.setattr(__import__(__name__), "SRC", pkg)
    test_imports_flow_downwards()  # same layer: the layer rule alone would let these pass
    with pytest.raises(AssertionError) as e:
        test_training_and_evaluation_stay_apart()
    assert "rine.training.trainer imports rine.evaluation.metrics" in str(e.value)
    assert "rine.evaluation.scoring imports rine.training.trainer" in str(e.value)
    assert "rine.data.store" not in str(e.value)


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module defines itself: functions, classes and assignments at its top level
    (also under a top-level `if`/`try`), not the names it imports."""
    names: set[str] = set()
    for node in tree.body:
        for child in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else (node,):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(child.name)
            elif isinstance(child, (ast.Assign, ast.AnnAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _import_nodes(tree: ast.Module) -> list[ast.ImportFrom]:
    """The `from ... import` statements of a file, also those of the Python scripts it holds
    in string literals (the code that tests run in a subprocess)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import rine" in node.value.replace("from rine", "import rine"):
            try:
                script = ast.parse(textwrap.dedent(node.value))
            except SyntaxError:
                continue
            found += [ast.copy_location(n, node) for n in ast.walk(script) if isinstance(n, ast.ImportFrom) and not n.level]
    return found


def imports_from_elsewhere(roots: list[Path]) -> list[str]:
    """`from rine.x import name` (in any file under `roots`) where `name` is neither a
    submodule of rine.x nor defined in rine.x itself: a name reached through a re-export."""
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(f) for f in files}
    # C extensions are submodules too (their sources sit beside the modules)
    modules |= {module_name(c.with_suffix(".py")) for c in SRC.rglob("*.c")}
    defined = {module_name(f): _top_level_names(ast.parse(f.read_text(encoding="utf-8"))) for f in files}
    found = []
    for path in sorted({p for root in roots for p in root.rglob("*.py")}):
        in_pkg = path.is_relative_to(SRC)
        name = module_name(path) if in_pkg else ""
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if node.level and not in_pkg:
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names if source in defined else ():
                if f"{source}.{alias.name}" not in modules and alias.name not in defined[source]:
                    found.append(f"{path.relative_to(SRC.parents[1])}:{node.lineno} imports {alias.name} from {source}")
    return found


def test_names_are_imported_from_the_module_that_defines_them():
    """No re-exports: the package, the tests and the benchmarks import each name from its home."""
    repo = SRC.parents[1]
    found = imports_from_elsewhere([SRC, repo / "tests", repo / "benchmarks"])
    assert not found, "names imported through a re-export (import them from their module):\n" + "\n".join(found)


def test_a_re_export_would_be_caught(tmp_path, monkeypatch):
    """Negative control: a name that model.b only imports, taken from model.b, is flagged;
    a submodule, a name model.a defines and a C extension are not."""
    pkg = tmp_path / "src" / "rine"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "_ext.c").write_text("")
    (pkg / "model" / "a.py").write_text("X = 1\n\ndef f():\n    pass\n")
    (pkg / "model" / "b.py").write_text("from .a import X, f\nfrom . import a, _ext\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "from rine.model.b import f\nfrom rine.model.a import X\n\n"
        "SCRIPT = \"\"\"\n    import sys\n    from rine.model.b import X\n\"\"\"\n"  # run in a subprocess
    )
    monkeypatch.setattr(__import__(__name__), "SRC", pkg)
    assert imports_from_elsewhere([pkg, tmp_path / "tests"]) == [
        "tests/test_x.py:1 imports f from rine.model.b", "tests/test_x.py:4 imports X from rine.model.b"]


def all_of_lists_imports(path: Path) -> list[str]:
    """The names in `path`'s `__all__` that the module imports instead of defining."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    listed: list[str] = []
    imported: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            listed = [e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return [n for n in listed if n in imported]


def test_all_lists_only_what_a_module_defines():
    """`__all__` is what a module offers of its own: a name it imports is its home's to list."""
    found = [f"{module_name(f)}: {', '.join(names)}" for f in sorted(SRC.rglob("*.py"))
             if (names := all_of_lists_imports(f))]
    assert not found, "__all__ listing imported names:\n" + "\n".join(found)


def test_an_imported_name_in_all_would_be_caught(tmp_path):
    """Negative control: the form inference/detector.py had (an imported constant listed)."""
    f = tmp_path / "m.py"
    f.write_text("from x import DECODERS, helper\n\n__all__ = ['DECODERS', 'Detector']\n\nclass Detector: ...\n")
    assert all_of_lists_imports(f) == ["DECODERS"]


def test_no_test_file_imports_another():
    """What several test files share lives in tests/support/ or conftest.py (docs/architecture.md)."""
    tests = SRC.parents[1] / "tests"
    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted(tests.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        for name in (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        )
        if name.split(".")[-1].startswith("test_") and not (path.name == "test_layout.py")
    ]
    assert not found, "test files importing test files (move the shared code to tests/support/): " + ", ".join(found)
