"""The import rules of docs/architecture.md, checked on the source (with `ast`) and, for the
Flower-free packages, on what importing them really loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("fedssl", "server", "client", "simulations", "ops", "dashboard")
ENTRY_POINT = ROOT / "fedssl" / "cli.py"
ENTRY_POINT_MAY_USE = {"simulations", "ops", "dashboard"}  # inside its subcommand functions only

# package (or subpackage) -> what it may never import, at module level or inside a function
FORBIDDEN = {
    "fedssl": {"flwr", "server", "client", "simulations", "ops", "dashboard"},
    "server": {"client", "simulations", "ops", "dashboard"},
    "client": {"server", "simulations", "ops", "dashboard"},
    "ops": {"server", "simulations", "dashboard", "flwr"},
    "dashboard": {"flwr", "server", "client", "simulations"},
    # inside the science core data flows one way: records -> windows -> objective -> training
    "fedssl.data": {"fedssl.objectives", "fedssl.models", "fedssl.train", "fedssl.federated", "fedssl.privacy",
                    "fedssl.evaluate", "fedssl.baselines", "fedssl.report", "fedssl.export", "fedssl.cli"},
    "fedssl.objectives": {"fedssl.train", "fedssl.federated", "fedssl.privacy", "fedssl.evaluate",
                          "fedssl.baselines", "fedssl.report", "fedssl.export", "fedssl.cli"},
    # a site's own records, read and written by `fedssl node` where no training runs
    "client.audit": {"flwr", "torch"},
    "client.approval": {"flwr", "torch"},
}
# what `fedssl node` (status, approve) imports: it must load neither Flower nor torch
SITE_TOOLS = ("client.audit", "client.approval", "fedssl.plan", "fedssl.sitefile")


def imports(source: str) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) of every absolute import in `source`."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, in_function, child.lineno))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return found


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(path: Path, source: str) -> list[str]:
    """The imports of the file at `path` (in the project tree) that the rules above forbid."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    rules = [(package, banned) for package, banned in FORBIDDEN.items() if is_within(module, package)]
    found = []
    for imported, in_function, line in imports(source):
        for package, banned in rules:
            hit = next((b for b in banned if is_within(imported, b)), None)
            if hit is None:
                continue
            if path == ENTRY_POINT and in_function and hit in ENTRY_POINT_MAY_USE:
                continue
            where = "inside a function" if in_function else "at module level"
            found.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {imported} {where}")
    return found


def project_files() -> list[Path]:
    return sorted(p for package in PROJECT for p in (ROOT / package).rglob("*.py"))


def test_every_package_keeps_to_its_import_rules():
    found = [v for path in project_files() for v in violations(path, path.read_text())]
    assert found == [], "\n".join(found)


def test_test_modules_do_not_import_each_other():
    """Shared helpers and fixtures live in tests/conftest.py: a test module imported by another runs
    its module-level code twice and hides what the importing test depends on."""
    found = [f"{path.relative_to(ROOT)}:{line}: imports {imported}"
             for path in sorted((ROOT / "tests").glob("test_*.py"))
             for imported, _, line in imports(path.read_text())
             if imported.split(".")[-1].startswith("test_") or imported.startswith("tests.test_")]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("path, source, expected", [
    ("fedssl/report.py", "import flwr\n", ["fedssl imports flwr at module level"]),
    ("fedssl/report.py", "def f():\n    from ops.deploy import make_node_key\n", ["fedssl imports ops.deploy inside"]),
    ("fedssl/cli.py", "from simulations.run import check\n", ["fedssl imports simulations.run at module level"]),
    ("fedssl/cli.py", "def f():\n    from simulations.run import check\n", []),
    ("fedssl/cli.py", "def f():\n    import flwr\n", ["fedssl imports flwr inside"]),
    ("client/app.py", "from server.strategy import FedSSLStrategy\n", ["client imports server.strategy"]),
    ("client/app.py", "from fedssl.protocol import SITE_INDEX_KEY\n", []),
    ("server/validation.py", "def f():\n    import client.app\n", ["server imports client.app inside"]),
    ("dashboard/view.py", "from flwr.app import Message\n", ["dashboard imports flwr.app"]),
    ("fedssl/data/site.py", "from fedssl.objectives import build_objective\n",
     ["fedssl.data imports fedssl.objectives"]),
    ("fedssl/objectives/cpc.py", "from fedssl.train import train_local\n", ["fedssl.objectives imports fedssl.train"]),
    ("ops/node.py", "from fedssl.sitefile import load_site_file\nfrom client.audit import read_audit\n", []),
    ("ops/coordinator.py", "def f():\n    from server.strategy import check_federation\n", ["ops imports server.strategy"]),
    ("ops/coordinator.py", "import flwr\n", ["ops imports flwr"]),
    ("simulations/run.py", "import flwr\nfrom server.app import check_federation\n", []),
    ("client/audit.py", "def f():\n    import torch\n", ["client.audit imports torch inside"]),
    ("client/site_round.py", "import torch\n", []),
])
def test_the_rules_catch_what_they_forbid(path, source, expected):
    found = violations(ROOT / path, source)
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found)), found


CHECK = """
import importlib, pkgutil, sys
for package in sys.argv[1:]:
    root = importlib.import_module(package)
    for module in pkgutil.walk_packages(root.__path__, package + "."):
        importlib.import_module(module.name)
print(sorted(name for name in sys.modules if name.split(".")[0] == "flwr"))
"""


def test_fedssl_and_the_dashboard_load_no_flower():
    """fedssl/ must run where no federation framework is installed, and the dashboard only reads
    run folders: importing every module of both loads no Flower module, directly or through
    anything they import."""
    out = subprocess.run([sys.executable, "-c", CHECK, "fedssl", "dashboard"], capture_output=True, text=True,
                         check=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_site_tools_load_neither_flower_nor_torch():
    """`fedssl node status` and `approve` read a site's audit log and plans on a machine at rest:
    importing what they use loads no Flower and no torch, directly or through anything it imports."""
    check = ("import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
             "print(sorted({name.split('.')[0] for name in sys.modules} & {'flwr', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", check, *SITE_TOOLS], capture_output=True, text=True, check=True,
                         timeout=120, cwd=ROOT)
    assert out.stdout.strip() == "[]"
