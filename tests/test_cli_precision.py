"""`unified-lora train` on a device (`--device`), in mixed precision (`--precision`) and with gradient accumulation
(`--grad-accum`), on the CPU: the tiny BERT of test_cli.py. The same runs on a GPU are in test_cuda.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import classification_batch, tiny_bert
import test_cli
from test_cli import _ckpt_state, _demo_args, _same, _train_args
from unified_lora.cli import main
from unified_lora.trace import read_trace

tiny = test_cli.tiny  # the tiny BERT, GPT-2 and data files of test_cli.py (a module-scoped fixture)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
@pytest.mark.parametrize("command", ["train", "demo"])
def test_an_unavailable_or_malformed_device_is_a_one_line_error_before_anything_is_written(tiny, tmp_path, capsys,
                                                                                         command):
    out = tmp_path / "run"
    args = _train_args(tiny, out) if command == "train" else ["demo", "--output-dir", str(out)]
    for device, needle in (("cuda", "--device cuda: CUDA is not available on this machine"),
                           ("cuda:1", "--device cuda:1: CUDA is not available on this machine"),
                           ("gpu", "device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
                           ("cuda:x", "device: must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'")):
        assert main([*args, "--device", device]) == 2
        assert _err(capsys) == f"unified-lora: error: {needle}"
    assert not out.exists()
    cfg = tmp_path / "run.yaml"
    cfg.write_text("device: cuda\n")
    assert main([*_train_args(tiny, out), "--config", str(cfg)]) == 2
    assert _err(capsys) == "unified-lora: error: --device cuda: CUDA is not available on this machine"
    assert not out.exists()


def test_auto_is_the_cpu_without_a_gpu_and_the_run_says_where_it_trained(tiny, tmp_path, capsys):
    from unified_lora.training import resolve_device

    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "2", "--device", "cpu")) == 0
    assert "device: cpu, precision fp32\n" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["device"], summary["precision"], summary["config"]["grad_accum"]) == ("cpu", "fp32", 1)


def _trained_state(ckpt: Path) -> tuple[dict, dict]:
    """`_ckpt_state` less the dev evaluations, and the best of them: a run stopped by --steps evaluates there, one
    never stopped does not."""
    tensors, st = _ckpt_state(ckpt)
    for key in ("evals", "best", "evals_without_improvement"):
        st["run"].pop(key)
    return tensors, st


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_trace(out / "trace.jsonl")]


def test_a_bf16_run_on_the_cpu_trains_close_to_fp32_but_not_equal(tiny, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    opts = ("--steps", "6", "--threads", "1", "--lrs", "1e-2", "5e-3", "1e-3")
    assert main(_train_args(tiny, fp32, *opts)) == 0
    assert main(_train_args(tiny, bf16, *opts, "--precision", "bf16")) == 0
    a, b = _losses(fp32), _losses(bf16)
    assert len(a) == len(b) == 6 and all(map(torch.isfinite, torch.tensor(b)))
    assert a != b  # autocast ran: bf16 matmuls round differently
    assert b == pytest.approx(a, rel=2e-2)
    assert json.loads((bf16 / "summary.json").read_text())["precision"] == "bf16"
    # the weights (LoRA blocks and the head) stay fp32: autocast casts the matmuls' inputs, not the parameters
    tensors, _ = _ckpt_state(bf16 / "checkpoints" / "step-6")
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float32}


def test_a_bf16_and_grad_accum_run_resumed_mid_epoch_ends_bit_for_bit_as_the_uninterrupted_one(tiny, tmp_path):
    """58 rows, batches of 8, 2 batches a step: 4 steps an epoch. Stopped at step 3 (mid-epoch) and resumed to step 6
    (mid-epoch 2): the same trace, weights, optimizer, controller state and RNG as a run that was never stopped."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    opts = ("--precision", "bf16", "--grad-accum", "2", "--threads", "1", "--lrs", "1e-2", "5e-3", "1e-3",
            "--shock-start", "1", "--shock-end", "3", "--shock-type", "random", "--theta0", "0.48", "--theta1", "0.497")
    assert main(_train_args(tiny, straight, "--steps", "6", *opts)) == 0
    assert main(_train_args(tiny, split, "--steps", "3", *opts)) == 0
    assert main(["train", "--output-dir", str(split), "--resume", "--steps", "6"]) == 0
    a, b = read_trace(straight / "trace.jsonl"), read_trace(split / "trace.jsonl")
    assert [r["step"] for r in b] == list(range(6)) and b == a
    for name in ("epoch-1", "step-6"):
        assert _same(*(_trained_state(d / "checkpoints" / name) for d in (split, straight))), name
    assert _ckpt_state(split / "checkpoints" / "step-6")[1]["config"]["precision"] == "bf16"  # kept by the resume


@pytest.fixture(scope="module")
def without_dropout(tiny, tmp_path_factory) -> dict:
    """The tiny BERT and GPT-2 with their dropout off: a run's gradients then depend on its rows only, not on how they
    are cut into micro-batches (dropout masks are drawn per forward)."""
    from transformers import AutoConfig, BertModel, GPT2LMHeadModel

    out = {}
    for name, cls, off in (("bert", BertModel, ("hidden_dropout_prob", "attention_probs_dropout_prob")),
                           ("gpt2", GPT2LMHeadModel, ("resid_pdrop", "embd_pdrop", "attn_pdrop"))):
        d = tmp_path_factory.mktemp("nodrop") / name
        cfg = AutoConfig.from_pretrained(tiny[name], **dict.fromkeys(off, 0.0))
        cls.from_pretrained(tiny[name], config=cfg).save_pretrained(d)
        for f in Path(tiny[name]).iterdir():
            if "token" in f.name or f.name == "vocab.txt":
                shutil.copy(f, d / f.name)
        out[name] = str(d)
    return out


def _same_weights(one: Path, acc: Path) -> None:
    wa, wb = (_ckpt_state(d / "checkpoints" / "epoch-1")[0] for d in (one, acc))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wb[k], wa[k], rtol=1e-4, atol=1e-6), k
    assert any(".lora_B." in k and wa[k].abs().sum() > 0 for k in wa)  # trained (B starts at 0)


@pytest.mark.parametrize("accum, batch", [(2, 4), (4, 4)])
def test_grad_accum_gives_the_weights_of_one_batch_of_all_its_rows(tiny, without_dropout, tmp_path, accum, batch):
    """N micro-batches of B rows per step train as one batch of N×B rows (mean loss over the rows), the controller
    off (a fixed LR). 58 train rows: with N=2, B=4 the epoch's 15 batches make 8 steps, the last of one 2-row batch,
    as B=8 gives; with N=4 the last step is 4+4+2 rows, weighted 0.4/0.4/0.2, as one batch of 10 rows. The micro-
    batches are cut from the same shuffled rows (the order depends on the seed alone), and each one's all-padding
    columns are trimmed apart: the masked attention makes that no difference but float rounding, hence allclose."""
    one, acc = tmp_path / "one", tmp_path / "acc"
    common = ("--model", without_dropout["bert"], "--no-controller", "--epochs", "1", "--threads", "1", "--lrs", "1e-2",
              "1e-2", "1e-2")
    assert main([*_train_args(tiny, one, *common), "--batch-size", str(accum * batch)]) == 0
    assert main([*_train_args(tiny, acc, *common), "--batch-size", str(batch), "--grad-accum", str(accum)]) == 0
    a, b = _losses(one), _losses(acc)
    assert len(a) == len(b) == -(-58 // (accum * batch))  # optimizer steps: the trace, and the epoch's checkpoint
    assert b == pytest.approx(a, rel=1e-5)
    _same_weights(one, acc)
    assert json.loads((acc / "summary.json").read_text())["steps"] == len(a)


def test_grad_accum_of_a_causal_lm_weights_each_micro_batch_by_its_target_tokens(tiny, without_dropout, tmp_path):
    """A causal LM's loss is the mean over a batch's target tokens, and rows of 2 to 10 words hold different numbers
    of them: each micro-batch's loss is weighted by its share of the step's target tokens (a weighting by rows, or
    1/N, would give other weights), so N=2 × B=4 trains as B=8."""
    data = tmp_path / "lm.csv"
    data.write_text("text\n" + "".join(" ".join(test_cli.FILLER[(i + j) % len(test_cli.FILLER)]
                                                for j in range(2 + i % 9)) + "\n" for i in range(40)))
    one, acc = tmp_path / "one", tmp_path / "acc"
    common = ("--model", without_dropout["gpt2"], "--data", str(data), "--target-modules", "c_attn",
              "--no-controller", "--epochs", "1", "--threads", "1", "--lrs", "1e-2", "1e-2", "1e-2")
    assert main([*_train_args(tiny, one, *common), "--batch-size", "8"]) == 0
    assert main([*_train_args(tiny, acc, *common), "--batch-size", "4", "--grad-accum", "2"]) == 0
    a, b = _losses(one), _losses(acc)
    assert len(a) == len(b) == 5 and b == pytest.approx(a, rel=1e-5)  # 36 train rows
    _same_weights(one, acc)


def test_grad_accum_counts_optimizer_steps_for_steps_save_steps_and_the_shock(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--grad-accum", "3", "--steps", "5", "--save-steps", "2", "--shock-start",
                            "1", "--shock-end", "3")) == 0
    trace = read_trace(out / "trace.jsonl")
    assert [r["step"] for r in trace] == [0, 1, 2, 3, 4]
    # 8 batches of 8: 3 steps an epoch (3 + 3 + 2 batches); step-2 inside epoch 1, step-4 inside epoch 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-1", "step-2", "step-4", "step-5"]
    st = torch.load(out / "checkpoints" / "step-4" / "state.pt", weights_only=True)
    assert (st["run"]["epoch"], st["run"]["step_in_epoch"], st["run"]["global_step"]) == (1, 1, 4)


def test_a_resume_refuses_another_grad_accum_and_takes_another_precision(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "2", "--grad-accum", "2")) == 0
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4", "--grad-accum", "1"]) == 2
    assert _err(capsys).startswith(f"unified-lora: error: --resume {out / 'checkpoints' / 'step-2'}: the run was "
                                   "trained with grad_accum=2 (now 1)")
    # the precision is no part of the batch order: fp32 -> fp16 goes on, with a fresh GradScaler
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4", "--precision", "fp16"]) == 0
    st = torch.load(out / "checkpoints" / "epoch-1" / "state.pt", weights_only=True)  # 4 steps an epoch
    assert st["config"]["precision"] == "fp16" and st["config"]["grad_accum"] == 2 and "grad_scaler" in st
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == [0, 1, 2, 3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is the GPU there")
def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu_with_auto(tiny, tmp_path, capsys):
    """A resume takes the device given now (default auto), not the stored run's: the run's config records
    device=cuda:0, and its state.pt the GPU's RNG, which a CPU run leaves alone."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "2")) == 0
    path = out / "checkpoints" / "step-2" / "state.pt"
    st = torch.load(path, weights_only=True)
    st["config"]["device"] = "cuda:0"
    st["cuda_rng"] = torch.zeros(816, dtype=torch.uint8)
    torch.save(st, path)
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "3"]) == 0
    assert "device: cpu, precision fp32" in capsys.readouterr().out
    assert torch.load(out / "checkpoints" / "step-3" / "state.pt", weights_only=True)["config"]["device"] == "auto"


def test_an_fp16_run_saves_its_grad_scaler_and_a_resume_goes_on_with_it_bit_for_bit(tiny, tmp_path):
    """fp16 scales the loss by the GradScaler's scale (65536 at first) before backward; a step whose gradients
    overflow fp16 is skipped and halves the scale, and 2000 steps in a row without one double it. The checkpoint holds
    the scale and the count of steps since the last overflow (3 at step 3): a resume that started a fresh GradScaler
    would count from 0 again, and its step-6 checkpoint would differ from the whole run's."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    opts = ("--precision", "fp16", "--threads", "1", "--lrs", "1e-2", "5e-3", "1e-3")
    assert main(_train_args(tiny, straight, "--steps", "6", *opts)) == 0
    assert main(_train_args(tiny, split, "--steps", "3", *opts)) == 0
    mid = torch.load(split / "checkpoints" / "step-3" / "state.pt", weights_only=True)["grad_scaler"]
    assert mid["scale"] == 65536.0 and mid["_growth_tracker"] == 3, mid
    assert main(["train", "--output-dir", str(split), "--resume", "--steps", "6"]) == 0
    a, b = read_trace(straight / "trace.jsonl"), read_trace(split / "trace.jsonl")
    assert b == a and len(a) == 6
    resumed, whole = (_trained_state(d / "checkpoints" / "step-6") for d in (split, straight))
    assert _same(resumed, whole) and resumed[1]["grad_scaler"] == whole[1]["grad_scaler"]


def _run_after_one_step(print_fn=None, **cfg):
    """A Run of the tiny BERT on the CPU (TrainConfig `cfg`) after one step on a batch; (run, batch)."""
    from unified_lora.training import Run, TrainConfig

    run = Run(TrainConfig(device="cpu", log_every=0, **cfg), tiny_bert(), "seq-cls", 2, None, print_fn=print_fn)
    x, y = classification_batch(8, 10)
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y}
    run.train_step(batch)
    return run, batch


def _weights_and_moments(run):
    """A copy of the trainable weights and of AdamW's first moments of those it has stepped, to compare later."""
    from unified_lora.model import trainable_parameters

    ps = trainable_parameters(run.model)
    stepped = [p for p in ps if p in run.optimizer.state]
    return ([p.detach().clone() for p in ps], [run.optimizer.state[p]["exp_avg"].clone() for p in stepped])


def _assert_left_alone(run, saved) -> None:
    """Neither a weight nor a moment changed since `_weights_and_moments`."""
    now = _weights_and_moments(run)
    assert saved[1] and all(torch.equal(a, b) for old, new in zip(saved, now) for a, b in zip(old, new))


def test_an_fp16_step_whose_gradients_overflow_is_skipped_and_leaves_the_weights_alone():
    """GradScaler's inf check: a gradient with an inf entry (as an fp16 overflow makes) skips optimizer.step, so
    neither the weights nor AdamW's moments change, and the scale halves; the next step trains as usual. The step
    still counts (the trace, --steps), as in Hugging Face's Trainer."""
    run, batch = _run_after_one_step(precision="fp16", controller=False)
    saved = _weights_and_moments(run)
    scale = run.scaler.get_scale()
    hook = run.ctrl.extra_params[0].register_hook(lambda g: torch.full_like(g, float("inf")))  # the head's weight
    loss = run.train_step(batch)
    hook.remove()
    assert torch.isfinite(torch.tensor(loss))
    _assert_left_alone(run, saved)
    assert run.scaler.get_scale() == scale / 2 and run.state.global_step == 2
    # counted as fp32's skips are, but not toward --max-nonfinite-steps: the scale (32768) is still >= 1
    assert (run.state.skipped_steps, run.state.nonfinite_in_a_row) == (1, 0)
    run.train_step(batch)
    now = _weights_and_moments(run)[0]
    assert all(torch.isfinite(p).all() for p in now) and any(not torch.equal(p, w) for p, w in zip(now, saved[0]))
    assert (run.state.skipped_steps, run.state.nonfinite_in_a_row) == (1, 0)


def test_an_fp16_run_whose_gradients_stay_non_finite_stops_after_max_nonfinite_steps():
    """GradScaler skipped every fp16 step whose gradient held a NaN, but the run counted none of them
    (`skipped_steps` 0) and never stopped: it halved the scale at each step and trained nothing to its end, exit 0,
    where fp32 stops after `max_nonfinite_steps`. Each step GradScaler skips now counts; the overflows of its
    calibration (scale 65536 halving down to 1) do not count toward the limit, those below scale 1 do, and K of them in
    a row stop the run: 16 halvings, then 3."""
    from unified_lora.training import DivergedError

    said = []
    run, batch = _run_after_one_step(said.append, precision="fp16", controller=False, max_nonfinite_steps=3)
    run.ctrl.extra_params[0].register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
    for _ in range(16 + 2):
        run.train_step(batch)
    assert said[0] == ("step 1: non-finite gradient (loss finite; GradScaler's scale lowered to 32768); optimizer step "
                       "skipped, weights unchanged (GradScaler finding its scale: not counted toward "
                       "--max-nonfinite-steps, 1 in the run)")
    with pytest.raises(DivergedError, match="3 steps in a row"):
        run.train_step(batch)
    assert (run.state.global_step, run.state.skipped_steps) == (20, 19)
    assert said[-1] == ("step 19: non-finite gradient (loss finite; GradScaler's scale lowered to 0.125); optimizer "
                        "step skipped, weights unchanged (3 in a row, 19 in the run)")


def test_demo_takes_device_and_precision_and_keeps_its_cpu_default(tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(_demo_args(tiny, out, "--no-baseline", "--precision", "bf16")) == 0
    assert "device: cpu, precision bf16\n" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["device"], summary["precision"]) == ("cpu", "bf16")
    default = tmp_path / "default"
    assert main(_demo_args(tiny, default, "--no-baseline")) == 0
    assert "device:" not in capsys.readouterr().out  # the documented output, unchanged
    assert json.loads((default / "summary.json").read_text())["device"] == "cpu"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_step_with_a_non_finite_loss_or_gradient_is_skipped_and_leaves_the_weights_alone(precision, where):
    """fp32 and bf16 have no GradScaler to skip a step: a NaN loss, or a finite loss with an inf gradient, went through
    clipping (which spreads the NaN to every gradient) into AdamW, and every trainable weight and moment was NaN from
    then on. The step is now skipped as GradScaler skips an fp16 overflow: weights and moments unchanged, the step
    counted, the console told; the next finite step trains."""
    said = []
    run, batch = _run_after_one_step(said.append, precision=precision)
    saved = _weights_and_moments(run)
    head = run.ctrl.extra_params[0]  # the classifier's weight
    if where == "loss":  # the logits of one row NaN, so the batch's mean loss is NaN
        hook = run.model.classifier.register_forward_hook(lambda m, a, out: out.index_fill(0, torch.tensor([0]),
                                                                                          float("nan")))
    else:
        hook = head.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
    loss = run.train_step(batch)
    hook.remove()
    assert torch.isfinite(torch.tensor(loss)) == (where == "gradient")
    _assert_left_alone(run, saved)
    assert (run.state.global_step, run.state.skipped_steps, run.state.nonfinite_in_a_row) == (2, 1, 1)
    assert said[-1].startswith(f"step 1: non-finite {'loss nan' if where == 'loss' else 'gradient norm (loss finite)'}"
                               "; optimizer step skipped, weights unchanged (1 in a row, 1 in the run)")
    run.train_step(batch)
    assert run.state.nonfinite_in_a_row == 0 and run.state.skipped_steps == 1
    now = _weights_and_moments(run)[0]
    assert all(torch.isfinite(p).all() for p in now) and any(not torch.equal(p, w) for p, w in zip(now, saved[0]))


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
@pytest.mark.parametrize("torch_has_get_total_norm", [True, False])
def test_steps_skipped_for_non_finite_gradients_with_a_finite_loss_are_not_taken_for_an_accumulation(
        monkeypatch, torch_has_get_total_norm, grad_clip):
    """A run whose gradients were inf on every other step, its loss finite: `train_step` skips those optimizer steps,
    and 16 of 32 ctrl.step calls with no optimizer step since the one before made the accumulation warning, which told
    the user that ctrl.step ran on every micro-batch. Such a step now counts as a non-finite loss's does: no warning.
    (test_controller.py checks that the warning still comes for a real accumulation.) The same on a torch without
    torch.nn.utils.get_total_norm (it came in torch 2.6; pyproject takes torch 2.4): ctrl.step, which reads the
    gradients' finiteness at every call, raised AttributeError there, as train_step did with --grad-clip 0."""
    import warnings

    if not torch_has_get_total_norm:
        monkeypatch.delattr(torch.nn.utils, "get_total_norm")
    run, batch = _run_after_one_step(max_nonfinite_steps=0, grad_clip=grad_clip)
    head = run.ctrl.extra_params[0]  # the classifier's weight
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i in range(40):
            hook = head.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf"))) if i % 2 else None
            loss = run.train_step(batch)
            if hook is not None:
                hook.remove()
            assert math.isfinite(loss)
    assert run.state.skipped_steps == 20 and run.ctrl._optimizer_steps == 21  # (the first step's, then every other)
    assert [str(w.message) for w in record if str(w.message).startswith("ctrl.step: ")] == []


def test_a_diverging_run_stops_after_max_nonfinite_steps_with_a_checkpoint_of_its_last_finite_weights(tiny, tmp_path,
                                                                                                      capsys):
    """An LR of 1e30 blows the LoRA product past float32 after one step, so every later step's loss is NaN. The run used
    to train on with NaN weights to the end and exit 0 with a NaN adapter in peft_adapter/. Now each such step is
    skipped, and `--max-nonfinite-steps` of them in a row stop the run: exit code 1, a one-line error, and a checkpoint
    holding the weights of the last finite step (here already useless: the first step's update was 1e30)."""
    out = tmp_path / "run"
    args = _train_args(tiny, out, "--steps", "30", "--lrs", "1e30", "1e30", "1e30", "--max-nonfinite-steps", "3")
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "3 steps in a row (to step " in captured.err
    # the LR option this run reads (--lr-mode absolute: --lrs; it said "--lrs / --lr", and --lr is refused there)
    assert "Resume with a lower learning rate (--lrs), " in captured.err and "Traceback" not in captured.err
    assert "raise --max-nonfinite-steps (max_nonfinite_steps; 0 = never stop)" in captured.err
    assert captured.out.count("optimizer step skipped, weights unchanged") == 3
    assert "3 steps in a row with a non-finite loss or gradient; saved " in (out / "console.txt").read_text()
    (ckpt,) = (out / "checkpoints").iterdir()
    state = _ckpt_state(ckpt)
    stopped = state[1]["run"]
    assert stopped["skipped_steps"] == 3 == stopped["nonfinite_in_a_row"] and ckpt.name == f"step-{stopped['global_step']}"
    assert all(torch.isfinite(t).all() for t in state[0].values() if t.is_floating_point())
    assert not (out / "peft_adapter").exists()
    finite = _ckpt_state(_one_checkpoint(tmp_path / "one", tiny, args, stopped["global_step"] - 3))[0]
    assert finite.keys() == state[0].keys() and all(torch.equal(finite[k], state[0][k]) for k in finite)


def test_a_diverging_demo_stops_with_advice_the_demo_can_take(tiny, tmp_path, capsys):
    """The demo stopped a diverging arm with train's advice ("Resume with a lower learning rate ... or raise
    max_nonfinite_steps"): the demo has neither --resume nor --max-nonfinite-steps. It names the arm and --lrs."""
    args = _demo_args(tiny, tmp_path / "demo", "--no-baseline")
    i = args.index("--lrs")
    args[i + 1:i + 4] = ["1e30"] * 3
    assert main(args) == 1
    err = _err(capsys)
    assert err == ("unified-lora: error: Unified LoRA: 10 steps in a row (to step 10) had a non-finite loss or "
                   "gradient and were skipped, so the demo stops; run it again with lower learning rates (--lrs)")


def _one_checkpoint(out, tiny, args, steps) -> Path:
    """The checkpoint of the same run stopped by --steps after `steps` steps."""
    assert main([*args[:args.index("--output-dir")], "--output-dir", str(out),
                 *args[args.index("--output-dir") + 2:], "--steps", str(steps)]) == 0
    return out / "checkpoints" / f"step-{steps}"


def test_a_run_that_never_stops_for_non_finite_steps_counts_them_in_its_summary_and_report(tiny, tmp_path, capsys):
    """`--max-nonfinite-steps 0`: the run goes on to its end, skipping every non-finite step; summary.json and
    `report` say how many were skipped."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "6", "--lrs", "1e30", "1e30", "1e30",
                            "--max-nonfinite-steps", "0")) == 0
    summary = json.loads((out / "summary.json").read_text())
    skipped = summary["skipped_steps"]
    assert skipped >= 4 and summary["arms"]["run"]["skipped_steps"] == skipped
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert (f"Unified LoRA: {skipped} optimizer step(s) skipped for a non-finite loss or gradient"
            in capsys.readouterr().out)


def test_train_trains_with_dropout_on_a_model_from_pretrained_that_comes_in_eval_mode(tiny):
    """transformers' from_pretrained returns the model in eval mode, and `train` and `demo` never switched it: every
    run trained with the model's dropout (and lora_dropout) off. `Run` puts it in training mode; evaluation switches
    to eval mode and back."""
    from unified_lora.training import Run, TrainConfig, evaluate, load_model

    model, _ = load_model(tiny["bert"], "seq-cls", num_labels=2)
    assert not model.training  # as from_pretrained leaves it
    run = Run(TrainConfig(device="cpu", log_every=0, lora_dropout=0.1), model, "seq-cls", 2, None, print_fn=None)
    assert all(m.training for m in run.model.modules())
    x = torch.randint(5, model.config.vocab_size, (8, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.arange(8) % 2}
    torch.manual_seed(0)
    first = run.model(**batch).loss
    torch.manual_seed(1)
    assert not torch.equal(first, run.model(**batch).loss)  # dropout draws differ between the two forwards
    evaluate(run.model, batch, "seq-cls", "custom")
    assert all(m.training for m in run.model.modules())
