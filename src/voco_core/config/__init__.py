"""Typed configuration: one source of truth for every hyper-parameter.

Defaults are the authors'; presets (:data:`PRESETS`, :data:`FINETUNE_PRESETS`)
change only what differs. A config round-trips through YAML/JSON
(:func:`load_pretrain_config`, :func:`load_finetune_config`, ``.save``) and takes
``section.field=value`` overrides (:func:`apply_overrides`, the CLI's ``--set``).
``validate`` runs on every load and raises :class:`~voco_core.errors.VoCoConfigError`
naming the field.

- :mod:`voco_core.config.common`: shared machinery (type coercion, presets, merge,
  overrides, device, file reading) and :class:`RunConfig`;
- :mod:`voco_core.config.pretrain`: :class:`PretrainConfig` (``voco pretrain``);
- :mod:`voco_core.config.finetune`: :class:`FinetuneConfig` (``voco finetune``).
"""

from voco_core.config.common import (
    ConfigFile,
    RunConfig,
    Size3,
    merge,
    parse_override,
    read_config_file,
    resolve_device,
)
from voco_core.config.finetune import (
    FINETUNE_PRESETS,
    FinetuneConfig,
    SegDataConfig,
    SegModelConfig,
    SegTrainConfig,
    finetune_config_from_dict,
    load_finetune_config,
    make_finetune_config,
)
from voco_core.config.pretrain import (
    PRESETS,
    AugmentConfig,
    DataConfig,
    GeometryConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    apply_overrides,
    load_pretrain_config,
    make_pretrain_config,
    pretrain_config_from_dict,
)

__all__ = [
    "FINETUNE_PRESETS",
    "PRESETS",
    "AugmentConfig",
    "ConfigFile",
    "DataConfig",
    "FinetuneConfig",
    "GeometryConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RunConfig",
    "SegDataConfig",
    "SegModelConfig",
    "SegTrainConfig",
    "Size3",
    "apply_overrides",
    "finetune_config_from_dict",
    "load_finetune_config",
    "load_pretrain_config",
    "make_finetune_config",
    "make_pretrain_config",
    "merge",
    "parse_override",
    "pretrain_config_from_dict",
    "read_config_file",
    "resolve_device",
]
