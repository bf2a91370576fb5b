"""Where to look next: the network's uncertainty and the slices to review first.

After a round of correct-and-retrain the user's time is best spent on the slices
where the network is least sure. :func:`predictive_entropy` is the per-voxel
entropy of the softmax, ``-sum_c p_c log p_c`` in nats (0: certain; ``log C`` for
``C`` classes: uniform), from the ``(C, X, Y, Z)`` probabilities that
:func:`voco_core.inference.segment` returns with ``probabilities=True``.

:func:`rank_slices` orders the slices along one axis for review, *stratified by
class*, so that a large, easy class (background, a big organ) cannot fill the list
while a small structure goes unreviewed. For every slice ``s`` and class ``c``
the score is the mean entropy over the voxels of ``s`` predicted as ``c`` (slices
without such a voxel have no score for ``c``). The list is then built round by
round: in each round every class, in the order of its best remaining score, takes
its highest-scoring slice not taken yet; a slice is listed once, for the class that
took it. Annotated slices (the ones the user painted or accepted) are skipped. Ties
go to the lower slice index, so the order is deterministic.

:func:`suggest_slices` is what the finetune widget lists: the slices to annotate next
by one of :data:`REVIEW_STRATEGIES`, ``uncertainty`` (:func:`rank_slices`), ``random``
(foreground-aware random, :func:`random_slices`) or ``even`` (evenly spaced, nested,
:func:`spread_slices`). :data:`REVIEW_STRATEGY` is the one that measured best in
``benchmarks/review_bench.py`` (docs/benchmarks.md, "Where to look next").
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from voco_core.data.sparse import annotated_slices, slice_mask
from voco_core.errors import VoCoConfigError

REVIEW_STRATEGIES = ("uncertainty", "random", "even")
REVIEW_STRATEGY = "random"
"""The finetune widget's *Review next* rule: foreground-aware random measured best
(held-out Dice after two rounds of two slices, CT and MRI-like phantoms, paired seeds;
docs/benchmarks.md, "Where to look next")."""


class SliceScore(NamedTuple):
    """One row of :func:`rank_slices`: the slice ``index`` along the axis, its
    ``score`` (mean entropy in nats over the voxels of ``label`` in it) and the
    predicted class ``label`` it was chosen for."""

    index: int
    score: float
    label: int


def predictive_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Per-voxel entropy of the softmax: ``(C, X, Y, Z)`` -> ``(X, Y, Z)`` float32, nats.

    ``0 log 0`` counts as 0; the probabilities are used as given (a voxel whose
    channels do not sum to 1 is not renormalised)."""
    p = np.asarray(probabilities, dtype=np.float32)
    if p.ndim < 2:
        raise VoCoConfigError(f"probabilities need a class axis first, (C, X, Y, Z); got "
                              f"shape {p.shape}")
    entropy = np.zeros(p.shape[1:], dtype=np.float32)
    for channel in p:  # one class at a time: no (C, X, Y, Z) temporary
        positive = channel > 0
        entropy[positive] -= channel[positive] * np.log(channel[positive])
    return np.maximum(entropy, 0.0)


def slice_class_entropy(entropy: np.ndarray, prediction: np.ndarray, axis: int,
                        num_classes: int) -> np.ndarray:
    """Mean entropy per slice and predicted class: ``(slices, num_classes)``, NaN where
    a slice has no voxel of that class."""
    entropy = np.asarray(entropy, dtype=np.float64)
    prediction = np.asarray(prediction)
    if entropy.shape != prediction.shape:
        raise VoCoConfigError(f"entropy {entropy.shape} and prediction {prediction.shape} "
                              "need the same shape")
    if not -entropy.ndim <= axis < entropy.ndim:
        raise VoCoConfigError(f"axis must be one of 0..{entropy.ndim - 1}, got {axis}")
    num_classes = int(num_classes)
    labels = np.moveaxis(prediction, axis, 0).reshape(entropy.shape[axis], -1).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise VoCoConfigError(f"prediction holds class {int(labels.max())}, outside "
                              f"0..{num_classes - 1}")
    values = np.moveaxis(entropy, axis, 0).reshape(labels.shape)
    bins = (np.arange(labels.shape[0])[:, None] * num_classes + labels).ravel()
    size = labels.shape[0] * num_classes
    sums = np.bincount(bins, weights=values.ravel(), minlength=size)
    counts = np.bincount(bins, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return np.where(counts > 0, means, np.nan).reshape(labels.shape[0], num_classes)


def rank_slices(entropy: np.ndarray, prediction: np.ndarray, annotated=None, axis: int = 0,
                num_classes: int | None = None, limit: int | None = None) -> list[SliceScore]:
    """Slices along ``axis`` to review next, best first (the module's class-stratified
    round robin), as :class:`SliceScore` ``(index, score, label)`` rows.

    Args:
        entropy: ``(X, Y, Z)`` per-voxel uncertainty (:func:`predictive_entropy`).
        prediction: ``(X, Y, Z)`` predicted classes on the same grid.
        annotated: slices to skip (a bool mask per slice or indices); None: none.
        axis: the slicing axis (0: the axial slices of a volume opened in napari).
        num_classes: the network's classes (default: largest predicted value + 1).
        limit: at most this many rows (default: every slice that is not annotated).
    """
    prediction = np.asarray(prediction)
    if num_classes is None:
        num_classes = int(prediction.max()) + 1 if prediction.size else 1
    table = slice_class_entropy(entropy, prediction, axis, num_classes)
    size = table.shape[0]
    skip = slice_mask(annotated, size) if annotated is not None else np.zeros(size, bool)
    table[skip] = np.nan
    # per class: its candidate slices by descending score, ties by index
    queues = []
    for label in range(num_classes):
        column = table[:, label]
        slices = np.flatnonzero(np.isfinite(column))
        order = slices[np.lexsort((slices, -column[slices]))]
        queues.append([(int(s), float(column[s])) for s in order])
    heads = [0] * num_classes
    taken: set[int] = set()
    ranked: list[SliceScore] = []
    wanted = int(np.count_nonzero(~skip)) if limit is None else int(limit)
    while len(ranked) < wanted:
        candidates = []
        for label, queue in enumerate(queues):
            while heads[label] < len(queue) and queue[heads[label]][0] in taken:
                heads[label] += 1
            if heads[label] < len(queue):
                index, score = queue[heads[label]]
                candidates.append((-score, index, label))
        if not candidates:
            break
        for negative, index, label in sorted(candidates):  # this round, best first
            if index in taken:  # two classes' best slice is the same one: first wins
                continue
            taken.add(index)
            heads[label] += 1
            ranked.append(SliceScore(index, -negative, label))
            if len(ranked) >= wanted:
                break
    return ranked


def _free(foreground, annotated) -> tuple[np.ndarray, list[int]]:
    """The ``foreground`` mask (bool, one entry per slice) and its slice indices that
    are not ``annotated`` (a bool mask or indices, :func:`slice_mask`)."""
    foreground = np.asarray(foreground)
    if foreground.dtype != bool or foreground.ndim != 1:
        raise VoCoConfigError(f"foreground: expected a bool mask with one entry per slice, "
                              f"got {foreground.dtype} of shape {foreground.shape}")
    unannotated = foreground & ~slice_mask(annotated, foreground.size)
    return foreground, np.flatnonzero(unannotated).tolist()


def random_slices(foreground, annotated=None, limit: int | None = None,
                  rng: np.random.Generator | int = 0) -> list[int]:
    """Foreground-aware random: up to ``limit`` unannotated slices drawn uniformly
    without replacement from the ``foreground`` ones (a bool mask per slice), in the
    order drawn. ``rng``: a generator or a seed (same seed, same list)."""
    _, free = _free(foreground, annotated)
    if not free:
        return []
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    size = len(free) if limit is None else min(int(limit), len(free))
    return [int(i) for i in rng.choice(free, size=size, replace=False)]


def spread_slices(foreground, annotated=None, limit: int | None = None) -> list[int]:
    """Evenly spaced, nested: up to ``limit`` unannotated ``foreground`` slices (a bool
    mask per slice), each the one farthest from every annotated (or already chosen)
    slice, in the order chosen. The foreground's two ends count as annotated at half
    the distance, as in systematic sampling, whose end gaps are half the inner ones
    (otherwise the first picks would be the edge slices). Ties go to the lower index."""
    foreground, free = _free(foreground, annotated)
    if not free:
        return []
    extent = np.flatnonzero(foreground)
    low, high = extent[0] - 0.5, extent[-1] + 0.5
    taken = np.flatnonzero(slice_mask(annotated, foreground.size)).tolist()
    wanted = len(free) if limit is None else min(int(limit), len(free))
    chosen: list[int] = []

    def gap(s: int) -> float:
        return min([abs(s - t) for t in taken] + [2 * (s - low), 2 * (high - s)])

    while len(chosen) < wanted:
        best = max((s for s in free if s not in chosen), key=lambda s: (gap(s), -s))
        taken.append(best)
        chosen.append(best)
    return chosen


def suggest_slices(entropy: np.ndarray, prediction: np.ndarray, annotated=None,
                   axis: int = 0, num_classes: int | None = None, limit: int | None = None,
                   strategy: str = REVIEW_STRATEGY, foreground=None,
                   rng: np.random.Generator | int = 0) -> list[SliceScore]:
    """The slices to annotate next by ``strategy`` (:data:`REVIEW_STRATEGIES`), as
    :class:`SliceScore` rows in the order to review.

    ``uncertainty`` is :func:`rank_slices`. ``random`` and ``even`` choose among the
    ``foreground`` slices (a bool mask per slice; default: those where ``prediction``
    has a class other than 0, every slice while it has none) with :func:`random_slices` and
    :func:`spread_slices`; each row then names the slice's most uncertain predicted
    foreground class and its mean entropy (nats), for the reviewer's information.
    Other arguments as :func:`rank_slices`."""
    if strategy not in REVIEW_STRATEGIES:
        raise VoCoConfigError(f"strategy {strategy!r}: expected one of {REVIEW_STRATEGIES}")
    prediction = np.asarray(prediction)
    if num_classes is None:
        num_classes = int(prediction.max()) + 1 if prediction.size else 1
    if strategy == "uncertainty":
        return rank_slices(entropy, prediction, annotated, axis, num_classes, limit)
    table = slice_class_entropy(entropy, prediction, axis, num_classes)
    if foreground is None:
        foreground = annotated_slices(prediction, axis)  # any predicted structure
        if not foreground.any():  # nothing predicted yet: every slice is a candidate
            foreground = np.ones_like(foreground)
    order = (random_slices(foreground, annotated, limit, rng) if strategy == "random"
             else spread_slices(foreground, annotated, limit))
    rows = []
    for index in order:
        structures = table[index, 1:]  # background (0) only where nothing else is
        label = 1 + int(np.nanargmax(structures)) if np.isfinite(structures).any() else 0
        rows.append(SliceScore(index, float(np.nan_to_num(table[index, label])), label))
    return rows


__all__ = ["REVIEW_STRATEGIES", "REVIEW_STRATEGY", "SliceScore", "predictive_entropy",
           "random_slices", "rank_slices", "slice_class_entropy", "spread_slices",
           "suggest_slices"]
