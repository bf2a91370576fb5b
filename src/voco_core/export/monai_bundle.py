"""A MONAI Bundle of a finetuning checkpoint: ``configs/inference.json`` and
``configs/metadata.json`` as Python dicts, and :func:`write_bundle`.

``inference.json`` reproduces :func:`voco_core.inference.segment` with MONAI
components only: ``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd`` (RAS),
the intensity normalisation, channel by channel (``ScaleIntensityRanged`` for
``ct``, ``ScaleIntensityRangePercentilesd`` for ``percentile``; for ``auto`` a
``Lambdad`` choosing between the two with the air test of
:func:`voco_core.data.intensity.looks_like_hounsfield`), then ``Spacingd`` when
``data.spacing`` is set and ``CropForegroundd`` when ``data.crop_foreground`` is;
``SlidingWindowInferer`` (gaussian, the run's ROI, overlap and window batch);
``Activationsd`` softmax, ``AsDiscreted`` argmax, ``Invertd`` (nearest neighbour)
back onto the input's voxel grid, ``SaveImaged`` ``<name>_seg.nii.gz``. Its loop is a
plain bundle expression rather than ignite's ``SupervisedEvaluator``, so MONAI and
nibabel are all it needs (no napari-voco, no pytorch-ignite).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

from voco_core import __version__
from voco_core.errors import VoCoDataError
from voco_core.export.bundle_docs import LOGGING_CONF, bundle_readme
from voco_core.outputs import write_through_file
from voco_core.run_folder import RunFolder

BUNDLE_VERSION = "0.1.0"
META_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
               "0.8.1/meta_schema_20240725.json")
DEFAULT_AUTHORS = "unknown (exported with napari-voco; set the model's authors here)"
DEFAULT_LICENSE = ("unspecified: the weights were trained by the user of napari-voco on "
                   "their own data; its owner sets the terms")


@dataclass
class ExportResult:
    """Where the bundle went, the checkpoint it came from and what it segments."""

    path: Path
    checkpoint: Path
    class_names: tuple[str, ...]
    intensity: str
    """e.g. ``"auto (CT window -175..250 HU or percentiles 0.5..99.5, per volume)"``."""


def intensity_text(data) -> str:
    """How a run's ``data.intensity`` maps the image to [0, 1], in words."""
    from voco_core.data.intensity import describe_intensity

    if data.intensity == "auto":
        return (f"auto ({describe_intensity('ct', data)} when at least 0.5% of the voxels "
                f"lie below -500 HU, else {describe_intensity('percentile', data)}; "
                "decided per volume)")
    return describe_intensity(data.intensity, data)


def _intensity_steps(data) -> tuple[dict[str, Any], dict[str, Any]]:
    """(bundle items the step refers to, the pre-processing step) for ``data.intensity``.

    Every channel of ``(C, X, Y, Z)`` is normalised on its own, as
    :class:`voco_core.data.intensity.NormaliseIntensityd` does. ``auto`` is its rule as
    bundle expressions: at most about a million voxels, evenly strided over the
    flattened channel, are looked at; CT when >= 0.5% of them are below -500 HU."""
    from voco_core.data.intensity import AIR_FRACTION, AIR_HU, SAMPLE_VOXELS

    (low, high), (p_low, p_high) = data.ct_window, data.percentiles
    window = {"a_min": float(low), "a_max": float(high), "b_min": 0.0, "b_max": 1.0,
              "clip": True}
    percentiles = {"lower": float(p_low), "upper": float(p_high), "b_min": 0.0, "b_max": 1.0,
                   "clip": True}
    if data.intensity == "ct":
        return {}, {"_target_": "ScaleIntensityRanged", "keys": "image", **window}
    if data.intensity == "percentile":  # each channel its own percentiles
        return {}, {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image",
                    "channel_wise": True, **percentiles}
    items = {
        "ct_window": {"_target_": "ScaleIntensityRange", **window},
        "percentile_window": {"_target_": "ScaleIntensityRangePercentiles", **percentiles},
        "looks_like_ct": (f"$lambda x: bool((torch.as_tensor(x).reshape(-1)[::max(1, x.numel() "
                          f"// {SAMPLE_VOXELS})] < {AIR_HU}).double().mean() >= "
                          f"{AIR_FRACTION})"),
    }
    step = {"_target_": "Lambdad", "keys": "image", "func": "@normalise_channels"}
    items["normalise_channel"] = ("$lambda x: @ct_window(x) if @looks_like_ct(x) else "
                                  "@percentile_window(x)")
    # (C, X, Y, Z): decided channel by channel (a CT channel beside a PET channel)
    items["normalise_channels"] = ("$lambda x: @normalise_channel(x) if x.shape[0] == 1 else "
                                   "torch.cat([@normalise_channel(x[c:c + 1]) for c in "
                                   "range(x.shape[0])])")
    return items, step


def inference_config(config) -> dict[str, Any]:
    """``configs/inference.json`` for a finetuning config (see the module doc)."""
    from voco_core.data.io import RAS_LABELS

    data, model, train = config.data, config.model, config.train
    intensity_items, intensity_step = _intensity_steps(data)
    preprocessing: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        # nibabel's axis labels (MONAI's default, named: MONAI warns that it changes)
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS",
         "labels": [list(axis) for axis in RAS_LABELS]},
        intensity_step,
    ]
    if data.spacing is not None:
        preprocessing.append({"_target_": "Spacingd", "keys": "image",
                              "pixdim": [float(s) for s in data.spacing], "mode": "bilinear"})
    if data.crop_foreground:
        preprocessing.append({"_target_": "CropForegroundd", "keys": "image",
                              "source_key": "image", "select_fn": "@foreground",
                              "allow_smaller": True})
    label_dtype = "$numpy.uint8" if data.num_classes < 256 else "$numpy.int32"
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "model_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "datalist": ("$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) "
                     "+ glob.glob(os.path.join(@dataset_dir, '*.nii')))"),
        "network_def": {
            "_target_": "SwinUNETR", "in_channels": data.image_channels,
            "out_channels": int(data.num_classes), "feature_size": int(model.feature_size),
            "depths": list(model.depths), "num_heads": list(model.num_heads),
            "dropout_path_rate": float(model.dropout_path_rate), "use_checkpoint": False,
            "spatial_dims": 3, "use_v2": bool(model.use_v2)},
        "network": "$@network_def.to(@device)",
        **intensity_items,
        # voco's foreground: voxels above 0 after normalisation; all when there are none
        "foreground": "$lambda x: (x > 0) if bool((x > 0).any()) else torch.ones_like(x > 0)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(train.roi_size),
                    "sw_batch_size": int(train.sw_batch_size),
                    "overlap": float(train.sw_overlap), "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
             "orig_keys": "image", "nearest_interp": True, "to_tensor": True, "device": "cpu"},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
             "output_postfix": "seg", "output_ext": ".nii.gz", "output_dtype": label_dtype,
             "resample": False, "separate_folder": False}]},
        # torch.no_grad() as a decorator: no autograd graph, and no global switch left
        # behind when the bundle runs inside another program (monai.bundle.run)
        "segment_case": ("$torch.no_grad()(lambda case: @postprocessing({'image': case['image'],"
                         " 'pred': @inferer(case['image'].as_tensor()[None].to(@device), "
                         "@network)[0].float().cpu()}) and None)"),
        "initialize": [
            "$@network.load_state_dict(torch.load(@model_path, map_location=@device, "
            "weights_only=True))",
            "$@network.eval()"],
        "run": ["$[@segment_case(case) for case in @dataset] or print('no *.nii or "
                "*.nii.gz files in', @dataset_dir)"],
    }


def _version(package: str) -> str:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return "unknown"


def bundle_metadata(config, state: dict, *, run_name: str, authors: str | None = None,
                    license: str | None = None) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's required keys, plus ``spacing_mm``,
    ``channels`` and a ``voco`` section with the run's pre-processing settings."""
    import monai
    import numpy
    import torch

    from voco_core.outputs import json_safe

    data, train = config.data, config.train
    names = list(data.class_names)
    channels = data.image_channels
    classes = ", ".join(names[1:])
    best_dice = state.get("best_dice")
    patch = list(train.roi_size)
    if data.intensity == "ct":
        image_format, modality, source_range = "hounsfield", "CT", list(data.ct_window)
    else:
        image_format, modality, source_range = "magnitude", (
            "MR" if data.intensity == "percentile" else "CT or MR (decided per volume)"), []
    return json_safe({
        "schema": META_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by napari-voco {__version__} from {run_name} "
                                      f"(step {state.get('step')})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": _version("nibabel")},
        "name": f"{run_name} SwinUNETR segmentation",
        "task": f"3-D segmentation of {classes}",
        "description": (f"MONAI SwinUNETR (feature size {config.model.feature_size}) finetuned "
                        f"with napari-voco to segment {classes} ({len(names)} classes with "
                        f"background); input intensity: {intensity_text(data)}."),
        "authors": authors or DEFAULT_AUTHORS,
        "copyright": authors or DEFAULT_AUTHORS,
        "license": license or DEFAULT_LICENSE,
        "data_type": "nifti",
        "image_classes": f"{channels} channel(s), intensity mapped to [0, 1]: "
                         f"{intensity_text(data)}",
        "pred_classes": ", ".join(f"{i} {name}" for i, name in enumerate(names)),
        "eval_metrics": {"mean_dice": best_dice},
        "intended_use": "research only; not validated for clinical use",
        "spacing_mm": list(data.spacing) if data.spacing is not None else None,
        "channels": channels,
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": image_format, "modality": modality,
                "num_channels": channels, "spatial_shape": patch, "dtype": "float32",
                "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {str(c): "image" if channels == 1 else f"channel {c}"
                                for c in range(channels)},
                "source_value_range": source_range}},
            "outputs": {"pred": {
                "type": "image", "format": "labels", "num_channels": len(names),
                "modality": "n/a", "spatial_shape": patch, "dtype": "float32",
                "value_range": [], "is_patch_data": True,
                "channel_def": {str(i): name for i, name in enumerate(names)}}},
        },
        "voco": {"voco_version": __version__, "step": state.get("step"),
                 "best_dice": best_dice, "best_step": state.get("best_step"),
                 "intensity": data.intensity, "ct_window": list(data.ct_window),
                 "percentiles": list(data.percentiles), "crop_foreground": data.crop_foreground,
                 "roi_size": patch, "sw_overlap": train.sw_overlap,
                 "sw_batch_size": train.sw_batch_size},
    })


@dataclass
class FinetunedRun:
    """A loaded finetuning checkpoint: its file, its payload, its config."""

    checkpoint: Path
    state: dict
    config: Any

    @property
    def name(self) -> str:
        """The run folder's name (``RUN/checkpoints/best.pt``), else the file's stem."""
        return RunFolder.name_of(self.checkpoint)


def read_finetuned_run(run: str | Path) -> FinetunedRun:
    """A finetuning run folder (its ``best.pt``, else ``last.pt``) or checkpoint file,
    loaded and checked (typed one-line errors naming the file)."""
    from voco_core.checkpoint import (
        find_segmentation_checkpoint,
        load_segmentation_checkpoint,
        saved_config,
    )

    source = find_segmentation_checkpoint(run)
    state = load_segmentation_checkpoint(source)
    config = saved_config(state, "finetune", source)
    if not isinstance(state.get("model"), dict):
        raise VoCoDataError("missing key 'model' (the network's weights)", source)
    return FinetunedRun(source, state, config)


def write_bundle(folder: Path, run: FinetunedRun, *, authors: str | None = None,
                 license: str | None = None) -> ExportResult:
    """Write a MONAI Bundle of ``run`` into the existing empty ``folder``, then check
    that the bundle's ``network_def`` loads ``models/model.pt`` strictly."""
    import torch

    source, state, config = run.checkpoint, run.state, run.config
    meta = bundle_metadata(config, state, run_name=run.name, authors=authors, license=license)
    inference = inference_config(config)
    for sub in ("configs", "models", "docs"):
        (folder / sub).mkdir()
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    (folder / "configs" / "logging.conf").write_text(LOGGING_CONF)
    weights = {k: v.detach().cpu() for k, v in state["model"].items()}
    # into an open file, so a full disk is an OSError (ENOSPC), not torch's assertion
    write_through_file(lambda file: torch.save(weights, file))(folder / "models" / "model.pt")
    (folder / "docs" / "README.md").write_text(bundle_readme(config, meta,
                                                              intensity_text(config.data)))
    (folder / "docs" / "license.txt").write_text((license or DEFAULT_LICENSE) + "\n")
    _check_network(folder, source)
    return ExportResult(folder, source, tuple(config.data.class_names),
                        intensity_text(config.data))


def _check_network(folder: Path, source: Path) -> None:
    """The bundle's own ``network_def`` must take ``model.pt`` with no key or shape
    left over (what ``monai.bundle run`` will do first)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    try:
        network.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    except RuntimeError as err:
        raise VoCoDataError(f"its weights do not fit the bundle's SwinUNETR "
                            f"({str(err).splitlines()[0]})", source) from err


