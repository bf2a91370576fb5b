"""Trainer: exact resume, stop flag, checkpoint contents, logs, teacher variants."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from voco_core.checkpoint import load_checkpoint
from voco_core.train.pretrain import iter_pretrain, pretrain, resume_config

from conftest import tiny_config

N = 2  # steps before the stop; the uninterrupted run has 2N


class StopAt:
    """Sets a stop flag once an event with ``step == target`` has been seen."""

    def __init__(self, target: int):
        self.flag, self.target = threading.Event(), target

    def __call__(self, event):
        if event.kind == "step" and event.step >= self.target:
            self.flag.set()


def step_losses(history):
    return [(e.step, e.loss, e.terms["pos"], e.terms["neg"], e.terms["reg"], e.lr)
            for e in history if e.kind == "step"]


def test_resume_is_exact(tmp_path, train_dataset):
    config = tiny_config({"optim": {"total_steps": 2 * N}}, exact=True)
    straight = pretrain(config, train_dataset, tmp_path / "straight")

    stopper = StopAt(N)
    first = pretrain(config, train_dataset, tmp_path / "split", stop=stopper.flag,
                     callback=stopper)
    assert first.stopped and first.step == N
    assert first.history[-1].kind == "stopped" and first.history[-1].checkpoint
    second = pretrain(resume_config(tmp_path / "split"), train_dataset, tmp_path / "split",
                      resume=tmp_path / "split")
    assert not second.stopped and second.step == 2 * N

    expected = step_losses(straight.history)
    got = step_losses(first.history) + step_losses(second.history)
    assert [s for s, *_ in got] == list(range(1, 2 * N + 1))
    for (step, *values), (_, *reference) in zip(got, expected, strict=True):
        assert values == pytest.approx(reference, abs=1e-6), f"step {step}"

    a = load_checkpoint(straight.checkpoint)
    b = load_checkpoint(second.checkpoint)
    for key, value in a["student"].items():
        torch.testing.assert_close(b["student"][key], value, atol=0, rtol=0)  # bit-exact
    for key, value in a["teacher"].items():
        torch.testing.assert_close(b["teacher"][key], value, atol=0, rtol=0)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 2 * N + 1))


def test_stop_flag_before_the_first_step_leaves_a_valid_checkpoint(tmp_path, train_dataset):
    flag = threading.Event()
    flag.set()
    events = list(iter_pretrain(tiny_config(), train_dataset, tmp_path / "run", stop=flag))
    assert [e.kind for e in events] == ["start", "stopped"]
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 0 and state["format"] == "napari-voco/pretrain"
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())  # plain JSON: no NaN
    assert meta["step"] == 0 and meta["loss"] is None


def test_checkpoint_contents_are_plain_and_complete(tmp_path, train_dataset):
    config = tiny_config({"optim": {"total_steps": 1}})
    result = pretrain(config, train_dataset, tmp_path / "run")
    state = torch.load(result.checkpoint, weights_only=True)  # no arbitrary pickle needed
    assert set(state) >= {"student", "teacher", "optimizer", "scheduler", "scaler", "step",
                          "config", "samples_seen", "world_size", "rng", "format",
                          "voco_version"}
    assert state["step"] == 1 and state["config"]["model"]["feature_size"] == 12
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["step"] == 1 and meta["checkpoint"] == "checkpoints/last.pt"
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp"))
    event = result.history[-1]
    assert event.kind == "done" and event.crops_per_second > 0 and event.peak_memory_bytes > 0
    assert event.seconds_per_step > 0 and event.eta_seconds == 0
    assert meta["loss"] == event.loss  # the loss of the step the checkpoint holds
    assert set(event.terms) == {"pos", "neg", "reg"}
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert record["terms"] == event.terms and record["loss"] == event.loss


@pytest.mark.parametrize("variant", ["head", "none"])
def test_other_teacher_variants_train_and_resume(tmp_path, train_dataset, variant):
    config = tiny_config({"model": {"teacher": variant}, "optim": {"total_steps": 2}})
    stopper = StopAt(1)
    pretrain(config, train_dataset, tmp_path / "run", stop=stopper.flag, callback=stopper)
    resumed = pretrain(resume_config(tmp_path / "run"), train_dataset, tmp_path / "run",
                       resume=tmp_path / "run")
    assert resumed.step == 2
    state = load_checkpoint(resumed.checkpoint)
    assert (state["teacher"] is None) == (variant == "none")
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in resumed.history if e.kind == "step")


def test_gradient_accumulation_and_longer_resume(tmp_path, train_dataset):
    config = tiny_config({"optim": {"total_steps": 1, "grad_accum": 2}})
    pretrain(config, train_dataset, tmp_path / "run")
    longer = resume_config(tmp_path / "run", optim={"total_steps": 2})
    result = pretrain(longer, train_dataset, tmp_path / "run", resume=tmp_path / "run")
    assert [e.step for e in result.history if e.kind == "step"] == [2]


def test_dataloader_workers_give_the_same_losses(tmp_path, train_dataset):
    config = tiny_config({"optim": {"total_steps": 1}, "run": {"tensorboard": True}},
                         exact=True)
    in_process = pretrain(config, train_dataset, tmp_path / "a")
    workers = tiny_config({"optim": {"total_steps": 1}, "data": {"num_workers": 1}},
                          exact=True)
    with_workers = pretrain(workers, train_dataset, tmp_path / "b")
    assert step_losses(with_workers.history) == step_losses(in_process.history)
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))


def test_deterministic_mode_restores_the_backend_flags(tmp_path, train_dataset):
    assert torch.backends.mkldnn.enabled
    threads_before = torch.get_num_threads()
    pretrain(tiny_config({"optim": {"total_steps": 1}}, exact=True), train_dataset,
             tmp_path / "run")
    assert torch.backends.mkldnn.enabled  # switched off only while training
    assert torch.get_num_threads() == threads_before


def test_closing_after_start_restores_the_backend_flags(tmp_path, train_dataset):
    from voco_core.train.pretrain import iter_pretrain

    threads = torch.get_num_threads()
    events = iter_pretrain(tiny_config({"optim": {"total_steps": 1}}, exact=True),
                           train_dataset, tmp_path / "run")
    assert next(events).kind == "start"
    events.close()
    assert torch.backends.mkldnn.enabled and torch.get_num_threads() == threads


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, train_dataset,
                                                                      monkeypatch):
    """Step 2's loss turns NaN (its backward has run: the check now sits before the
    optimizer update, one host sync per step): one error line naming the step, and the
    step-1 checkpoint, whose weights are finite, is what the run folder holds."""
    import importlib

    from voco_core.errors import VoCoTrainingError

    # the module (voco_core.train exports the function of the same name)
    pretrain_module = importlib.import_module("voco_core.train.pretrain")

    real = pretrain_module.voco_loss_on_batch
    calls = []

    def nan_at_step_two(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            losses = {**losses, "total": losses["total"] * float("nan")}
        return losses

    monkeypatch.setattr(pretrain_module, "voco_loss_on_batch", nan_at_step_two)
    config = tiny_config({"optim": {"total_steps": 2}, "run": {"checkpoint_every": 1}})
    with pytest.raises(VoCoTrainingError, match="the loss became nan at step 2"):
        pretrain(config, train_dataset, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 1
    assert all(torch.isfinite(t).all() for t in state["student"].values()
               if t.is_floating_point())


def test_run_compile_compiles_the_backbones_and_keeps_checkpoint_names(tmp_path, train_dataset,
                                                                       monkeypatch):
    """``run.compile``: ``nn.Module.compile`` on the student's and the full teacher's
    backbone (recorded here instead of compiled: compiling takes minutes on a CPU, see
    the config's docstring); the checkpoint's tensor names carry no ``_orig_mod``."""
    from voco_core.models import VoCoBackbone

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: compiled.append(type(self).__name__))
    config = tiny_config({"optim": {"total_steps": 1}, "run": {"compile": True}})
    assert config.model.teacher == "full"
    result = pretrain(config, train_dataset, tmp_path / "run")
    assert compiled == [VoCoBackbone.__name__] * 2
    state = load_checkpoint(result.checkpoint)
    assert not any("_orig_mod" in name for name in state["student"])
    assert load_checkpoint(result.checkpoint)["config"]["run"]["compile"] is True
