"""Loads the Consul test agent package, ``tests/consul_agent/``, for code that loads it by path.

``import tests.consul_agent`` always finds the package, never this file: a package wins over a
module of the same name. This file exists for tests/pyconsul/pyconsul_agent_plugin.py, which
loads ``tests/consul_agent.py`` by path because under py-consul's suite ``tests`` is py-consul's
package. It loads the package by path under a name of its own and takes over its public names.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load_package() -> ModuleType:
    directory = Path(__file__).with_suffix("")
    name = f"{__name__}_package"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, directory / "__init__.py", submodule_search_locations=[str(directory)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


_package = _load_package()
globals().update({name: getattr(_package, name) for name in _package.__all__})
