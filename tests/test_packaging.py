"""How the project installs: the library and, beside it, the Prefect folder flows/ as the package
xtec_flows_prefect (never a top-level "flows"); data flows one way, so the library imports
neither the flows nor anything above itself."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import xtec_flows

LIBRARY = Path(xtec_flows.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(LIBRARY.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            else:
                names.add(node.module)
    return names


def test_the_flows_install_as_xtec_flows_prefect_not_as_flows():
    top_level = importlib.metadata.packages_distributions()
    assert "xtec-flows" in top_level.get("xtec_flows_prefect", [])
    assert "xtec-flows" not in top_level.get("flows", [])


def test_serve_finds_the_prefect_side_through_its_entry_point():
    from xtec_flows.cli import _serving_plugin

    serving = _serving_plugin()
    assert serving.__name__ == "xtec_flows_prefect.serve"
    assert callable(serving.serve) and serving.ServeConfig.__name__ == "ServeConfig"


def test_the_library_never_imports_the_flows():
    offenders = {}
    for path in LIBRARY.rglob("*.py"):
        bad = sorted(n for n in _imports(path) if n.split(".")[0] in ("flows", "xtec_flows_prefect"))
        if bad:
            offenders[str(path.relative_to(LIBRARY.parent))] = bad
    assert offenders == {}


def test_the_tiled_plugin_does_not_import_the_cli_or_the_demo():
    # one way: volume -> engine -> tiled; the CLI and the demo sit on top
    offenders = {}
    for path in (LIBRARY / "tiled").glob("*.py"):
        bad = sorted(n for n in _imports(path) if n.startswith(("xtec_flows.cli", "xtec_flows.demo")))
        if bad:
            offenders[path.name] = bad
    assert offenders == {}
