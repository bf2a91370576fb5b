"""The typed training events (voco_core.train.events) the trainers yield."""

from __future__ import annotations

import math

from voco_core.train.events import FinetuneEvent, PretrainEvent, TrainEvent


def test_events_share_a_base_and_serialise():
    event = PretrainEvent("step", 3, 10, loss=0.5, terms={"pos": 0.1, "neg": 0.2, "reg": 0.3})
    assert isinstance(event, TrainEvent) and event.to_dict()["terms"]["neg"] == 0.2
    fine = FinetuneEvent("validation", 2, 4, mean_dice=0.7, class_dice={"liver": 0.7})
    assert isinstance(fine, TrainEvent) and fine.to_dict()["class_dice"] == {"liver": 0.7}
    assert math.isnan(fine.loss) and fine.best_step == -1 and fine.message == ""
