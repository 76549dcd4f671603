"""Old module paths (`rine.backbones`, `rine.metrics`, ...) kept importable after the layout moved them.

Until the layer folders existed every module sat directly under `rine/`, and users' scripts
import those paths (`from rine.metrics import compute_metrics`). Each old name resolves to the
module object at its new home, so the two names are one module (same functions, same
monkeypatching), with no copy of the code and no deprecation warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# old path under rine -> new path under rine. rine.model, rine.inference, rine.training and
# rine.evaluation are packages now; their __init__ re-exports what the old module offered.
MOVED_MODULES = {
    "backbones": "model.backbones", "head": "model.head", "checkpoints": "model.checkpoints",
    "pretrained": "model.pretrained", "accel": "model.accel",
    "images": "data.images", "preprocess": "data.preprocess", "decoding": "data.decoding",
    "layouts": "data.layouts", "datasets": "data.datasets", "augment": "data.augment",
    "perturb": "data.perturb",
    "features": "training.features", "losses": "training.losses", "grid": "training.grid",
    "metrics": "evaluation.metrics", "reports": "evaluation.plots",
}  # fmt: skip


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.target_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The target ran when it was imported. The import system has just set the alias's
        # spec on it; give it back its own, so that the module keeps one true name.
        module.__spec__ = self.target_spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != "rine" or name not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(f"rine.{MOVED_MODULES[name]}"))


def install_moved_module_aliases() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def lazy_reexport(package: str, target: str):
    """`__getattr__`/`__dir__` for a package that answers for the module it replaced.

    `rine.evaluation` was one module and is now a package: `rine.evaluation.evaluate` must
    still work, but importing `rine.evaluation.metrics` must not load the whole engine (and
    torch) on the way, as a star import in `__init__` would."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        module = importlib.import_module(target)
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    def __dir__() -> list[str]:
        return sorted(set(sys.modules[package].__dict__) | set(dir(importlib.import_module(target))))

    return __getattr__, __dir__
