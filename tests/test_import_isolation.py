"""voco_core must import on a headless server: no Qt, no napari, anywhere."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import voco_core

GUI_PACKAGES = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt",
                "vispy", "npe2", "napari_voco"}


def test_importing_every_voco_core_module_loads_no_gui_package():
    modules = [m.name for m in pkgutil.walk_packages(voco_core.__path__, "voco_core.")
               if not m.name.endswith("__main__")]
    assert "voco_core.data.io" in modules and "voco_core.cli" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(GUI_PACKAGES)!r})\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "", f"voco_core pulled in GUI modules: {result.stdout}"


def test_voco_core_source_never_names_a_gui_package():
    root = Path(voco_core.__file__).parent
    for source in root.rglob("*.py"):
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in GUI_PACKAGES, f"{source}: imports {name}"
