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


def factors(name: str, warmup: int, total: int, base: float = 1.0, kwargs: dict | None = None) -> list[float]:
    """transformers' schedule `name` (with its `kwargs`, as the Trainer's lr_scheduler_kwargs): the LR of an optimizer
    at `base` at each of `total` optimizer steps; at base 1, the schedule's factor."""
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                          scheduler_specific_kwargs=kwargs)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def mode_lr(lr_mode: str, mode: int, lr: float = 5e-4) -> float:
    return LRS[mode] if lr_mode == "absolute" else lr * V1_MULTIPLIERS[mode]


def _eight_steps(cfg):
    """A Run of `cfg` on the tiny BERT, 8 optimizer steps: (the run, each step's traced LR), having checked that the
    LR AdamW stepped with (read by a step pre-hook, after the controller's, which scales the group's LR) is it."""
    from unified_lora.training import Run

    run = Run(cfg, tiny_bert(), "seq-cls", 2, None, print_fn=None, total_steps=8)
    used = []
    run.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    x, y = classification_batch(n=8)
    for _ in range(8):
        run.train_step({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y})
    traced = [r.lr for r in run.ctrl.trace]
    assert used == traced
    return run, traced


@pytest.mark.parametrize("lr_mode, name", [("absolute", "linear"), ("multiplier", "cosine")])
def test_each_optimizer_step_trains_at_the_traced_lr_the_modes_lr_times_the_schedule(lr_mode, name):
    """The LR AdamW steps with (read by a step pre-hook after the controller's, which scales the group's LR) is the
    trace's `lr`, and it is the mode's LR (--lrs, or --lr x the mode's multiplier) x transformers' schedule factor."""
    from unified_lora.training import TrainConfig

    cfg = TrainConfig(device="cpu", log_every=0, lr_mode=lr_mode, lr=2e-3, lr_scheduler=name, warmup_steps=3,
                      mode_lrs=LRS)
    run, traced = _eight_steps(cfg)
    want = [mode_lr(lr_mode, r.mode, 2e-3) * f for r, f in zip(run.ctrl.trace, factors(name, 3, 8))]
    assert traced == pytest.approx(want, rel=1e-12, abs=0)
    assert traced[0] == 0 and max(traced) == pytest.approx(mode_lr(lr_mode, run.ctrl.mode, 2e-3))


@pytest.mark.parametrize("lr_mode, name, kwargs", [
    ("multiplier", "polynomial", {"lr_end": 1e-4, "power": 2.0}),
    ("absolute", "polynomial", {"power": 0.5}),
    ("absolute", "cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("multiplier", "cosine_with_min_lr", {"min_lr": 2e-4, "num_cycles": 0.4}),
    ("absolute", "cosine_warmup_with_min_lr", {"min_lr_rate": 0.2, "warmup_lr_rate": 0.1}),
    ("multiplier", "warmup_stable_decay", {"num_decay_steps": 3, "warmup_type": "cosine", "decay_type": "linear",
                                           "min_lr_ratio": 0.1}),
    ("absolute", "warmup_stable_decay", {"num_decay_steps": 2, "num_stable_steps": 3, "decay_type": "1-sqrt"}),
    ("absolute", "cosine_with_restarts", {"num_cycles": 2}),
    ("multiplier", "inverse_sqrt", {"timescale": 5}),
], ids=["polynomial_multiplier", "polynomial_absolute", "min_lr_rate", "min_lr_multiplier", "warmup_min_lr",
        "wsd", "wsd_stable_steps", "restarts_cycles", "inverse_sqrt_timescale"])
def test_a_schedules_settings_give_transformers_own_lr_at_each_step(lr_mode, name, kwargs):
    """--lr-scheduler-kwargs: with its settings, each step's LR (traced, and the one AdamW steps with) is the mode's
    multiplier (--lrs in lr_mode absolute, whose base LR is 1) x transformers' LR for an optimizer at the base LR
    (--lr), built with those settings. The absolute LRs of transformers (polynomial's lr_end, min_lr) are LRs of a
    mode at multiplier 1, as --lr is; warmup_stable_decay with num_stable_steps ends its decay before the run does."""
    from unified_lora.training import TrainConfig

    cfg = TrainConfig(device="cpu", log_every=0, lr_mode=lr_mode, lr=2e-3, lr_scheduler=name, warmup_steps=2,
                      mode_lrs=LRS, lr_scheduler_kwargs=kwargs)
    run, traced = _eight_steps(cfg)
    base = 2e-3 if lr_mode == "multiplier" else 1.0
    want = [mode_lr(lr_mode, r.mode, 1.0) * lr for r, lr in zip(run.ctrl.trace, factors(name, 2, 8, base, kwargs))]
    assert traced == pytest.approx(want, rel=1e-12, abs=0)
    # (the settings changed the schedule: the LRs are not those of its defaults, with what it requires at 0)
    required = ({"num_decay_steps": kwargs["num_decay_steps"]} if name == "warmup_stable_decay" else
                {"min_lr_rate": 0.0} if "min_lr" in name else None)
    plain = [mode_lr(lr_mode, r.mode, 1.0) * lr for r, lr in zip(run.ctrl.trace, factors(name, 2, 8, base, required))]
    assert traced != pytest.approx(plain, rel=1e-6, abs=0)
    assert run.schedule["lr_scheduler_kwargs"] == kwargs


def test_min_lr_is_multis_floor_and_scales_with_each_modes_multiplier(tiny, tmp_path, capsys):
    """cosine_with_min_lr with min_lr (from a YAML lr_scheduler_kwargs, where PyYAML reads 1e-4 as a string) in
    --lr-mode multiplier, over 2 epochs through SINGLE, MULTI and MIRROR and a Mirror restore: each step's LR is the
    mode's multiplier x transformers' LR at --lr, so the schedule ends at min_lr in MULTI and at min_lr x the
    multiplier in the others. The console, summary.json and `report` name the schedule and its settings."""
    out = tmp_path / "run"
    cfg = _write(tmp_path / "cfg.yaml", "lr_scheduler: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr: 1e-4}\n")
    assert main(_train_args(tiny, out, "--config", str(cfg), "--epochs", "2", "--lr-mode", "multiplier",
                            "--warmup-steps", "3", "--mirror-policy", "always", *MODES)) == 0
    said = capsys.readouterr().out
    trace = read_trace(out / "trace.jsonl")
    assert len(trace) == 16 and {r["mode"] for r in trace} == {0, 1, 2}
    assert any(r.get("snapshot") == "restored" for r in trace)
    lrs = factors("cosine_with_min_lr", 3, 16, 5e-4, {"min_lr": 1e-4})
    assert [r["lr"] for r in trace] == pytest.approx([V1_MULTIPLIERS[r["mode"]] * lr for r, lr in zip(trace, lrs)],
                                                     rel=1e-12, abs=0)
    assert 1e-4 < lrs[-1] < 1.1e-4  # (the last step, 15 of 16, is just above the floor)
    words = "cosine_with_min_lr (min_lr=0.0001), 3 warm-up steps, decaying over 16 steps"
    assert f"LR schedule: {words}; the mode's LR x its factor at each optimizer step\n" in said
    assert json.loads((out / "summary.json").read_text())["lr_schedule"] == {
        "lr_scheduler": "cosine_with_min_lr", "warmup_steps": 3, "warmup_ratio": 0.0,
        "lr_scheduler_kwargs": {"min_lr": 1e-4}, "total_steps": 16}
    assert main(["report", str(out)]) == 0
    assert f"\nLR schedule: {words}\n" in capsys.readouterr().out


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
                                      "warmup_ratio": 0.15 if ratio else 0.0, "lr_scheduler_kwargs": {},
                                      "total_steps": 16}
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
            "lr_scheduler": "constant", "warmup_steps": 0, "warmup_ratio": 0.0, "lr_scheduler_kwargs": {},
            "total_steps": 10}
    assert "LR schedule" not in capsys.readouterr().out


WSD = '{"num_decay_steps": 6, "decay_type": "linear"}'


@pytest.mark.parametrize("name, kwargs, words", [
    ("cosine", (), "cosine, 3 warm-up steps, decaying over {} steps"),
    ("warmup_stable_decay", ("--lr-scheduler-kwargs", WSD),
     "warmup_stable_decay (num_decay_steps=6, decay_type=linear), 3 warm-up steps, over a run of {} steps"),
])
def test_a_run_resumed_from_a_save_steps_checkpoint_continues_its_schedule_bit_for_bit(tiny, tmp_path, capsys, name,
                                                                                       kwargs, words):
    """A run stopped after its step-6 checkpoint and resumed ends exactly as the uninterrupted run: the same trace (the
    LR of every step included), weights, optimizer, controller and scheduler state; with a schedule's settings too
    (warmup_stable_decay's, which the checkpoint's config and `lr_schedule` hold: the resume takes them from there). A
    resume that would change the schedule is refused: another scheduler, warm-up or settings, and another length for a
    decaying schedule."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    opts = ("--epochs", "2", "--save-steps", "6", "--lr-scheduler", name, "--warmup-steps", "3", *kwargs, *MODES)
    assert main(_train_args(tiny, straight, *opts)) == 0
    st = torch.load(straight / "checkpoints" / "step-6" / "state.pt", weights_only=True)
    assert st["lr_schedule"]["total_steps"] == 16 and st["lr_scheduler"]["last_epoch"] == 6
    assert st["lr_schedule"]["lr_scheduler_kwargs"] == (json.loads(WSD) if kwargs else {})
    shutil.copytree(straight / "checkpoints" / "step-6", resumed / "checkpoints" / "step-6")
    shutil.copy(straight / "trace.jsonl", resumed / "trace.jsonl")  # (the resume drops the lines after step 6)
    if not kwargs:  # cosine: as a checkpoint saved before --lr-scheduler-kwargs existed (none: no settings)
        path = resumed / "checkpoints" / "step-6" / "state.pt"
        del st["config"]["lr_scheduler_kwargs"], st["lr_schedule"]["lr_scheduler_kwargs"]
        torch.save(st, path)
    capsys.readouterr()
    other = '{"num_decay_steps": 5}'
    for extra, needle in ((("--lr-scheduler", "linear"), f"lr_scheduler='{name}' (now 'linear')"),
                          (("--warmup-steps", "4"), "warmup_steps=3 (now 4)"),
                          (("--lr-scheduler-kwargs", other), f"lr_scheduler_kwargs={json.loads(WSD) if kwargs else {}} "
                                                             f"(now {json.loads(other)})"),
                          (("--steps", "20"), f"the run's LR schedule is {words.format(16)}, and this run's would be "
                                              f"{words.format(20)} (--steps or --epochs changed the run's length)")):
        if extra[0] == "--lr-scheduler-kwargs" and not kwargs:  # (cosine takes num_cycles, not num_decay_steps)
            extra, needle = ("--lr-scheduler-kwargs", '{"num_cycles": 1}'), "lr_scheduler_kwargs={} (now " \
                                                                            "{'num_cycles': 1.0})"
        assert main(["train", "--output-dir", str(resumed), "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"unified-lora: error: --resume {resumed / 'checkpoints' / 'step-6'}: ") and \
            needle in err and err.count("\n") == 1, err
    assert main(["train", "--output-dir", str(resumed), "--resume"]) == 0
    a, b = read_trace(straight / "trace.jsonl"), read_trace(resumed / "trace.jsonl")
    assert b == a and len({r["lr"] for r in a}) > (10 if name == "cosine" else 8)
    for tag in ("epoch-1", "epoch-2"):
        assert _same(_ckpt_state(resumed / "checkpoints" / tag), _ckpt_state(straight / "checkpoints" / tag)), tag


def test_run_load_checkpoint_refuses_other_schedule_settings(tmp_path):
    """In Python (no CLI config check first): a Run built with other settings of the checkpoint's schedule refuses
    it, naming both schedules; with the same settings it continues at the checkpoint's LR."""
    from unified_lora.training import Run, TrainConfig, UsageError

    def run_with(kwargs: dict) -> Run:
        cfg = TrainConfig(device="cpu", log_every=0, lr_scheduler="warmup_stable_decay", warmup_steps=1,
                          lr_scheduler_kwargs=kwargs)
        return Run(cfg, tiny_bert(), "seq-cls", 2, None, print_fn=None, total_steps=8)

    run = run_with({"num_decay_steps": 3})
    x, y = classification_batch(n=8)
    for _ in range(2):
        run.train_step({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y})
    ckpt = run.save_checkpoint(tmp_path, "step-2")
    with pytest.raises(UsageError, match=r"the run's LR schedule is warmup_stable_decay \(num_decay_steps=3\), 1 "
                                         r"warm-up step, over a run of 8 steps, and this run's would be "
                                         r"warmup_stable_decay \(num_decay_steps=4\), .* \(its settings changed\)"):
        run_with({"num_decay_steps": 4}).load_checkpoint(ckpt)
    again = run_with({"num_decay_steps": 3})
    again.load_checkpoint(ckpt)
    assert again.optimizer.param_groups[0]["lr"] == run.optimizer.param_groups[0]["lr"]


def test_a_checkpoint_saved_before_schedules_resumes_at_a_constant_lr(tiny, tmp_path):
    """A state.pt without the schedule's keys (its config without lr_scheduler, warmup_steps, warmup_ratio,
    lr_scheduler_kwargs; no lr_schedule or lr_scheduler state) reads as a constant LR: its resume trains on as the
    uninterrupted run does."""
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert main(_train_args(tiny, straight, "--steps", "6", *MODES[:4])) == 0
    assert main(_train_args(tiny, old, "--steps", "3", *MODES[:4])) == 0
    path = old / "checkpoints" / "step-3" / "state.pt"
    st = torch.load(path, weights_only=True)
    for key in ("lr_scheduler", "warmup_steps", "warmup_ratio", "lr_scheduler_kwargs"):
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
    (("--config", "plateau.yaml"), "lr_scheduler: must be one of ('constant', 'constant_with_warmup', 'linear', "
                                   "'cosine', 'cosine_with_restarts', 'inverse_sqrt', 'polynomial', "
                                   "'cosine_with_min_lr', 'cosine_warmup_with_min_lr', 'warmup_stable_decay'), got "
                                   "'reduce_lr_on_plateau'"),
    (("--lr-scheduler", "warmup_stable_decay", "--warmup-steps", "2", "--lr-scheduler-kwargs",
      '{"num_decay_steps": 7}'), "lr_scheduler_kwargs.num_decay_steps (warmup_stable_decay): 2 warm-up + 7 decay "
                                 "steps are 9, but the run has 8 optimizer steps: its decay would start before its "
                                 "warm-up ends"),
    (("--lr-scheduler", "warmup_stable_decay", "--lr-scheduler-kwargs", '{"num_decay_steps": 3, '
      '"num_stable_steps": 6}'), "lr_scheduler_kwargs.num_decay_steps (warmup_stable_decay): 0 warm-up + 6 stable "
                                 "(num_stable_steps) + 3 decay steps are 9, but the run has 8 optimizer steps: its "
                                 "decay would not end"),
    # without a warm-up (it said "its decay would start before its warm-up ends", of a run that has none)
    (("--lr-scheduler", "warmup_stable_decay", "--lr-scheduler-kwargs", '{"num_decay_steps": 9}'),
     "lr_scheduler_kwargs.num_decay_steps (warmup_stable_decay): 0 warm-up + 9 decay steps are 9, but the run has 8 "
     "optimizer steps: its decay would not end;"),
], ids=["constant_with_warmup_steps", "steps_and_ratio", "negative_steps", "ratio_past_1", "warmup_past_the_run",
        "reduce_lr_on_plateau", "wsd_decay_past_the_run", "wsd_stable_past_the_run",
        "wsd_decay_past_a_run_without_warmup"])
def test_a_bad_schedule_setting_is_a_one_line_error_before_anything_is_written(tiny, tmp_path, capsys, given, needle):
    _write(tmp_path / "plateau.yaml", "lr_scheduler: reduce_lr_on_plateau\n")
    given = [str(tmp_path / g) if g.endswith(".yaml") else g for g in given]
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "1", *given)) == 2
    err = capsys.readouterr().err
    assert err.startswith("unified-lora: error: ") and needle in err and err.count("\n") == 1, err
    assert not out.exists()


MIN_LR = ("--lr-scheduler", "cosine_with_min_lr", "--lr-scheduler-kwargs")
WSD_KW = ("--lr-scheduler", "warmup_stable_decay", "--lr-scheduler-kwargs")


@pytest.mark.parametrize("given, needle", [
    (("--lr-scheduler", "linear", "--lr-scheduler-kwargs", '{"power": 2}'),
     "lr_scheduler_kwargs: lr_scheduler 'linear' takes none (its only settings are the warm-up and the run's length), "
     "got {'power': 2}"),
    ((*MIN_LR, '{"min_lr_rat": 0.1}'),
     "lr_scheduler_kwargs: 'min_lr_rat' is not a setting of lr_scheduler 'cosine_with_min_lr' (did you mean "
     "'min_lr_rate'?); its settings are ['num_cycles', 'min_lr', 'min_lr_rate']"),
    ((*MIN_LR, '{"min_lr_ratio": 0.1}'),  # warmup_stable_decay's name for it
     "lr_scheduler_kwargs: 'min_lr_ratio' is not a setting of lr_scheduler 'cosine_with_min_lr' (did you mean "
     "'min_lr_rate'?); its settings are ['num_cycles', 'min_lr', 'min_lr_rate']"),
    ((*MIN_LR, '{"min_lr_rate": "low"}'), "lr_scheduler_kwargs.min_lr_rate (cosine_with_min_lr): must be a number, "
                                          "got 'low' (str)"),
    ((*MIN_LR, '{"min_lr_rate": 1.5}'), "lr_scheduler_kwargs.min_lr_rate (cosine_with_min_lr): must be in [0, 1], "
                                        "got 1.5"),
    ((*MIN_LR, "{}"), "lr_scheduler_kwargs: lr_scheduler 'cosine_with_min_lr' needs one of min_lr_rate (the LR it "
                      "decays to, as a share of the mode's LR) and min_lr (an LR), got neither"),
    ((*MIN_LR, '{"min_lr": 1e-5, "min_lr_rate": 0.1}', "--lr-mode", "multiplier"), "got both"),
    ((*MIN_LR, '{"min_lr": 1e-5}'), "lr_scheduler_kwargs.min_lr (cosine_with_min_lr): an absolute LR, which "
                                    "--lr-mode absolute cannot honour (each mode has its own LR, --lrs, which the "
                                    "schedule's factor scales); give min_lr_rate, the LR it decays to as a share of "
                                    "the mode's LR, or use --lr-mode multiplier"),
    ((*MIN_LR, '{"min_lr": 1e-3}', "--lr-mode", "multiplier"),
     "lr_scheduler_kwargs.min_lr (cosine_with_min_lr): 0.001, the LR the schedule decays to, must be below --lr "
     "0.0005"),
    (("--lr-scheduler", "polynomial", "--lr-scheduler-kwargs", '{"lr_end": 1e-6}'),
     "lr_scheduler_kwargs.lr_end (polynomial): an absolute LR, which --lr-mode absolute cannot honour"),
    (("--lr-scheduler", "polynomial", "--lr-mode", "multiplier", "--lr", "1e-7"),
     "lr_scheduler_kwargs.lr_end (polynomial): 1e-07 (transformers' default), the LR the schedule decays to, must be "
     "below --lr 1e-07"),
    ((*WSD_KW, "{}"), "lr_scheduler_kwargs: lr_scheduler 'warmup_stable_decay' needs num_decay_steps (transformers "
                      "has no default for it)"),
    ((*WSD_KW, '{"num_decay_steps": 2.5}'), "lr_scheduler_kwargs.num_decay_steps (warmup_stable_decay): must be an "
                                            "integer, got 2.5"),
    ((*WSD_KW, '{"num_decay_steps": 2, "decay_type": "exp"}'),
     "lr_scheduler_kwargs.decay_type (warmup_stable_decay): must be one of ('linear', 'cosine', '1-sqrt'), got 'exp'"),
    ((*WSD_KW, '{"num_decay_steps": 2, "warmup_type": "cosine"}'),
     "lr_scheduler_kwargs.warmup_type (warmup_stable_decay): shapes the warm-up, and this run has none"),
    ((*WSD_KW, '{"num_decay_steps": 2, "num_training_steps": 5}'),
     "lr_scheduler_kwargs: 'num_training_steps' is not a setting of warmup_stable_decay here: it is the run's length: "
     "--steps, or --epochs"),
    ((*MIN_LR, "{min_lr_rate: 0.1}"), "lr_scheduler_kwargs: not JSON (Expecting property name enclosed in double "
                                      "quotes at column 2)"),
    ((*MIN_LR, "[0.1]"), "lr_scheduler_kwargs: must be a mapping of the schedule's settings to values"),
], ids=["linear_takes_none", "unknown", "another_schedules_name", "wrong_type", "out_of_range",
        "min_lr_neither", "min_lr_both", "min_lr_absolute", "min_lr_above_lr", "lr_end_absolute", "lr_end_default_above_lr", "wsd_required",
        "wsd_int", "wsd_shape", "warmup_shape_without_warmup", "set_by_the_run", "not_json", "not_a_mapping"])
def test_a_bad_schedule_kwarg_is_a_one_line_error_before_the_model_loads(tiny, tmp_path, capsys, given, needle):
    """--lr-scheduler-kwargs is checked with the config: the error names the schedule's setting, and comes before
    the model is read (--model names no folder here, which would fail later) and before anything is written."""
    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "no-model"), "--data", tiny["csv"], "--output-dir", str(out),
                 *given]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unified-lora: error: ") and needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_demo_takes_the_schedule_flags_for_both_arms(tiny, tmp_path, capsys):
    """`demo --lr-scheduler/--warmup-steps/--lr-scheduler-kwargs`: both arms train at the mode's LR x the schedule's
    factor (--lrs: lr_mode absolute), the console and summary.json name the schedule; a bad one is refused before
    anything is written."""
    out = tmp_path / "demo"
    wsd = ("--lr-scheduler", "warmup_stable_decay", "--lr-scheduler-kwargs", '{"num_decay_steps": 4}')
    assert main(test_cli._demo_args(tiny, out, *wsd, "--warmup-steps", "2")) == 0
    said = capsys.readouterr().out
    lrs = factors("warmup_stable_decay", 2, 12, 1.0, {"num_decay_steps": 4})
    for name in ("trace.jsonl", "baseline_trace.jsonl"):
        trace = read_trace(out / name)
        assert [r["lr"] for r in trace] == pytest.approx([LRS[r["mode"]] * f for r, f in zip(trace, lrs)],
                                                         rel=1e-12, abs=0), name
    words = "warmup_stable_decay (num_decay_steps=4), 2 warm-up steps, over a run of 12 steps"
    assert f"LR schedule: {words}; the mode's LR x its factor at each optimizer step, in both arms\n" in said
    assert json.loads((out / "summary.json").read_text())["lr_schedule"] == {
        "lr_scheduler": "warmup_stable_decay", "warmup_steps": 2, "warmup_ratio": 0.0,
        "lr_scheduler_kwargs": {"num_decay_steps": 4}, "total_steps": 12}
    bad = tmp_path / "bad"
    assert main(test_cli._demo_args(tiny, bad, *wsd, "--warmup-steps", "9")) == 2
    err = capsys.readouterr().err
    assert "9 warm-up + 4 decay steps are 13, but the run has 12 optimizer steps" in err and err.count("\n") == 1
    assert not bad.exists()
