"""optim.batch_size: auto (micro-batch, accumulation, checkpointing from free memory),
and the fused AdamW the trainers build."""

from __future__ import annotations

import pytest
import torch

from voco_core.config import apply_overrides, make_pretrain_config
from voco_core.errors import VoCoConfigError
from voco_core.train.batch_size import (
    GIB,
    MemoryProbe,
    choose_split,
    resolve_batch_size,
)
from voco_core.train.common import adamw, restore_state

from conftest import tiny_config


def probe_of(free_gib: float, fixed_gib: float, per_volume_gib: float) -> MemoryProbe:
    return MemoryProbe(free=int(free_gib * GIB), fixed=int(fixed_gib * GIB),
                       per_volume=int(per_volume_gib * GIB))


def must_not_probe():
    raise AssertionError("the checkpointed probe ran although the plain one fits")


def test_the_whole_step_in_one_micro_batch_without_checkpointing_when_it_fits():
    choice = choose_split(4, probe_of(100, 2, 20), must_not_probe)
    assert (choice.batch_size, choice.grad_accum, choice.gradient_checkpointing) == (4, 1, False)
    assert "100.0 GiB free" in choice.line() and "= 4 per step" in choice.line()


def test_a_smaller_divisor_and_accumulation_before_checkpointing():
    # 0.85 * 40 = 34 GiB: 3 volumes would fit, but 3 does not divide 4, so 2 x 2
    choice = choose_split(4, probe_of(40, 2, 10), must_not_probe)
    assert (choice.batch_size, choice.grad_accum, choice.gradient_checkpointing) == (2, 2, False)
    choice = choose_split(2, probe_of(20, 2, 10), must_not_probe)
    assert (choice.batch_size, choice.grad_accum, choice.gradient_checkpointing) == (1, 2, False)


def test_checkpointing_only_when_one_volume_does_not_fit_without_it():
    calls = []

    def checkpointed():
        calls.append(1)
        return probe_of(20, 2, 3)

    choice = choose_split(2, probe_of(20, 2, 40), checkpointed)
    assert (choice.batch_size, choice.grad_accum, choice.gradient_checkpointing) == (2, 1, True)
    assert calls == [1]
    # the plain probe ran out of memory (None)
    choice = choose_split(2, None, lambda: probe_of(20, 2, 12))
    assert (choice.batch_size, choice.grad_accum, choice.gradient_checkpointing) == (1, 2, True)


def test_nothing_fits_is_one_config_error():
    with pytest.raises(VoCoConfigError, match=r"optim.batch_size = 'auto': one volume does "
                       r"not fit .* of 8.0 GiB free, even with gradient checkpointing"):
        choose_split(2, probe_of(8, 2, 30), lambda: probe_of(8, 2, 9))
    with pytest.raises(VoCoConfigError, match="even with gradient checkpointing"):
        choose_split(2, None, lambda: None)


def test_auto_is_a_config_value_and_other_words_are_refused():
    config = apply_overrides(make_pretrain_config("tiny", check_device=False),
                             ["optim.batch_size=auto"],
                             check_device=False)
    assert config.optim.batch_size == "auto"
    assert make_pretrain_config("base", {"optim": {"batch_size": "auto"}},
                                check_device=False).optim.batch_size == "auto"
    for bad, expected in (("0", ">= 1 or auto"), ("many", "expected int or 'auto'")):
        with pytest.raises(VoCoConfigError, match=rf"optim.batch_size = .*{expected}"):
            apply_overrides(config, [f"optim.batch_size={bad}"], check_device=False)


def test_on_a_cpu_auto_is_the_presets_split():
    for preset, expected in (("tiny", (1, 1, False)), ("base", (2, 1, True)),
                             ("huge", (1, 2, True))):
        config = make_pretrain_config(preset, {"optim": {"batch_size": "auto"}}, check_device=False)
        chosen, line = resolve_batch_size(config, torch.device("cpu"),
                                          probe=lambda *a: pytest.fail("probed a CPU"))
        o = chosen.optim
        assert (o.batch_size, o.grad_accum, chosen.model.gradient_checkpointing) == expected
        assert line.startswith("optim.batch_size auto: ") and "cpu: the" in line
    config = make_pretrain_config("tiny", {"optim": {"batch_size": 3}}, check_device=False)
    assert resolve_batch_size(config, torch.device("cpu")) == (config, "")


def test_on_a_gpu_auto_sizes_from_the_probe():
    """A fake probe stands in for a GPU: base keeps its 2 volumes per step and drops
    gradient checkpointing when both fit, and the chosen numbers validate."""
    config = make_pretrain_config("base", {"optim": {"batch_size": "auto"}}, check_device=False)
    seen = []

    def probe(cfg, device, checkpointing):
        seen.append(checkpointing)
        return probe_of(130, 1.5, 25) if not checkpointing else probe_of(130, 1.5, 8)

    chosen, line = resolve_batch_size(config, torch.device("cuda"), probe=probe)
    assert (chosen.optim.batch_size, chosen.optim.grad_accum,
            chosen.model.gradient_checkpointing) == (2, 1, False)
    assert seen == [False]
    assert "checkpointing off" in line and "130.0 GiB free" in line
    chosen, _ = resolve_batch_size(config, torch.device("cuda"),
                                   probe=lambda c, d, ckpt: probe_of(16, 1.5, 8 if ckpt else 20))
    assert (chosen.optim.batch_size, chosen.optim.grad_accum,
            chosen.model.gradient_checkpointing) == (1, 2, True)


def test_auto_keeps_the_v2_loss_pairs_in_one_micro_batch():
    """v2 pairs volumes inside a micro-batch: auto checkpoints rather than split base's
    2 volumes into 1 x 2, and says so when even 2 do not fit."""
    config = make_pretrain_config("base", {"optim": {"batch_size": "auto"},
                                           "loss": {"variant": "v2"},
                                           "model": {"teacher": "head"}}, check_device=False)

    def probe(cfg, device, checkpointing):  # 1 volume fits plainly, 2 only checkpointed
        return probe_of(40, 2, 12 if checkpointing else 25)

    chosen, line = resolve_batch_size(config, torch.device("cuda"), probe=probe)
    assert (chosen.optim.batch_size, chosen.optim.grad_accum,
            chosen.model.gradient_checkpointing) == (2, 1, True)
    assert "checkpointing on" in line
    with pytest.raises(VoCoConfigError, match=r"2 volumes \(loss v2\) do not fit"):
        resolve_batch_size(config, torch.device("cuda"),
                           probe=lambda c, d, ckpt: probe_of(40, 2, 25))


def test_a_run_with_auto_saves_the_chosen_numbers_and_says_so(tmp_path, train_dataset):
    from voco_core.config import load_pretrain_config
    from voco_core.train.pretrain import iter_pretrain

    stop = type("Stop", (), {"is_set": staticmethod(lambda: True)})()
    config = tiny_config({"optim": {"batch_size": "auto"}})
    events = list(iter_pretrain(config, train_dataset, tmp_path / "run", stop=stop))
    assert events[0].kind == "start"
    assert events[0].message.startswith("optim.batch_size auto: 1 volume(s) per micro-batch")
    saved = load_pretrain_config(tmp_path / "run" / "config.yaml")
    assert (saved.optim.batch_size, saved.optim.grad_accum) == (1, 1)


def test_fused_adamw_matches_the_default_and_survives_a_restore():
    torch.manual_seed(0)
    weights = [torch.randn(300, 7), torch.randn(5)]
    grads = [torch.randn_like(w) for w in weights]

    def updated(optimizer_of):
        params = [w.clone().requires_grad_() for w in weights]
        optimizer = optimizer_of(params)
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        return params, optimizer

    options = {"lr": 1e-2, "weight_decay": 1e-5, "amsgrad": True}
    fused, fused_opt = updated(lambda p: adamw(p, torch.device("cpu"), **options))
    plain, _plain_opt = updated(lambda p: torch.optim.AdamW(p, **options))
    assert fused_opt.param_groups[0]["fused"] is True
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    # A state saved by a non-fused optimizer (an older checkpoint) keeps the new one fused.
    model = torch.nn.Linear(7, 3)
    optimizer = adamw(list(model.parameters()), torch.device("cpu"), **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    other = torch.optim.AdamW(model.parameters(), **options)
    state = {"model": model.state_dict(), "optimizer": other.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    restore_state(state, "test", torch.device("cpu"), modules={"model": model},
                  optimizer=optimizer, scheduler=scheduler,
                  scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert optimizer.param_groups[0]["fused"] is True
