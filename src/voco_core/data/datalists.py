"""Datalists: which volumes (and label maps) a folder or a Decathlon-style JSON lists.

:func:`load_datalist` accepts a Decathlon-style JSON (``{"training": [{"image":
..., "label": ...}]}``, paths relative to the JSON's folder; ``"image"`` may be a
list of channel files, as in BraTS) or a folder. A folder is read as: its
``dataset.json`` if it has one; else ``imagesTr/`` (with labels paired by file name
from ``labelsTr/`` when that exists); else every volume directly inside it, sorted
by name. A folder's volumes are its NIfTI, NRRD and MetaImage files and its
subfolders holding DICOM files (one series each); a JSON entry may name any of
these, a DICOM series by its folder. :func:`read_dataset_json` and
:func:`dataset_class_names` read the Decathlon JSON's other fields (``validation``,
the ``labels`` names); :func:`resolve_in_channels` checks that a data set's images
agree on their channel count.

Listing checks that every file exists (a broken or looping symbolic link is named as
such); the volumes are read later, by :func:`voco_core.data.io.read_volume`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from voco_core.data.readers.nifti import require_file
from voco_core.data.readers.sources import require_volume_source, volume_sources
from voco_core.errors import VoCoDataError


def is_channel_list(source) -> bool:
    """True when ``source`` is a list/tuple of files (one image's channel files)."""
    return isinstance(source, list | tuple)


@dataclass(frozen=True)
class DatalistEntry:
    """One training case: an image and, for finetuning, its label map.

    ``image`` is one file (3-D, or 4-D with channels last) or a tuple of channel files
    on one voxel grid (a Decathlon ``"image": [...]`` list, as BraTS has)."""

    image: Path | tuple[Path, ...]
    label: Path | None = None

    @property
    def image_file(self) -> Path:
        """The image's (first) file: what messages name."""
        return first_file(self.image)


def first_file(image: str | Path | Sequence[str | Path]) -> Path:
    """The file an image source is named by: itself, or the first of its channel files."""
    return Path(image[0]) if is_channel_list(image) else Path(image)


def resolve_in_channels(channels: Sequence[tuple[str | Path, int]], configured: int) -> int:
    """The channel count of a data set: every volume's (``(file, channels)`` pairs, in
    data order) must equal the first one's, else a :class:`VoCoDataError` naming the
    first volume that differs; and ``configured`` (``data.in_channels``; 0: not set)
    must be 0 or that count, else a :class:`VoCoConfigError` (the count comes from
    the data, the field only records it)."""
    from voco_core.errors import VoCoConfigError

    first, expected = channels[0]
    for source, count in channels:
        if count != expected:
            raise VoCoDataError(f"image has {count} channel(s), expected {expected} like the "
                                f"first volume {Path(first).name} (every volume must have "
                                "the same channels)", source)
    if configured and configured != expected:
        raise VoCoConfigError(
            f"data.in_channels = {configured} does not match the data, whose volumes have "
            f"{expected} channel(s) (e.g. {first}): the channel count is read from the data "
            "(leave data.in_channels at 0); a resumed or continued run needs data with the "
            "channels it was trained on")
    return expected


def load_datalist(
    source: str | Path, *, section: str = "training", require_labels: bool = False
) -> list[DatalistEntry]:
    """List the cases of a folder or a Decathlon-style JSON (see module doc).

    Checks that every listed file exists (a broken or looping symbolic link is
    named as such); it does not read them (that happens lazily, in
    :func:`read_volume`, with the same typed errors).
    """
    source = Path(source)
    _require_file_or_folder(source)
    if source.is_dir():
        json_path = _folder_dataset_json(source)
        if json_path is not None:
            return load_datalist(json_path, section=section, require_labels=require_labels)
        if (source / "imagesTr").is_dir():
            label_dir = source / "labelsTr"
            entries = [
                DatalistEntry(image, _paired_label(label_dir / image.name))
                for image in volume_sources(source / "imagesTr", "image")
            ]
            where = source / "imagesTr"
        else:
            entries = [DatalistEntry(image) for image in volume_sources(source, "image")]
            where = source
        if not entries:
            raise VoCoDataError("no NIfTI files (*.nii, *.nii.gz), NRRD (*.nrrd, *.nhdr) or "
                                "MetaImage (*.mha, *.mhd) files or DICOM series folders found "
                                "in this folder", where)
    else:
        entries = _read_json_datalist(source, section)
    if require_labels:
        for entry in entries:
            if entry.label is None:
                raise VoCoDataError("has no label map, but labels are required",
                                    entry.image_file)
    return entries


def read_dataset_json(data) -> dict:
    """The Decathlon-style JSON behind ``data``: ``data`` itself when it is a ``.json``
    path, the ``dataset.json`` of a folder, else (a NIfTI path, a folder without one,
    a list of entries) ``{}``.

    Raises :class:`VoCoDataError` naming the file when it is missing, unreadable,
    not JSON or not a JSON object.
    """
    if not isinstance(data, str | os.PathLike):
        return {}
    path = Path(data)
    if path.is_dir():
        path = _folder_dataset_json(path)
    elif path.suffix.lower() != ".json":
        path = None
    if path is None:
        return {}
    require_file(path, "datalist")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VoCoDataError(f"not a readable JSON datalist ({err})", path) from err
    if not isinstance(spec, dict):
        raise VoCoDataError(
            f"expected a JSON object (a Decathlon datalist), got a JSON {type(spec).__name__}",
            path,
        )
    return spec


def dataset_class_names(data) -> tuple[str, ...]:
    """Class names from the ``labels`` map of the JSON behind ``data`` (see
    :func:`read_dataset_json`), in class-index order; ``()`` when there is none.

    Both layouts are read: Decathlon ``{"0": "background", "1": "liver"}`` and
    nnU-Net v2 ``{"background": 0, "liver": 1}``. The indices must be exactly
    ``0 .. N-1``, else :class:`VoCoDataError` naming the JSON file.
    """
    labels = read_dataset_json(data).get("labels")
    if labels is None:
        return ()
    path = Path(data)
    return _class_names(labels, _folder_dataset_json(path) if path.is_dir() else path)


def _class_names(labels, path: Path) -> tuple[str, ...]:
    """``{index: name}`` or ``{name: index}`` -> names in index order (see above)."""
    expected = 'a "labels" object like {"0": "background", "1": "liver"}'
    if not isinstance(labels, dict) or not labels:
        raise VoCoDataError(f"expected {expected}, got {labels!r}", path)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        pairs = [(value, name) for name, value in labels.items()]  # nnU-Net v2 layout
    else:
        pairs = []
        for key, name in labels.items():
            if not str(key).isdigit() or not isinstance(name, str) or not name.strip():
                raise VoCoDataError(f"expected {expected}, got {key!r}: {name!r}", path)
            pairs.append((int(key), name))
    by_index = dict(pairs)
    if sorted(by_index) != list(range(len(pairs))):
        raise VoCoDataError(
            f'"labels" indices must be the classes 0..{len(pairs) - 1}, each once, '
            f"got {sorted(index for index, _ in pairs)}",
            path,
        )
    return tuple(str(by_index[i]) for i in range(len(pairs)))


def _require_file_or_folder(source: Path) -> None:
    if source.is_dir():
        return
    if not source.exists() and not source.is_symlink():
        raise VoCoDataError("datalist or data folder not found", source)
    require_file(source, "datalist")


def _folder_dataset_json(folder: Path) -> Path | None:
    """``folder/dataset.json`` when it is there (even as a broken link, to be named)."""
    path = folder / "dataset.json"
    return path if path.is_file() or path.is_symlink() else None


def _paired_label(label: Path) -> Path | None:
    """The label map paired with an ``imagesTr/`` image, None when there is none
    (a folder of that name: a DICOM series, checked when read)."""
    if not label.exists() and not label.is_symlink():
        return None
    require_volume_source(label, "label map")
    return label


def _read_json_datalist(path: Path, section: str) -> list[DatalistEntry]:
    if path.suffix.lower() != ".json":
        raise VoCoDataError("expected a data folder or a Decathlon-style .json datalist", path)
    spec = read_dataset_json(path)
    if not isinstance(spec.get(section), list):
        raise VoCoDataError(f'expected a JSON object with a "{section}" list', path)
    if not spec[section]:
        raise VoCoDataError(f'the "{section}" list is empty', path)
    entries = []
    for n, item in enumerate(spec[section]):
        if isinstance(item, str):
            item = {"image": item}
        image = item.get("image") if isinstance(item, dict) else None
        if not (isinstance(image, str) or (isinstance(image, list) and image
                                           and all(isinstance(f, str) for f in image))):
            raise VoCoDataError(
                f'{section}[{n}] must be a path or an object with an "image" path (or a '
                f"list of channel files), got {item!r}",
                path,
            )
        label = item.get("label")
        if label is not None and not isinstance(label, str):
            raise VoCoDataError(f'{section}[{n}]["label"] must be a path, got {label!r}', path)
        where = f"listed in {path.name} as {section}[{n}]"
        if isinstance(image, list):  # channel files of one image (BraTS: t1, t1c, t2, flair)
            image = tuple(_listed_file(path.parent / file, "image", where) for file in image)
            image = image[0] if len(image) == 1 else image
        else:
            image = _listed_file(path.parent / image, "image", where)
        entries.append(DatalistEntry(image, _listed_file(path.parent / label, "label map", where)
                                     if label else None))
    return entries


def _listed_file(file: Path, kind: str, where: str) -> Path:
    """``file`` (or DICOM series folder) checked (its message saying ``where`` it was
    listed) and made absolute."""
    require_volume_source(file, kind, where)
    return file.resolve()
