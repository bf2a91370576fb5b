"""Training loops: VoCo pretraining and SwinUNETR finetuning, as generators of events.

- :mod:`voco_core.train.events`: the event records both loops yield;
- :mod:`voco_core.train.common`: what both loops share (stop flag, schedule, AMP, RNG,
  backend settings, restoring a checkpoint);
- :mod:`voco_core.train.run_log`: ``log.jsonl``, TensorBoard and the run's figure;
- :mod:`voco_core.train.pretrain`, :mod:`voco_core.train.finetune`: the loops.
"""

from voco_core.train.events import FinetuneEvent, PretrainEvent, TrainEvent
from voco_core.train.finetune import FinetuneResult, finetune, iter_finetune
from voco_core.train.pretrain import PretrainResult, iter_pretrain, pretrain

__all__ = ["FinetuneEvent", "FinetuneResult", "PretrainEvent", "PretrainResult", "TrainEvent",
           "finetune", "iter_finetune", "iter_pretrain", "pretrain"]
