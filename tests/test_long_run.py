"""Long-run behaviour: what a run that lasts days keeps per step or per cycle, and states a short test never reaches.

Each test counts list lengths or flags (no RSS), so it is fast and deterministic.
"""

import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_bert

from unified_lora import SINGLE, MachineConfig, UnifiedController, trainable_parameters
from unified_lora.callbacks import UnifiedLoRACallback
from unified_lora.multitask import setup_multitask_lora, task_context
from unified_lora.trace import read_trace

TARGETS = ["query", "value", "classifier"]


def _multitask(**kw):
    model = tiny_bert()
    _, ctrl = setup_multitask_lora(model, ["a", "b"], TARGETS, lr_mode="off", print_fn=None,
                                   machine=MachineConfig(initial_mode=SINGLE), **kw)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    ctrl.attach_optimizer(opt)
    return model, ctrl, opt


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (4, 8), generator=g), torch.tensor([0, 1, 0, 1]), ["a", "b", "a", "b"]


def test_an_svd_merge_of_a_zero_mean_delta_leaves_the_shared_adapter_trainable():
    """Task B factors still at their zero init (a split, then a merge, or a Mirror restore to a snapshot taken right
    after the split): the mean delta is 0. The svd rule used to write √S·(...) = 0 into both A and B of the merged dims,
    a saddle whose gradients are exactly 0 for good, so those dims never trained again; with every dim dead, every
    later step's gradient conflict was 0/0 = NaN and the signal skipped each step as non-finite: the controller froze
    in SINGLE for the rest of the run. Now such a dim keeps A's factor-mean row and a zero B column (LoRA's init)."""
    model, ctrl, opt = _multitask(merge_rule="svd")
    x, y, tids = _batch()
    ctrl.split()
    ctrl.merge_back()  # the task adapters never trained: their B blocks are 0
    for a in ctrl.adapters:
        assert all(float(b.detach().abs().sum()) == 0 for b in a.lora_B)  # the merged delta is still exactly 0
        assert float(a.lora_A[0].detach().abs().sum()) > 0  # ... and A is not (it was 0: a dead dim)
    for step in range(6):
        with task_context(model, tids):
            per = F.cross_entropy(model(input_ids=x).logits, y, reduction="none")
        per.mean().backward()
        grads = [float(a.lora_B[0].grad.abs().sum()) for a in ctrl.adapters if a.lora_B[0].grad is not None]
        if step == 0:
            assert grads and all(g > 0 for g in grads)  # the shared adapter learns again
        ctrl.step(per.mean(), task_losses={"a": float(per[0::2].mean()), "b": float(per[1::2].mean())})
        opt.step()
        opt.zero_grad()
    assert ctrl.nonfinite_steps == 0


def test_two_tasks_with_zero_gradients_give_no_conflict_not_nan():
    """Both task gradients exactly 0 (a dead or frozen adapter, a zero-weighted loss): the conflict is 0. It was
    0 / (1e-30 · 1e-30 → 0 in fp32) = NaN, which the signal skips as a non-finite step, every step while it lasts."""
    model, ctrl, opt = _multitask()
    x, y, tids = _batch()
    for _ in range(3):
        with task_context(model, tids):
            per = F.cross_entropy(model(input_ids=x).logits, y, reduction="none")
        (per * 0).mean().backward()
        ctrl.step(0.5, task_losses={"a": 0.5, "b": 0.5})
        opt.zero_grad()
    assert ctrl.nonfinite_steps == 0
    assert ctrl.trace[-1].components["C_grad"] == 0.0


def test_merge_log_grows_per_merge_only_with_keep_trace():
    """merge_log had one entry per merge for the whole run (and in every checkpoint), whatever keep_trace said."""
    for keep, want in ((False, 1), (True, 5)):
        _, ctrl, _ = _multitask(keep_trace=keep)
        for _ in range(5):
            ctrl.split()
            ctrl.merge_back()
        assert len(ctrl.merge_log) == want
        assert len(ctrl.state_dict()["multitask"]["merge_log"]) == want
        assert ctrl.merge_log[-1]["rule"] == "mean_factors"


def test_the_trainer_callback_keeps_per_step_losses_only_with_keep_trace():
    """UnifiedLoRACallback.step_losses had one float per optimizer step for the whole run, even with keep_trace=False."""
    for keep, want in ((False, 0), (True, 50)):
        ctrl = UnifiedController(keep_trace=keep, print_fn=None)  # v1: no adapters needed
        cb = UnifiedLoRACallback(ctrl)
        for _ in range(50):
            cb.on_step_begin(None, None, None)
            cb._record(torch.tensor(0.7), normalised=False, token_share=False)
            cb.on_pre_optimizer_step(None, None, None)
        assert ctrl.global_step == 50
        assert len(cb.step_losses) == want and len(ctrl.trace) == want


def test_a_cli_run_with_a_trace_file_keeps_no_trace_in_memory(tmp_path):
    """`unified-lora train` writes trace.jsonl and reads its summary and plot from there, but its controller also
    kept every step's record in ctrl.trace for the whole run (a few hundred bytes a step, without bound)."""
    from unified_lora.training import Run, TrainConfig

    path = tmp_path / "trace.jsonl"
    run = Run(TrainConfig(steps=4, batch_size=4), tiny_bert(), "seq-cls", 2, str(path), print_fn=None)
    x, y, _ = _batch()
    for _ in range(4):
        run.train_step({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y})
    run.ctrl.close()
    assert run.ctrl.trace == []
    assert [r["step"] for r in read_trace(path)] == [0, 1, 2, 3]
