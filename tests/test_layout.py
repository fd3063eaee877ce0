"""The layout's promise, checked from the code's own imports: imports only go down the layers, and
no module imports itself back through others (no circle), at the top and inside every package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: The layers, top first. A module may import its own layer's modules and any layer below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("mock_server", "worker", "dicom_node", "healthcheck", "gunicorn.conf")),
    ("the production app", ("server",)),
    ("the HTTP front door", ("gateway",)),
    ("the reviewer's routes and page", ("inference.review",)),
    ("front doors' machinery", ("inference.jobs", "inference.http", "inference.radiomics", "inference.users")),
    ("handlers", ("handlers",)),
    ("PACS spool, routing, outbox, delivery", ("inference.pacs",)),
    ("the pipeline", ("inference.pipeline",)),
    ("protocol, DICOM, imaging", ("inference.protocol", "inference.dicom", "inference.imaging")),
    ("the storage layer", ("inference.storage",)),
    ("ground floor", ("inference.config", "inference.disk_space", "inference.errors", "inference.folders",
                      "inference.logs", "inference.metrics", "inference.metrics_dir", "inference.paths",
                      "inference.audit", "inference")),
    # the models are a library of their own: trained, evaluated and served without the gateway, so they sit under it
    ("models", ("models",)),
]
#: Folders whose modules are not part of the product's layers (they may import anything above; docs/ holds the
#: site's generator).
OUTSIDE = ("tests", "bench", "inference-test-tool", "docs", "site", ".venv", ".git")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_modules() -> dict[str, Path]:
    """Every module of the product, by dotted name (``gunicorn.conf`` for gunicorn.conf.py)."""
    found = {}
    for path in PROJECT_ROOT.rglob("*.py"):
        relative = path.relative_to(PROJECT_ROOT)
        if relative.parts[0] in OUTSIDE or any(part.startswith(".") for part in relative.parts):
            continue
        found[module_name(path)] = path
    return found


MODULES = product_modules()


def layer_of(module: str) -> int:
    """The index of the layer ``module`` belongs to: the longest prefix that names it."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} belongs to no layer: add it to LAYERS in tests/test_layout.py")
    return best


def imported_modules(module: str, path: Path) -> set[str]:
    """The product modules ``module`` imports (anywhere in the file, functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in names if name in MODULES and name != module}


GRAPH = {module: imported_modules(module, path) for module, path in MODULES.items()}


def upward_imports(graph: dict[str, set[str]], module: str) -> dict[str, str]:
    """The imports of ``module`` that reach a layer above its own, with that layer's name."""
    own = layer_of(module)
    return {name: LAYERS[layer_of(name)][0] for name in graph[module] if layer_of(name) < own}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports (depth-first search), reported whole, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for name in sorted(graph[module]):
            if state.get(name) == 1:
                return path[path.index(name):] + [name]
            if name not in state and (cycle := visit(name)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down(module):
    upward = upward_imports(GRAPH, module)
    assert not upward, f"{module} ({LAYERS[layer_of(module)][0]}) imports from a layer above it: {upward}"


def test_models_import_nothing_of_the_gateway():
    """``models/`` trains, evaluates and registers models with no server: nothing of ``inference`` (nor above)."""
    upward = {module: sorted(name for name in GRAPH[module] if not name.startswith("models"))
              for module in MODULES if module == "models" or module.startswith("models.")}
    assert not {module: names for module, names in upward.items() if names}


def test_no_import_circle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checks_catch_an_upward_import_and_a_circle():
    """Made-up graphs: the pipeline importing a handler, and two modules importing each other."""
    assert upward_imports({"inference.pipeline.pipeline": {"handlers.mock"}}, "inference.pipeline.pipeline") == {
        "handlers.mock": "handlers"}
    assert find_cycle({"inference.jobs.api": {"inference.jobs.celery_backend"},
                       "inference.jobs.celery_backend": {"inference.jobs.api"}}) == [
        "inference.jobs.api", "inference.jobs.celery_backend", "inference.jobs.api"]


def test_no_utils_grab_bag_and_no_second_registry_module():
    assert not (PROJECT_ROOT / "utils").exists(), "utils/ went; put a helper in the layer it belongs to"
    names = [Path(module.replace(".", "/")).name for module in MODULES]
    duplicated = sorted({name for name in names if names.count(name) > 1} - {"", "__init__", "inference"})
    assert "registry" not in duplicated and "celery_jobs" not in duplicated, duplicated


def test_the_architecture_page_lists_every_module():
    """docs/architecture.md names every module of the product, so a newcomer finds each one there."""
    page = (PROJECT_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = sorted(str(path.relative_to(PROJECT_ROOT)) for path in MODULES.values()
                     if f"`{path.relative_to(PROJECT_ROOT)}`" not in page)
    assert not missing, f"docs/architecture.md does not list {missing}: add a line each, in its layer"
