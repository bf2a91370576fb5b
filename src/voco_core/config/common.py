"""Machinery shared by the pretraining and finetuning configs.

Typed dataclass sections are filled from nested dicts (:func:`_update`, with each
value coerced to the field's declared type), a config starts from a named preset
(:func:`_from_preset`), and a config file is read and written as YAML or JSON
(:func:`read_config_file`, :meth:`ConfigFile.save`). Every invalid value is a
:class:`~voco_core.errors.VoCoConfigError` naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from voco_core.errors import VoCoConfigError

Size3 = tuple[int, int, int]


class ChannelCount:
    """``image_channels`` for a data section with an ``in_channels`` field: the image
    channels, read from the data by the trainer and recorded in the run's config and
    checkpoints (the run's network and every later input must have them). Not a
    setting: 0 (unset) lets the trainer fill it in, another value that the data
    contradict is refused; configs and checkpoints written before multi-channel
    support lack the field and mean 1."""

    in_channels: int

    @property
    def image_channels(self) -> int:
        """The network's input channels: ``in_channels``, or 1 where it is unset (0: a
        config not yet filled in by a trainer, or one saved before the field existed)."""
        return self.in_channels or 1


class ConfigFile:
    """Mixin of the top-level config dataclasses: plain-dict view and atomic save."""

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, numbers, strings): JSON/YAML and ``weights_only`` safe."""
        return json.loads(json.dumps(asdict(self)))

    def save(self, path: str | Path) -> Path:
        """Write YAML (JSON for a ``.json`` path) through a temporary file, so a crash
        never leaves half a config."""
        path = Path(path)
        text = (json.dumps(self.to_dict(), indent=2) if path.suffix == ".json"
                else yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``."""
    output_dir: str = "runs/voco"
    checkpoint_every: int = 1000
    """Optimizer steps between checkpoints (one is also written at the end and on stop)."""
    log_every: int = 10
    """Optimizer steps between JSON-lines/TensorBoard records (progress events: every step)."""
    tensorboard: bool = True
    deterministic: bool = False
    """Bit-reproducible runs. On CPU: no oneDNN (its multi-threaded convolution backward
    sums in a varying order) and one intra-op thread (other threaded reductions vary
    when the machine is busy), so CPU steps are slower. On CUDA:
    deterministic cuDNN, no autotuning. Without it, repeated runs agree to float
    rounding (~1e-4 in the loss after a few steps), and so does a resumed run with
    the uninterrupted one."""
    cpu_allocator: Literal["retain", "system"] = "retain"
    """On CPU, ``retain``: glibc keeps freed memory for reuse during training
    (about 2x faster steps, higher peak memory; see voco_core.memory). ``system``:
    leave malloc as it is (e.g. when preloading jemalloc)."""
    compile: bool = False
    """``torch.compile`` the networks' forward passes (``nn.Module.compile``: the
    weights' names, and so the checkpoints, stay as they are): pretraining's student
    backbone (and the ``full`` teacher's), finetuning's SwinUNETR. Off by default:
    on a small CPU, compiling the tiny backbone takes longer than a whole demo run
    (docs/benchmarks.md)."""



def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise VoCoConfigError(f"{name} = {value!r} is invalid: expected {expected}")


_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(spec: str):
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a :class:`torch.device`, or raise.

    ``auto`` picks CUDA when available, else CPU. Asking for CUDA/MPS on a machine
    without it is a :class:`VoCoConfigError`, not a crash later.
    """
    import torch

    spec = str(spec).strip().lower()
    if not _DEVICE_PATTERN.match(spec):
        raise VoCoConfigError(
            f"run.device = {spec!r} is invalid: expected auto, cpu, cuda, cuda:N or mps")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VoCoConfigError(
                f"run.device = {spec!r}, but CUDA is not available on this machine "
                "(no NVIDIA GPU or a CPU-only torch build); use --device cpu or auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise VoCoConfigError(
                f"run.device = {spec!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise VoCoConfigError("run.device = 'mps', but Apple MPS is not available here")
    return torch.device(spec)



def _type_name(annotation: Any) -> str:
    """``int``, ``'auto'``, ``'a' or 'b'``: how an error names an accepted type."""
    if typing.get_origin(annotation) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML/JSON/CLI value to the dataclass field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        # The first member the value converts to: `int | Literal["auto"]` takes 4 or "auto".
        for member in inner[:-1]:
            try:
                return _coerce(value, member, name)
            except VoCoConfigError:
                continue
        try:
            return _coerce(value, inner[-1], name)
        except VoCoConfigError:
            if len(inner) == 1:
                raise
            raise VoCoConfigError(f"{name} = {value!r} is invalid: expected "
                                  f"{' or '.join(_type_name(a) for a in inner)}") from None
    if origin is Literal:
        if value not in args:
            raise VoCoConfigError(f"{name} = {value!r} is invalid: expected one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value.strip("()[] ")) if v]
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, list | tuple):
            return tuple(_coerce(v, args[0], name) for v in value)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise VoCoConfigError(f"{name} = {value!r} is invalid: expected {len(args)} values")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError):
        raise VoCoConfigError(
            f"{name} = {value!r} is invalid: expected {getattr(annotation, '__name__', annotation)}"
        ) from None
    return value


def _update(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    known = {f.name for f in fields(section)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise VoCoConfigError(f"unknown config field {name!r}; known: {sorted(known)}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise VoCoConfigError(f"{name} must be a mapping of fields, got {value!r}")
            _update(current, value, f"{name}.")
        else:
            setattr(section, key, _coerce(value, hints[key], name))



def _from_preset(cls, presets: dict, preset: str, overrides: dict[str, Any] | None,
                 check_device: bool):
    """``cls`` defaults, then ``presets[preset]``, then nested ``overrides``; validated."""
    if preset not in presets:
        raise VoCoConfigError(f"preset {preset!r} is unknown: expected one of {sorted(presets)}")
    config = cls(preset=preset)
    _update(config, copy.deepcopy(presets[preset]), "")
    if overrides:
        overrides = dict(overrides)
        overrides.pop("preset", None)
        _update(config, overrides, "")
    _require_finite(config, "")
    return config.validate(check_device=check_device)


def _require_finite(section: Any, prefix: str) -> None:
    """Refuse NaN and infinities anywhere in a config (``--set optim.lr=inf`` would
    otherwise pass ``> 0`` checks and train into non-finite weights)."""
    import math

    for field in fields(section):
        value, name = getattr(section, field.name), f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            _require_finite(value, f"{name}.")
            continue
        values = value if isinstance(value, tuple | list) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise VoCoConfigError(f"{name}: {value!r} is not a finite number")



def read_config_file(path: str | Path, from_dict) -> Any:
    """Read a YAML or JSON config file and build it with ``from_dict(values)``.

    Every error (missing or unreadable file, not a mapping, an invalid field) is one
    :class:`VoCoConfigError` line starting with the file's path.
    """
    path = Path(path)
    if not path.is_file():
        raise VoCoConfigError(f"{path}: config file not found")
    try:
        values = (json.loads(path.read_text()) if path.suffix == ".json"
                  else yaml.safe_load(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise VoCoConfigError(f"{path}: not a readable YAML/JSON config ({err})") from err
    if not isinstance(values, dict):
        raise VoCoConfigError(f"{path}: expected a mapping of config sections")
    try:
        return from_dict(values)
    except VoCoConfigError as err:
        raise VoCoConfigError(f"{path}: {err}") from err


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=3e-4"`` -> ``{"optim": {"lr": 3e-4}}`` (value parsed as JSON, else YAML)."""
    if "=" not in text:
        raise VoCoConfigError(f"--set {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    try:  # JSON first: YAML 1.1 reads "3e-4" as a string
        value = json.loads(raw)
    except json.JSONDecodeError:
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``extra`` wins); returns a new dict."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out

