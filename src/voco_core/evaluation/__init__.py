"""Evaluating what pretraining does: paired statistics over seeds
(:mod:`voco_core.evaluation.stats`) and ``voco compare`` on the user's own labelled
cases (:mod:`voco_core.evaluation.compare`)."""

from voco_core.evaluation.compare import CompareSettings, compare, headline, k_folds

__all__ = ["CompareSettings", "compare", "headline", "k_folds"]
