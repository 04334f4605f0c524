"""The wheel a user installs holds every module and declares every third-party import."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import ROOT

STDLIB = set(sys.stdlib_module_names)
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"consul": "py-consul", "prometheus_client": "prometheus-client"}
OPTIONAL = {"opentelemetry"}  # imported lazily, only for the [otlp] extra


def test_wheel_contains_every_module_and_requires_every_import(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("micro_sidecar-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            re.match(r"[A-Za-z0-9._-]+", line.split(":", 1)[1].strip()).group(0).lower()  # type: ignore[union-attr]
            for line in zf.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        ]
    sources = sorted((ROOT / "sidecar").rglob("*.py"))
    for source in sources:
        assert str(source.relative_to(ROOT)) in names, f"{source.relative_to(ROOT)} is missing from the wheel"

    imported = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - STDLIB - {"sidecar", "__future__"} - OPTIONAL
    for module in sorted(third_party):
        dist = DISTRIBUTIONS.get(module, module).lower()
        assert dist in requires, f"{module} ({dist}) is not in install_requires"
