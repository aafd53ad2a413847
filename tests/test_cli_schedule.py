"""`unified-lora train --lr-scheduler / --warmup-steps / --warmup-ratio`: an LR schedule (transformers'
`get_scheduler`) whose factor at each optimizer step scales the mode's LR, in both --lr-mode's; on the tiny BERT of
test_cli.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import classification_batch, tiny_bert
import test_cli
from test_cli import _ckpt_state, _same, _train_args, _write
from unified_lora.cli import main
from unified_lora.config import V1_MULTIPLIERS
from unified_lora.trace import read_trace

tiny = test_cli.tiny  # the tiny BERT, GPT-2 and data files of test_cli.py (a module-scoped fixture)
LRS = (1e-2, 5e-3, 1e-3)  # --lrs of the runs below: SINGLE, MULTI, MIRROR
# a shock and thresholds under which the tiny BERT visits all three modes in 16 steps (test_cli's resume test)
MODES = ("--lrs", *map(str, LRS), "--shock-start", "4", "--shock-end", "7", "--shock-type", "random", "--theta0",
         "0.48", "--theta1", "0.497", "--threads", "1")


def factors(name: str, warmup: int, total: int) -> list[float]:
    """transformers' schedule `name`: its factor at each of `total` optimizer steps (the LR of an optimizer at 1)."""
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def mode_lr(lr_mode: str, mode: int, lr: float = 5e-4) -> float:
    return LRS[mode] if lr_mode == "absolute" else lr * V1_MULTIPLIERS[mode]


@pytest.mark.parametrize("lr_mode, name", [("absolute", "linear"), ("multiplier", "cosine")])
def test_each_optimizer_step_trains_at_the_traced_lr_the_modes_lr_times_the_schedule(lr_mode, name):
    """The LR AdamW steps with (read by a step pre-hook after the controller's, which scales the group's LR) is the
    trace's `lr`, and it is the mode's LR (--lrs, or --lr x the mode's multiplier) x transformers' schedule factor."""
    from unified_lora.training import Run, TrainConfig

    cfg = TrainConfig(device="cpu", log_every=0, lr_mode=lr_mode, lr=2e-3, lr_scheduler=name, warmup_steps=3,
                      mode_lrs=LRS)
    run = Run(cfg, tiny_bert(), "seq-cls", 2, None, print_fn=None, total_steps=8)
    used = []
    run.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    x, y = classification_batch(n=8)
    for _ in range(8):
        run.train_step({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y})
    traced = [r.lr for r in run.ctrl.trace]
    assert used == traced
    want = [mode_lr(lr_mode, r.mode, 2e-3) * f for r, f in zip(run.ctrl.trace, factors(name, 3, 8))]
    assert traced == pytest.approx(want, rel=1e-12, abs=0)
    assert traced[0] == 0 and max(traced) == pytest.approx(mode_lr(lr_mode, run.ctrl.mode, 2e-3))


@pytest.mark.parametrize("lr_mode, name, warmup", [("absolute", "linear", ("--warmup-steps", "3")),
                                                   ("multiplier", "cosine", ("--warmup-ratio", "0.15"))])
def test_the_schedule_scales_every_modes_lr_across_transitions_and_a_mirror_restore(tiny, tmp_path, capsys, lr_mode,
                                                                                    name, warmup):
    """Over 2 epochs (16 steps) in which the controller goes through SINGLE, MULTI and MIRROR and a MIRROR exit
    restores its snapshot (--mirror-policy always), each step's traced LR is its mode's LR x the schedule's factor at
    that step: a transition changes the mode's part only, and the rollback does not rewind the schedule. The console,
    summary.json and `report` name the schedule; --warmup-ratio 0.15 of 16 steps is 3 steps (rounded up)."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "2", "--lr-mode", lr_mode, "--lr-scheduler", name, *warmup,
                            "--mirror-policy", "always", *MODES)) == 0
    said = capsys.readouterr().out
    trace = read_trace(out / "trace.jsonl")
    assert len(trace) == 16 and {r["mode"] for r in trace} == {0, 1, 2}
    assert any(r.get("snapshot") == "restored" for r in trace)
    want = [mode_lr(lr_mode, r["mode"]) * f for r, f in zip(trace, factors(name, 3, 16))]
    assert [r["lr"] for r in trace] == pytest.approx(want, rel=1e-12, abs=0)
    ratio = " (warmup_ratio 0.15)" if lr_mode == "multiplier" else ""
    words = f"{name}, 3 warm-up steps{ratio}, decaying over 16 steps"
    assert f"LR schedule: {words}; the mode's LR x its factor at each optimizer step\n" in said
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr_schedule"] == {"lr_scheduler": name, "warmup_steps": 3,
                                      "warmup_ratio": 0.15 if ratio else 0.0, "total_steps": 16}
    assert main(["report", str(out)]) == 0
    assert f"\nLR schedule: {words}\n" in capsys.readouterr().out


def test_the_schedule_counts_optimizer_steps_under_grad_accum(tiny, tmp_path):
    """With --grad-accum 2 an epoch of 8 batches is 4 optimizer steps: 2 epochs decay over 8 steps, not 16 batches,
    and the LR moves once per optimizer step."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "2", "--grad-accum", "2", "--lr-scheduler", "linear",
                            "--warmup-steps", "2", "--no-controller")) == 0
    trace = read_trace(out / "trace.jsonl")
    assert [r["lr"] for r in trace] == pytest.approx([5e-4 * f for f in factors("linear", 2, 8)], rel=1e-12, abs=0)
    assert json.loads((out / "summary.json").read_text())["lr_schedule"]["total_steps"] == 8


def test_the_default_is_a_constant_lr_each_modes_own(tiny, tmp_path, capsys):
    """No schedule given: every step trains at exactly its mode's LR (--lrs; --lr x the multiplier), as before
    schedules existed (the weights are bit for bit those of the code before them: checked by hand against it, in
    both --lr-mode's, fp16 and --grad-accum), the console has no schedule line, and the run records a constant
    schedule."""
    for lr_mode in ("absolute", "multiplier"):
        out = tmp_path / lr_mode
        assert main(_train_args(tiny, out, "--steps", "10", "--lr-mode", lr_mode, *MODES)) == 0
        trace = read_trace(out / "trace.jsonl")
        assert len({r["mode"] for r in trace}) > 1
        assert [r["lr"] for r in trace] == [mode_lr(lr_mode, r["mode"]) for r in trace]  # exactly
        assert json.loads((out / "summary.json").read_text())["lr_schedule"] == {
            "lr_scheduler": "constant", "warmup_steps": 0, "warmup_ratio": 0.0, "total_steps": 10}
    assert "LR schedule" not in capsys.readouterr().out


def test_a_run_resumed_from_a_save_steps_checkpoint_continues_its_schedule_bit_for_bit(tiny, tmp_path, capsys):
    """A run stopped after its step-6 checkpoint and resumed ends exactly as the uninterrupted run: the same trace (the
    LR of every step included), weights, optimizer, controller and scheduler state. A resume that would change the
    schedule is refused: another scheduler or warm-up, and another length for a decaying schedule."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    opts = ("--epochs", "2", "--save-steps", "6", "--lr-scheduler", "cosine", "--warmup-steps", "3", *MODES)
    assert main(_train_args(tiny, straight, *opts)) == 0
    st = torch.load(straight / "checkpoints" / "step-6" / "state.pt", weights_only=True)
    assert st["lr_schedule"]["total_steps"] == 16 and st["lr_scheduler"]["last_epoch"] == 6
    shutil.copytree(straight / "checkpoints" / "step-6", resumed / "checkpoints" / "step-6")
    shutil.copy(straight / "trace.jsonl", resumed / "trace.jsonl")  # (the resume drops the lines after step 6)
    capsys.readouterr()
    for extra, needle in ((("--lr-scheduler", "linear"), "lr_scheduler='cosine' (now 'linear')"),
                          (("--warmup-steps", "4"), "warmup_steps=3 (now 4)"),
                          (("--steps", "20"), "the run's LR schedule is cosine, 3 warm-up steps, decaying over 16 "
                                              "steps, and this run's would be cosine, 3 warm-up steps, decaying over "
                                              "20 steps")):
        assert main(["train", "--output-dir", str(resumed), "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"unified-lora: error: --resume {resumed / 'checkpoints' / 'step-6'}: ") and \
            needle in err and err.count("\n") == 1, err
    assert main(["train", "--output-dir", str(resumed), "--resume"]) == 0
    a, b = read_trace(straight / "trace.jsonl"), read_trace(resumed / "trace.jsonl")
    assert b == a and len({r["lr"] for r in a}) > 10
    for tag in ("epoch-1", "epoch-2"):
        assert _same(_ckpt_state(resumed / "checkpoints" / tag), _ckpt_state(straight / "checkpoints" / tag)), tag


def test_a_checkpoint_saved_before_schedules_resumes_at_a_constant_lr(tiny, tmp_path):
    """A state.pt without the schedule's keys (its config without lr_scheduler, warmup_steps, warmup_ratio; no
    lr_schedule or lr_scheduler state) reads as a constant LR: its resume trains on as the uninterrupted run does."""
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert main(_train_args(tiny, straight, "--steps", "6", *MODES[:4])) == 0
    assert main(_train_args(tiny, old, "--steps", "3", *MODES[:4])) == 0
    path = old / "checkpoints" / "step-3" / "state.pt"
    st = torch.load(path, weights_only=True)
    for key in ("lr_scheduler", "warmup_steps", "warmup_ratio"):
        del st["config"][key]
    del st["lr_schedule"], st["lr_scheduler"]
    torch.save(st, path)
    assert main(["train", "--output-dir", str(old), "--resume", "--steps", "6"]) == 0
    assert read_trace(old / "trace.jsonl") == read_trace(straight / "trace.jsonl")
    assert json.loads((old / "summary.json").read_text())["lr_schedule"]["lr_scheduler"] == "constant"


@pytest.mark.parametrize("given, needle", [
    (("--lr-scheduler", "constant", "--warmup-steps", "2"), "lr_scheduler: 'constant' has no warm-up (warmup_steps "
                                                            "2); use constant_with_warmup"),
    (("--lr-scheduler", "linear", "--warmup-steps", "2", "--warmup-ratio", "0.1"),
     "warmup_steps and warmup_ratio: give one of the two, got 2 and 0.1"),
    (("--lr-scheduler", "linear", "--warmup-steps", "-1"), "warmup_steps: must be >= 0 (0 = no warm-up), got -1"),
    (("--lr-scheduler", "linear", "--warmup-ratio", "1.5"), "warmup_ratio: must be in [0, 1) (0 = no warm-up), got 1.5"),
    (("--lr-scheduler", "linear", "--warmup-steps", "9"), "warmup_steps: 9 steps of warm-up, but the run has 8 "
                                                          "optimizer steps"),
    (("--config", "polynomial.yaml"), "lr_scheduler: must be one of ('constant', 'constant_with_warmup', 'linear', "
                                      "'cosine', 'cosine_with_restarts', 'inverse_sqrt'), got 'polynomial'"),
], ids=["constant_with_warmup_steps", "steps_and_ratio", "negative_steps", "ratio_past_1", "warmup_past_the_run",
        "polynomial"])
def test_a_bad_schedule_setting_is_a_one_line_error_before_anything_is_written(tiny, tmp_path, capsys, given, needle):
    _write(tmp_path / "polynomial.yaml", "lr_scheduler: polynomial\n")
    given = [str(tmp_path / g) if g.endswith(".yaml") else g for g in given]
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "1", *given)) == 2
    err = capsys.readouterr().err
    assert err.startswith("unified-lora: error: ") and needle in err and err.count("\n") == 1, err
    assert not out.exists()
