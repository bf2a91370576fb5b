"""docs/architecture.md names every module of both packages (with its one job)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def listed_modules() -> set[str]:
    """``package/relative/path.py`` of every module the architecture listing names: a
    line ``  path.py  what it does`` under ``src/<package>/``."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    listing = text[text.index("```\npyproject.toml"):text.index("## Data flow")]
    names, package = set(), None
    for line in listing.splitlines():
        top = re.match(r"src/(\w+)/", line)
        if top:
            package = top.group(1)
            continue
        if not line.startswith("  "):
            package = None
        entry = re.match(r"  (\S+\.py)\s", line + " ")
        if package and entry:
            names.add(f"{package}/{entry.group(1)}")
    return names


def test_every_module_is_in_the_architecture_page():
    modules = {str(path.relative_to(ROOT / "src"))
               for path in (ROOT / "src").rglob("*.py")}
    listed = listed_modules()
    assert not modules - listed, f"add to docs/architecture.md: {sorted(modules - listed)}"
    assert not listed - modules, f"gone from src/: {sorted(listed - modules)}"
