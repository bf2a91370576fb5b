"""The npe2 manifest is installed with the package and validates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("npe2")


def test_npe2_validate_accepts_the_installed_manifest():
    npe2 = shutil.which("npe2", path=str(Path(sys.executable).parent)) or "npe2"
    result = subprocess.run([npe2, "validate", "napari-voco"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_manifest_found_through_entry_point():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-voco")
    assert manifest.name == "napari-voco"
    assert manifest.display_name == "VoCo"


def test_widgets_are_in_napari_contributable_menus():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-voco")
    widgets = {w.display_name for w in manifest.contributions.widgets}
    assert widgets == {"VoCo positions", "VoCo segment", "VoCo pretrain", "VoCo finetune"}
    menus = manifest.contributions.menus
    assert {m.command for m in menus["napari/layers/segment"]} >= {
        "napari-voco.segment_widget", "napari-voco.finetune_widget"}
    assert [m.command for m in menus["napari/layers/visualize"]] == [
        "napari-voco.positions_widget"]
