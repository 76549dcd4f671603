"""The package's layers, read from the source: imports flow one way and never in a circle.

Every `import` and `from ... import` in src/rine (module level and inside functions, but not
under `if TYPE_CHECKING:`) is an edge from one module to another. The layers, bottom up:
config -> model, data -> inference, training, evaluation (pipelines) -> cli, server, cluster,
export (interfaces). A module may import its own layer or lower ones, never a higher one, and
no chain of imports may lead back to where it started.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rine"

LAYERS = {  # top-level folder or module under rine -> its rank
    "_moved": 0, "config": 0, "errors": 0,
    "model": 1, "data": 1, "provenance": 1,
    "inference": 2, "training": 2, "evaluation": 2,
    "cli": 3, "server": 3, "cluster": 3, "export": 3, "__main__": 3,
}  # fmt: skip


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
    assert "rine.training.features" in graph["rine.evaluation.scoring"]  # inside a function
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
    """Negative control: cluster/job.py importing rine.cli.common inside a function (same rank,
    so the layer rule lets it pass) is flagged; cli importing cluster is not."""
    pkg = tmp_path / "rine"
    for folder in ("cluster", "cli"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "common.py").write_text("from ..cluster import job\n")
    (pkg / "cluster" / "job.py").write_text("def f():\n    from ..cli.common import error_message\n")
    monkeypatch.setattr(__import__(__name__), "SRC", pkg)
    test_imports_flow_downwards()  # the layers alone let it through
    with pytest.raises(AssertionError, match="rine.cluster.job imports rine.cli.common") as caught:
        test_library_code_never_imports_the_cli()
    assert "rine.cli.common imports" not in str(caught.value)


def test_old_module_paths_still_import():
    """Users' scripts import the pre-layout paths; they name the moved modules themselves."""
    import rine.backbones
    import rine.metrics
    import rine.model.backbones
    from rine import Detector, HeadConfig, RINEHead, load_backbone, load_pretrained, save_pretrained
    from rine.evaluation import evaluate, write_outputs
    from rine.evaluation.engine import evaluate as engine_evaluate
    from rine.inference import Detector as inference_detector
    from rine.metrics import compute_metrics
    from rine.training import train_head

    assert rine.backbones is rine.model.backbones
    assert rine.backbones.__spec__.name == "rine.model.backbones"
    assert compute_metrics.__module__ == "rine.evaluation.metrics"
    assert evaluate is engine_evaluate and callable(write_outputs) and callable(train_head)
    assert inference_detector is Detector
    assert all(callable(x) for x in (HeadConfig, RINEHead, load_backbone, load_pretrained, save_pretrained))
