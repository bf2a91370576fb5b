"""The ``docs/README.md`` and ``configs/logging.conf`` of an exported MONAI Bundle."""

from __future__ import annotations

from typing import Any

from voco_core import __version__

LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
"""Console logging for ``python -m monai.bundle run`` (MONAI warns when it is absent)."""


def bundle_readme(config, meta: dict[str, Any], intensity: str) -> str:
    """``docs/README.md``: what the model segments, its input (``intensity``: how it is
    normalised, in words), how to run it."""
    data = config.data
    classes = "\n".join(f"| {i} | {name} |" for i, name in enumerate(data.class_names))
    spacing = ("resample to " + " x ".join(f"{s:g}" for s in data.spacing) + " mm voxels "
               "(trilinear)" if data.spacing is not None else "keep the file's voxel spacing")
    crop = ("\n4. crop to the bounding box of the voxels above 0 after normalisation;"
            if data.crop_foreground else "")
    roi = " x ".join(map(str, config.train.roi_size))
    dice = meta["eval_metrics"]["mean_dice"]
    dice = f"{dice:.4f}" if isinstance(dice, float) else "not measured"
    return f"""# {meta['name']}

{meta['description']}

Exported by napari-voco {__version__} at training step {meta['voco']['step']}; best
validation mean Dice {dice}. Intended use: {meta['intended_use']}.

## Classes

| value | class |
|---|---|
{classes}

## Input

3-D NIfTI volumes (`*.nii`, `*.nii.gz`) with {meta['channels']} channel(s), whole
scans in any orientation and voxel spacing. Intensity: {intensity}.

## What the bundle does

1. reorient to RAS;
2. map intensities to [0, 1], channel by channel: {intensity};
3. {spacing};{crop}
5. SwinUNETR over sliding windows of {roi} voxels (overlap
   {config.train.sw_overlap:g}, gaussian weighting); softmax, argmax;
6. undo every spatial step (nearest neighbour), so `<name>_seg.nii.gz` lies on the
   input's own voxel grid with its affine, voxel for voxel.

This is what napari-voco's `voco predict` computes.

## Run it

Needs `pip install "monai>={meta['monai_version']}" nibabel fire` (`fire` for the
command line), not napari-voco. From this folder:

```bash
python -m monai.bundle run --config_file configs/inference.json \\
    --dataset_dir /path/to/images --output_dir /path/to/labels
```

Elsewhere, add `--bundle_root /path/to/this/bundle`. Other inputs: override the file
list, e.g. `--datalist "['/data/a.nii.gz', '/data/b.nii.gz']"`. From Python:

```python
from monai.bundle import run

run(config_file="BUNDLE/configs/inference.json", bundle_root="BUNDLE",
    dataset_dir="/path/to/images", output_dir="/path/to/labels")
```

The network alone (`models/model.pt` is a plain state dict):

```python
import torch
from monai.bundle import ConfigParser

parser = ConfigParser()
parser.read_config("BUNDLE/configs/inference.json")
network = parser.get_parsed_content("network_def")
network.load_state_dict(torch.load("BUNDLE/models/model.pt", weights_only=True))
```

Label maps are written as `uint8` NIfTI; the loop runs on CUDA when available.
"""

