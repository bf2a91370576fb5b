"""Training loops: VoCo pretraining (finetuning follows in a later issue)."""

from voco_core.train.pretrain import PretrainEvent, PretrainResult, iter_pretrain, pretrain

__all__ = ["PretrainEvent", "PretrainResult", "iter_pretrain", "pretrain"]
