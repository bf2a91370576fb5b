"""Held-out position prediction (VoCo's pretext task) and its baselines.

Two protocols on held-out phantoms: *same-volume* (sub-volumes against the base crops
of their own volume; partly solvable by matching voxels) and *cross-volume*
(sub-volumes of phantom A against the base crops of phantom B, the label from grid
coordinates alone; solvable only with an anatomical position prior). Top-1 accuracy
(argmax predicted = argmax true overlap) and the mean absolute error of the overlap
vector. ``voco_core.inference.positions`` scores each sub-volume beside the K base
crops alone, so a prediction does not depend on the other boxes of the call.
"""

from __future__ import annotations

import math

import numpy as np


def random_position_model(config, seed: int, device: str):
    """A randomly initialised student; ``seed`` = the run seed gives exactly the
    network pretraining started from (StudentTeacher builds its student first)."""
    import torch

    from voco_core.config import resolve_device
    from voco_core.inference import PositionModel
    from voco_core.models import BackboneWithHead

    torch.manual_seed(seed)
    torch_device = resolve_device(device)
    net = BackboneWithHead(config.model).to(torch_device).eval()
    return PositionModel(net, config, torch_device, f"random init (seed {seed})", 0)


def draw_boxes(prepared, config, n_sub: int) -> list[np.ndarray]:
    """Per held-out volume, ``n_sub`` sample boxes (the same for every model: paired)."""
    from voco_core.geometry import crop_boxes_from_centres, sample_crop_centres

    out = []
    for index, volume in enumerate(prepared):
        size = tuple(volume.sample.shape[1:])
        rng = np.random.default_rng([7, index])
        out.append(crop_boxes_from_centres(
            sample_crop_centres(rng, size, config.random_crop_size, n_sub),
            config.random_crop_size, size))
    return out


def metrics(predicted: np.ndarray, true: np.ndarray) -> dict:
    correct = predicted.argmax(axis=1) == true.argmax(axis=1)
    p = float(correct.mean())
    return {"top1": round(p, 4), "mae": round(float(np.abs(predicted - true).mean()), 4),
            "n": len(correct), "top1_se": round(math.sqrt(p * (1 - p) / len(correct)), 4)}


def score_model(model, prepared, boxes, cross: bool) -> dict:
    """Top-1 and MAE over all held-out volumes for one protocol."""
    from voco_core.inference import positions

    predicted, true = [], []
    for index, volume in enumerate(prepared):
        base = prepared[(index + 1) % len(prepared)] if cross else None
        result = positions(volume, model, volume.boxes_to_image(boxes[index]), base_volume=base)
        predicted.append(result.predicted)
        true.append(result.true)
    return metrics(np.concatenate(predicted), np.concatenate(true))


def score_both(model, prepared, boxes) -> dict:
    return {"same_volume": score_model(model, prepared, boxes, cross=False),
            "cross_volume": score_model(model, prepared, boxes, cross=True)}


def score_raw_cosine(config, prepared, boxes, cross: bool) -> dict:
    """relu(cos) of the flattened network-input crops (``crops_for_network``)."""
    import torch.nn.functional as F

    from voco_core.geometry import base_crop_grid, overlap_labels
    from voco_core.inference import crops_for_network

    s = config.geometry.input_size
    predicted, true = [], []
    for index, volume in enumerate(prepared):
        base = prepared[(index + 1) % len(prepared)] if cross else volume
        grid = base_crop_grid(volume.sample.shape[1:], config.geometry.grid_size)
        bases = F.normalize(crops_for_network(base.sample, grid, s).flatten(1), dim=1)
        subs = F.normalize(crops_for_network(volume.sample, boxes[index], s).flatten(1), dim=1)
        predicted.append(F.relu(subs @ bases.T).numpy())
        true.append(overlap_labels(boxes[index], grid))
    return metrics(np.concatenate(predicted), np.concatenate(true))


def score_prior(config, prepared, boxes) -> dict:
    """A constant prediction: the mean overlap vector of the sampling geometry (Monte
    Carlo, its own draws); its argmax is the centre cell."""
    from voco_core.geometry import (
        base_crop_grid,
        crop_boxes_from_centres,
        overlap_labels,
        sample_crop_centres,
    )

    size = tuple(prepared[0].sample.shape[1:])
    grid = base_crop_grid(size, config.geometry.grid_size)
    draws = crop_boxes_from_centres(sample_crop_centres(
        np.random.default_rng(12345), size, config.random_crop_size, 20000),
        config.random_crop_size, size)
    prior = overlap_labels(draws, grid).mean(axis=0)
    true = np.concatenate([overlap_labels(b, grid) for b in boxes])
    out = metrics(np.broadcast_to(prior, true.shape), true)
    out["zero_vector_mae"] = round(float(np.abs(true).mean()), 4)
    return out


def position_section(args, config, heldout_images, pretraining: dict) -> dict:
    """Every kept student, random inits, raw cosine, the prior and chance."""
    from voco_core.inference import load_position_model, prepare_volume

    prepared = [prepare_volume(image, config) for image in heldout_images]
    boxes = draw_boxes(prepared, config, args.sub_volumes)
    k = config.num_base_crops
    out = {"K": k, "chance_top1": round(1 / k, 4),
           "n_per_protocol": int(sum(len(b) for b in boxes)),
           "prior": score_prior(config, prepared, boxes),
           "raw_cosine": {"same_volume": score_raw_cosine(config, prepared, boxes, False),
                          "cross_volume": score_raw_cosine(config, prepared, boxes, True)}}
    random_rows = {str(args.seed + r): score_both(
        random_position_model(config, args.seed + r, args.device), prepared, boxes)
        for r in range(args.random_inits)}
    out["random_init"] = random_rows
    out["random_init_mean"] = {
        p: {m: round(float(np.mean([row[p][m] for row in random_rows.values()])), 4)
            for m in ("top1", "mae")} for p in ("same_volume", "cross_volume")}
    out["pretrained"] = {"0": random_rows[str(args.seed)]}
    for step, path in sorted(pretraining["kept"].items()):
        out["pretrained"][str(step)] = score_both(load_position_model(path, args.device),
                                                  prepared, boxes)
    if str(args.pretrain_steps) not in out["pretrained"]:  # the last save is usually kept
        out["pretrained"][str(args.pretrain_steps)] = score_both(
            load_position_model(pretraining["checkpoint"], args.device), prepared, boxes)
    return out
