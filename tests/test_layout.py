"""The science core stays free of Flower: fedssl/ must run where no federation framework is installed."""

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys, fedssl
for module in pkgutil.walk_packages(fedssl.__path__, "fedssl."):
    importlib.import_module(module.name)
print(sorted(name for name in sys.modules if name.split(".")[0] == "flwr"))
"""


def test_fedssl_imports_no_flower():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
