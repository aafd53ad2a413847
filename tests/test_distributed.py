"""Distributed lockstep: 2 real processes (gloo, CPU), a tiny model in DDP, different data per rank.

One spawned run (module fixture) feeds several checks. The model learns the
task fast, then a window of flipped labels (steps 14-19) makes the real loss
jump: φ crosses θ1, Mirror saves a snapshot (weights and AdamW moments), and
restores it when φ falls back. Each rank trains on its own data, so the local
losses differ; only the controller's all-reduce keeps the decisions equal.
"""

import datetime
import functools
import json
import os
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import can_build_cpp
from unified_lora.distributed import assert_lockstep, check_ddp, clear_paused_grads, ddp_kwargs
from unified_lora.trace import read_trace

STEPS, CORRUPT = 26, range(14, 20)


class TinyClassifier(torch.nn.Module):
    """Embedding-bag text classifier. A plain torch model: a process that trains only it imports none of
    transformers' models (conftest imports them where it builds one), a few seconds of its start-up on 2 cores;
    `_cuda_dist_worker.py` records what it imported and test_cuda.py checks that it is none."""

    def __init__(self, vocab=100, dim=32, return_dict=False):
        super().__init__()
        self.return_dict = return_dict
        self.embed = torch.nn.EmbeddingBag(vocab, dim)
        self.q_proj = torch.nn.Linear(dim, dim)
        self.v_proj = torch.nn.Linear(dim, dim)
        self.classifier = torch.nn.Linear(dim, 2)

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        h = torch.tanh(self.v_proj(torch.tanh(self.q_proj(h))))
        loss = torch.nn.functional.cross_entropy(self.classifier(h), labels)
        return {"loss": loss} if self.return_dict else loss  # the Trainer reads outputs["loss"]


def _paused_blocks(layers):
    return [p for a in layers for i in range(a.n_active_blocks, len(a.boundaries)) for p in (a.lora_A[i], a.lora_B[i])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_gloo(rank: int, world: int, port: int, **kwargs) -> None:
    """A worker's process group, from the environment torchrun sets (accelerate, inside TrainingArguments, reuses
    the group built from it); a `timeout` makes a collective one process skips fail the test instead of hanging it
    for gloo's default 30 minutes. One thread per process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, **kwargs)
    torch.set_num_threads(1)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    _init_gloo(rank, world, port)
    _plain_ddp_loop(rank, out)
    _trainer_ddp(rank, out)
    _causal_lm_trainers_ddp(rank, out)
    _accelerate_loop(rank, out)
    if can_build_cpp():
        _plain_ddp_loop(rank, out, layer_kernel="cpp")
    dist.barrier()
    dist.destroy_process_group()


def _plain_ddp_loop(rank: int, out: str, layer_kernel: str = "python") -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from unified_lora import MirrorConfig, SignalConfig, UnifiedController, setup_unified_lora

    torch.manual_seed(0)  # same initial model everywhere (DDP also broadcasts rank 0's)
    model = TinyClassifier()
    signal = SignalConfig(kind="loss", alpha=0.5, beta=0.5, loss_scale=0.5)
    # policy "always": the Mirror exit restores weights and AdamW moments, the hardest case for lockstep
    adapters, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], modules_to_save=["classifier"], signal=signal,
                                        mirror=MirrorConfig(policy="always", snapshot_optimizer=True), print_fn=None,
                                        layer_kernel=layer_kernel)
    ddp = DDP(model, **ddp_kwargs())
    check_ddp(ddp)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ctrl.attach_optimizer(opt)
    # the same controller without the all-reduce: shows what lockstep would be without it
    local = UnifiedController(signal=signal, reduce_loss=None, print_fn=None)

    g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    layers = list(adapters.values())
    rec = {"trace": [], "local_loss": [], "local_phi": [], "paused_grad_none": [], "paused_unchanged": []}
    for step in range(STEPS):
        y = torch.randint(0, 2, (8,), generator=g)
        x = torch.randint(5, 50, (8, 6), generator=g) + 45 * y[:, None]  # the class is in the tokens
        if step in CORRUPT:  # a window of flipped labels: the real loss jumps
            y = 1 - y
        loss = ddp(input_ids=x, labels=y)
        loss.backward()
        paused = _paused_blocks(layers)
        rec["paused_grad_none"].append(all(p.grad is None for p in paused))
        rec["local_loss"].append(loss.item())
        local.step(loss.item())
        rec["local_phi"].append(local.phi)
        ctrl.step(loss)
        assert_lockstep(ctrl)
        paused = _paused_blocks(layers)
        before = [p.detach().clone() for p in paused]
        opt.step()
        opt.zero_grad()
        rec["paused_unchanged"].append(all(torch.equal(b, p) for b, p in zip(before, paused)))
    rec["trace"] = [(r.step, r.phi, r.mode, r.rank, r.lr, r.snapshot, r.transition) for r in ctrl.trace]
    rec["weights"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(rec, os.path.join(out, f"rank{rank}{'' if layer_kernel == 'python' else '_' + layer_kernel}.pt"))


def _trainer_ddp(rank: int, out: str) -> None:
    """The stock Trainer (DDP through accelerate) with UnifiedLoRACallback."""
    from transformers import Trainer, TrainingArguments

    from unified_lora import SignalConfig, setup_unified_lora
    from unified_lora.callbacks import UnifiedLoRACallback

    class Shard(torch.utils.data.Dataset):
        def __init__(self, n=64):
            g = torch.Generator().manual_seed(0)
            self.y = torch.randint(0, 2, (n,), generator=g)
            self.x = torch.randint(5, 50, (n, 6), generator=g) + 45 * self.y[:, None]

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.y[i]}

    torch.manual_seed(0)
    model = TinyClassifier(return_dict=True)
    signal = SignalConfig(kind="loss", alpha=0.5, loss_scale=0.1)  # φ reaches MIRROR within a few steps
    _, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], modules_to_save=["classifier"], signal=signal,
                                 print_fn=None)
    args = TrainingArguments(output_dir=out, max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, seed=0, ddp_backend="gloo", logging_steps=1)
    cb = UnifiedLoRACallback(ctrl)
    trainer = Trainer(model=model, args=args, train_dataset=Shard(), callbacks=[cb])
    trainer.train()
    torch.save({"trace": [(r.step, r.loss, r.phi, r.mode, r.rank, r.lr) for r in ctrl.trace],
                "logs": [h for h in trainer.state.log_history if "loss" in h],
                "local_loss": cb.step_losses, "world": dist.get_world_size(),
                "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}},
               os.path.join(out, f"trainer{rank}.pt"))


def completion_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """`_CompletionRows`' labels: the completion's ids (20 and up), -100 on the prompt (3-19) and the padding (0)."""
    return torch.where(input_ids >= 20, input_ids, -100)


class _CompletionRows(torch.utils.data.Dataset):
    """Causal-LM rows for the stock Trainer: a prompt of 1-6 tokens, a completion of 1-6 and padding, labelled on the
    completion only, so that the micro-batches, and each process's share of a step, hold different numbers of label
    tokens."""

    def __init__(self, n=32, length=12):
        g = torch.Generator().manual_seed(0)
        self.x = torch.zeros(n, length, dtype=torch.long)
        for row, (p, c) in zip(self.x, torch.randint(1, 7, (n, 2), generator=g).tolist()):
            row[:p] = torch.randint(3, 20, (p,), generator=g)
            row[p:p + c] = torch.randint(20, 64, (c,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return {"input_ids": x, "attention_mask": (x != 0).long(), "labels": completion_labels(x)}


def _step_token_losses():
    """A Trainer callback that recomputes each training micro-batch's summed next-token NLL and its label tokens
    from the model's own logits, at its forward (a second forward without gradient: the same weights, rank and
    inputs): `.steps`, per optimizer step, a list of (NLL sum, tokens). Labels the Trainer popped (a
    compute_loss_func) are `completion_labels` of the ids."""
    from transformers import TrainerCallback

    class StepTokenLosses(TrainerCallback):
        def __init__(self):
            self.steps, self._hook = [], None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def recompute(module, a, kw):
                if not (module.training and torch.is_grad_enabled()):
                    return  # (this hook's own forward among them)
                labels = kw["labels"] if kw.get("labels") is not None else completion_labels(kw["input_ids"])
                inputs = {k: kw[k] for k in ("input_ids", "attention_mask", "position_ids") if kw.get(k) is not None}
                with torch.no_grad():
                    logits = module(**inputs, use_cache=False).logits[:, :-1].float()
                target = labels[:, 1:]
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                        ignore_index=-100, reduction="sum")
                self.steps[-1].append((nll.item(), int((target != -100).sum())))

            self._hook = model.register_forward_pre_hook(recompute, with_kwargs=True)

        def on_step_begin(self, args, state, control, **kwargs):
            self.steps.append([])

        def on_train_end(self, args, state, control, **kwargs):
            self._hook.remove()

    return StepTokenLosses()


CAUSAL_RUNS = ("lm", "loss_func", "sft", "sft_packed", "sft_local")


def _causal_lm_trainers_ddp(rank: int, out: str) -> None:
    """A causal LM (conftest's tiny Llama) under DDP with `average_tokens_across_devices=True` (the Trainer's
    default: the loss of each process is its token sum over the step's label tokens of every process, times the
    world size) and accumulation 2, each with UnifiedLoRACallback (`add_to`) and `_step_token_losses`: the stock
    Trainer with the model's own loss ("lm") and with a compute_loss_func ("loss_func", test_sft's twice the token
    mean), and TRL's SFTTrainer (completion-only loss through its fused LM head, SFTConfig's default gradient
    checkpointing, float32), on padded rows ("sft") and packed ones ("sft_packed"); and SFTTrainer with
    `average_tokens_across_devices=False` ("sft_local")."""
    import trl
    from transformers import Trainer, TrainingArguments

    from conftest import tiny_llama
    from test_sft import _doubled_token_mean, chat_tokenizer, prompt_completion_data, setup
    from unified_lora.callbacks import UnifiedLoRACallback

    common = dict(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                  learning_rate=1e-2, average_tokens_across_devices=True, logging_steps=1, use_cpu=True,
                  report_to="none", save_strategy="no", disable_tqdm=True, seed=0, data_seed=0, ddp_backend="gloo")

    def sft(model, rows=32, **kw):  # float32; SFTConfig's default gradient checkpointing makes the Trainer turn
        # find_unused_parameters off, which the callback refuses, naming the setting
        args = trl.SFTConfig(**{**common, "max_length": 64, "bf16": False, "ddp_find_unused_parameters": True, **kw})
        return trl.SFTTrainer(model=model, args=args, train_dataset=prompt_completion_data(rows),
                              processing_class=chat_tokenizer())

    builds = {
        "lm": lambda m: Trainer(model=m, args=TrainingArguments(**common), train_dataset=_CompletionRows()),
        "loss_func": lambda m: Trainer(model=m, args=TrainingArguments(**common), train_dataset=_CompletionRows(),
                                       compute_loss_func=_doubled_token_mean),
        "sft": sft,
        # packed ("bfd"): padding-free rows of several sequences, position_ids and no attention mask
        "sft_packed": lambda m: sft(m, 96, packing=True),
        # each process's token sum over its own tokens: DDP's gradient mean trains the mean of their token means
        "sft_local": lambda m: sft(m, average_tokens_across_devices=False),
    }
    for name in CAUSAL_RUNS:
        model = tiny_llama().train()
        _, ctrl = setup(model)
        trainer = builds[name](model)
        cb, rec = UnifiedLoRACallback(ctrl).add_to(trainer), _step_token_losses()
        trainer.add_callback(rec)
        trainer.train()
        torch.save({"trace": [(r.step, r.loss, r.phi, r.mode, r.rank, r.lr) for r in ctrl.trace],
                    "logs": [h for h in trainer.state.log_history if "loss" in h], "local_loss": cb.step_losses,
                    "steps": rec.steps, "world": dist.get_world_size(),
                    "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}},
                   os.path.join(out, f"causal_{name}{rank}.pt"))


def _accelerate_loop(rank: int, out: str) -> None:
    """A hand-written loop with accelerate's Accelerator (what `accelerate launch` runs)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from unified_lora import SignalConfig, setup_unified_lora
    from unified_lora.distributed import unwrap_optimizer

    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(**ddp_kwargs())])
    torch.manual_seed(0)
    model = TinyClassifier()
    signal = SignalConfig(kind="loss", alpha=0.5, loss_scale=0.1)  # φ reaches MIRROR within a few steps
    _, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], modules_to_save=["classifier"], signal=signal,
                                 print_fn=None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, opt = accelerator.prepare(model, opt)
    ctrl.attach_optimizer(unwrap_optimizer(opt))
    g = torch.Generator().manual_seed(200 + rank)
    for _ in range(8):
        y = torch.randint(0, 2, (8,), generator=g)
        loss = wrapped(input_ids=torch.randint(5, 50, (8, 6), generator=g) + 45 * y[:, None], labels=y)
        accelerator.backward(loss)
        ctrl.step(loss)
        opt.step()
        opt.zero_grad()
    torch.save({"world": accelerator.num_processes,
                "trace": [(r.step, r.loss, r.phi, r.mode, r.rank, r.lr) for r in ctrl.trace],
                "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}},
               os.path.join(out, f"accelerate{rank}.pt"))


def _spawn_once(tmp_path_factory, name: str, worker, nprocs: int = 2, before=None) -> str:
    """Run `worker` in `nprocs` spawned processes (after `before(folder)` in this process) once per pytest session, shared by the xdist workers (pytest-xdist's
    file-lock recipe); the folder its processes wrote to. The shared folder is the session's: under xdist each
    worker's base temp is a subfolder of it; without xdist it is the base temp itself (its parent,
    /tmp/pytest-of-<user>, outlives sessions, so a run there reused another session's, or another checkout's,
    results)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = str(root / name)
    with FileLock(str(root / f"{name}.lock")):
        if not os.path.isfile(os.path.join(out, "done")):
            os.makedirs(out, exist_ok=True)
            if before is not None:
                before(out)
            mp.spawn(worker, args=(nprocs, _free_port(), out), nprocs=nprocs, join=True)
            open(os.path.join(out, "done"), "w").close()
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = _spawn_once(tmp_path_factory, "unified_lora_ddp", _worker)
    runs = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    for r, run in enumerate(runs):
        for phase in ("trainer", "accelerate", *(f"causal_{name}" for name in CAUSAL_RUNS)):
            run[phase] = torch.load(os.path.join(out, f"{phase}{r}.pt"), weights_only=False)
        cpp = os.path.join(out, f"rank{r}_cpp.pt")
        run["cpp"] = torch.load(cpp, weights_only=False) if os.path.isfile(cpp) else None
    return runs


def test_ranks_see_different_data(ddp_run):
    assert ddp_run[0]["local_loss"] != ddp_run[1]["local_loss"]
    # fed to a controller without the all-reduce, those losses drive φ apart
    assert ddp_run[0]["local_phi"] != ddp_run[1]["local_phi"]


def test_every_rank_makes_the_same_decisions_on_the_same_step(ddp_run):
    assert ddp_run[0]["trace"] == ddp_run[1]["trace"]


def test_mirror_snapshot_saved_and_restored_on_the_same_step_everywhere(ddp_run):
    trace = ddp_run[0]["trace"]
    saved = [s for s, *_, snap, _ in trace if snap == "saved"]
    restored = [s for s, *_, snap, _ in trace if snap == "restored"]
    assert len(saved) == 1 and len(restored) == 1 and saved[0] < restored[0]
    assert [(s, snap) for s, *_, snap, _ in ddp_run[1]["trace"] if snap] == [(saved[0], "saved"),
                                                                              (restored[0], "restored")]


def test_final_weights_bit_identical_across_ranks(ddp_run):
    w0, w1 = ddp_run[0]["weights"], ddp_run[1]["weights"]
    assert w0.keys() == w1.keys() and len(w0) > 0
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.skipif(not can_build_cpp(), reason="layer_kernel='cpp' needs g++ and ninja")
def test_the_cpp_layer_kernel_under_ddp_follows_the_python_kernel_bit_for_bit(ddp_run):
    # DDP's reducer hooks see the C++ Function's gradients as they see the Python one's
    for r in ddp_run:
        assert r["cpp"] is not None, "the worker ran no cpp phase"
        assert r["cpp"]["trace"] == r["trace"] and r["cpp"]["local_loss"] == r["local_loss"]
        assert all(torch.equal(r["cpp"]["weights"][k], w) for k, w in r["weights"].items())
        assert all(r["cpp"]["paused_grad_none"]) and all(r["cpp"]["paused_unchanged"])


def test_ddp_leaves_paused_blocks_without_grad_and_untouched(ddp_run):
    for r in ddp_run:
        assert all(r["paused_grad_none"]) and all(r["paused_unchanged"])
    assert any(rank < 16 for _, _, _, rank, *_ in ddp_run[0]["trace"]), "some steps must have paused blocks"


def test_clear_paused_grads_drops_zero_filled_grads():
    from unified_lora import NestedLoRALayer

    layer = NestedLoRALayer(torch.nn.Linear(6, 6), rank_levels=(4, 8, 16), initial_rank=4)
    for p in layer.lora_parameters():
        p.grad = torch.zeros_like(p)  # what a zero-filling wrapper would leave
    assert clear_paused_grads([layer]) == 4
    assert all(p.grad is None for p in list(layer.lora_A[1:]) + list(layer.lora_B[1:]))
    assert all(p.grad is not None for p in layer.active_parameters())


def test_ddp_kwargs_refuse_settings_that_break_rank_switches():
    assert ddp_kwargs() == {"find_unused_parameters": True}
    with pytest.raises(ValueError, match="find_unused_parameters"):
        ddp_kwargs(find_unused_parameters=False)
    with pytest.raises(ValueError, match="static_graph"):
        ddp_kwargs(static_graph=True)


def test_trainer_callback_in_lockstep_under_ddp(ddp_run):
    r0, r1 = (r["trainer"] for r in ddp_run)
    assert r0["world"] == r1["world"] == 2
    assert r0["local_loss"] != r1["local_loss"]  # the Trainer's sampler gave each rank its own shard
    assert r0["trace"] == r1["trace"] and {m for *_, m, _, _ in r0["trace"]} == {1, 2}
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])


def test_trainer_logs_the_loss_the_controller_used_under_ddp(ddp_run):
    """unified_lora/loss is the loss φ was computed from (the mean over processes, as the Trainer's own `loss`
    log), logged beside φ at the same step. It used to be each process's own loss, so rank 0's TensorBoard/W&B
    showed its shard's loss next to a φ computed from another number."""
    for r in (r["trainer"] for r in ddp_run):
        assert len(r["logs"]) == len(r["trace"]) == 8
        assert [h["unified_lora/loss"] for h in r["logs"]] == [loss for _, loss, *_ in r["trace"]]
        assert [h["unified_lora/phi"] for h in r["logs"]] == [phi for _, _, phi, *_ in r["trace"]]
        assert [h["unified_lora/loss"] for h in r["logs"]] != r["local_loss"]


@pytest.mark.parametrize("name", CAUSAL_RUNS)
def test_a_causal_lm_under_ddp_feeds_the_controller_the_token_mean_over_every_process(ddp_run, name):
    """With `average_tokens_across_devices=True` (the default) the Trainer and SFTTrainer divide each process's token
    sum by the step's label tokens of every process and multiply it by the world size; the loss they train and log
    is the token mean over all the step's rows. The controller must see that number, on every process: here it
    equals that token mean recomputed from the model's logits at each forward, the Trainer's logged `loss` and
    `unified_lora/loss`. SFTTrainer's (its fused head's token means, weighted by their tokens) used to be each
    process's own token mean, averaged over processes: another number wherever the processes hold different
    numbers of label tokens (as here, completion-only loss), and neither the one trained nor the one logged. That
    average is right with `average_tokens_across_devices=False` ("sft_local"), where DDP's gradient mean trains it."""
    r0, r1 = (r[f"causal_{name}"] for r in ddp_run)
    assert r0["world"] == r1["world"] == 2
    assert r0["trace"] == r1["trace"] and len(r0["trace"]) == 3
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
    assert r0["local_loss"] != r1["local_loss"]  # each process's share of the step differs
    scale = 2.0 if name == "loss_func" else 1.0  # _doubled_token_mean
    token_mean, process_mean = [], []
    for mine, theirs in zip(r0["steps"], r1["steps"]):
        assert len(mine) == len(theirs) == 2  # accumulation 2
        nll, tokens = ([sum(v[i] for v in s) for s in (mine, theirs)] for i in (0, 1))
        token_mean.append(scale * sum(nll) / sum(tokens))
        process_mean.append(scale * (nll[0] / tokens[0] + nll[1] / tokens[1]) / 2)
    want, other = (process_mean, token_mean) if name == "sft_local" else (token_mean, process_mean)
    losses = [loss for _, loss, *_ in r0["trace"]]
    assert losses == pytest.approx(want, rel=1e-5)
    assert max(abs(a - b) for a, b in zip(want, other)) > 1e-3  # the check tells the two apart
    for r in (r0, r1):
        assert [h["unified_lora/loss"] for h in r["logs"]] == losses
        assert [h["loss"] for h in r["logs"]] == pytest.approx(losses, rel=1e-6)


def test_accelerate_loop_in_lockstep(ddp_run):
    r0, r1 = (r["accelerate"] for r in ddp_run)
    assert r0["world"] == r1["world"] == 2
    assert r0["trace"] == r1["trace"] and {m for *_, m, _, _ in r0["trace"]} == {1, 2}
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])


# ---------------------------------------------------------------------------- multi-task under DDP

MT_STEPS = 16


class PerSampleClassifier(TinyClassifier):
    def forward(self, input_ids, labels):  # per-sample losses, for per_task_losses
        h = torch.tanh(self.v_proj(torch.tanh(self.q_proj(self.embed(input_ids)))))
        return torch.nn.functional.cross_entropy(self.classifier(h), labels, reduction="none")


def _mt_batch(rank: int, step: int):
    """Each process its own data and its own tasks: at step 0 process 0 has only task "a"; every 4th step each
    process has one task for its whole batch (`task_id=`), "a" on 0 and "b" on 1; else both, in another order.
    Task "b" flips the labels, so the tasks conflict."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    y = torch.randint(0, 2, (8,), generator=g)
    x = torch.randint(5, 50, (8, 6), generator=g) + 45 * y[:, None]
    if step % 4 == 3:
        tids = "a" if rank == 0 else "b"
    elif step == 0 and rank == 0:
        tids = ["a"] * 8
    else:
        tids = ["a", "b"] * 4 if rank == 0 else ["b", "a"] * 4
    per_sample = [tids] * 8 if isinstance(tids, str) else tids
    return x, torch.tensor([1 - v if t == "b" else v for v, t in zip(y.tolist(), per_sample)]), tids


def _mt_setup():
    from unified_lora import MachineConfig
    from unified_lora.multitask import MultiTaskSignalConfig, setup_multitask_lora

    torch.manual_seed(0)
    model = PerSampleClassifier()
    # starts in SINGLE (φ from 0); splits (step 2), merges back (3), splits again within resplit_window of the merge,
    # so the task adapters come back (6), then a Mirror cycle (entered at 13, restored at 14). The plain gradient
    # conflict (grad_noise="none"), which reads from a task's first step, as this trajectory needs; the debiased one
    # (C_grad_raw beside it) and each task's reliability ρ are in the trace components all the same, compared bit
    # for bit across the processes and the resumes
    signal = MultiTaskSignalConfig(alpha=0.3, loss_scale=0.5, phi_init=0.0, grad_noise="none")
    adapters, ctrl = setup_multitask_lora(model, tasks=["a", "b"], target_modules=["q_proj", "v_proj", "classifier"],
                                          machine=MachineConfig(initial_mode=0, theta1=0.6), signal=signal,
                                          print_fn=None)
    return model, adapters, ctrl


def _worker2(rank: int, world: int, port: int, out: str) -> None:
    """A second spawn: multi-task DDP (whose failure on the old code was a collective mismatch, kept apart from
    the first spawn's checks) and the activation-checkpointing settings."""
    _init_gloo(rank, world, port, timeout=datetime.timedelta(seconds=60))
    _multitask_ddp_loop(rank, out)
    _checkpointing_settings(rank, out)
    _shared_trace_path(rank, out)
    dist.barrier()
    dist.destroy_process_group()


# states saved (on process 0) before these steps: SINGLE just after the merge (with gradient EMAs), MULTI just after
# the second split, mid-MIRROR (snapshot held; the next step restores it)
MT_RESUME = (4, 7, 14)


def _mt_ddp_build():
    from torch.nn.parallel import DistributedDataParallel as DDP

    from unified_lora import trainable_parameters

    model, _, ctrl = _mt_setup()
    ddp = DDP(model, **ddp_kwargs())
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    ctrl.attach_optimizer(opt)
    return model, ddp, ctrl, opt


def _mt_ddp_steps(rank, steps, model, ddp, ctrl, opt, rec, save_dir=None) -> None:
    from unified_lora.multitask import per_task_losses, task_context

    for step in steps:
        if save_dir is not None and rank == 0 and step in MT_RESUME:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ctrl": ctrl.state_dict()},
                       os.path.join(save_dir, f"mt_state{step}.pt"))
        x, y, tids = _mt_batch(rank, step)
        with task_context(ddp, tids):
            per = ddp(input_ids=x, labels=y)
        loss = per.mean()
        loss.backward()
        if isinstance(tids, str):
            rec["local"].append({tids: loss.item()})
            ctrl.step(loss, task_id=tids)
        else:
            rec["local"].append(per_task_losses(per, tids))
            ctrl.step(loss, task_losses=rec["local"][-1])
        assert_lockstep(ctrl)
        opt.step()
        opt.zero_grad()


def _mt_record(rec, model, ctrl) -> None:
    rec["trace"] = [(r.step, r.phi, r.mode, r.rank, r.snapshot, r.transition, r.components) for r in ctrl.trace]
    rec["weights"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _multitask_ddp_loop(rank: int, out: str) -> None:
    from unified_lora.multitask import (TaskRouter, export_task_peft_adapters, load_task_adapters,
                                        save_task_adapters)

    model, ddp, ctrl, opt = _mt_ddp_build()
    rec = {"local": [], "error": None, "resumed": {}}
    try:
        _mt_ddp_steps(rank, range(MT_STEPS), model, ddp, ctrl, opt, rec, save_dir=out)
    except Exception as e:  # recorded, so the test shows it
        rec["error"] = f"{type(e).__name__}: {e}"
    _mt_record(rec, model, ctrl)
    dist.barrier()  # process 0's states are written
    for k in MT_RESUME:  # every process loads process 0's state into a fresh model, optimizer and controller
        r = {"local": [], "error": None}
        try:
            m2, ddp2, c2, o2 = _mt_ddp_build()
            ck = torch.load(os.path.join(out, f"mt_state{k}.pt"), weights_only=False)
            m2.load_state_dict(ck["model"])
            o2.load_state_dict(ck["opt"])
            c2.load_state_dict(ck["ctrl"])
            assert_lockstep(c2)
            _mt_ddp_steps(rank, range(k, MT_STEPS), m2, ddp2, c2, o2, r)
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {e}"
        _mt_record(r, m2, c2)
        rec["resumed"][k] = r
        del ddp2
    # adapters saved through the DDP wrapper by every process into one folder, read back into a bare model
    save_task_adapters(ddp, os.path.join(out, "adapters"))
    dist.barrier()
    bare, _, _ = _mt_setup()
    try:
        load_task_adapters(bare, os.path.join(out, "adapters"))
        rec["adapters_loaded"] = all(torch.equal(p, model.get_parameter(n)) for n, p in bare.named_parameters())
    except Exception as e:
        rec["adapters_loaded"] = f"{type(e).__name__}: {e}"
    if rank == 0:  # the PEFT export, on one process only (it runs no collective)
        export_task_peft_adapters(ddp, os.path.join(out, "peft"))
        with open(os.path.join(out, "peft", "a", "adapter_config.json")) as f:
            rec["peft_targets"] = sorted(json.load(f)["target_modules"])
    dist.barrier()
    router = TaskRouter(["a"], spare_slots=1, register_new_tasks=True)
    try:
        router.slot("c")
    except ValueError as e:
        rec["register_error"] = str(e)
    torch.save(rec, os.path.join(out, f"mt{rank}.pt"))


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32, num_labels=2))


def _checkpointing_settings(rank: int, out: str) -> None:
    """Activation checkpointing under DDP: which settings run, and the errors for those that cannot."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import Trainer, TrainingArguments

    from unified_lora import setup_unified_lora
    from unified_lora.callbacks import UnifiedLoRACallback

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": torch.arange(6) + 5 * i, "labels": torch.tensor(i % 2)}

    # (checkpointing enabled on the model itself with these kwargs, or None; TrainingArguments)
    cases = {"model_ckpt": ({}, {}),  # the Trainer's DDP default follows the model: find_unused off
             "reentrant": ({"use_reentrant": True}, {"ddp_find_unused_parameters": True}),
             "args_ckpt": (None, {"gradient_checkpointing": True, "ddp_find_unused_parameters": True})}
    rec = {}
    for name, (on_model, kw) in cases.items():
        model = _tiny_bert()
        _, ctrl = setup_unified_lora(model, ["query", "value"], modules_to_save=["classifier"], signal="loss",
                                     print_fn=None)
        if on_model is not None:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=on_model or None)
        args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                                 use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                                 ddp_backend="gloo", **kw)
        try:
            Trainer(model=model, args=args, train_dataset=Data(), callbacks=[UnifiedLoRACallback(ctrl)]).train()
            rec[name] = len(ctrl.trace)
        except Exception as e:
            rec[name] = f"{type(e).__name__}: {e}"
        dist.barrier()
    model = _tiny_bert()
    setup_unified_lora(model, ["query", "value"], print_fn=None)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    ddp = DDP(model, **ddp_kwargs())
    try:
        check_ddp(ddp)
        rec["check_ddp"] = "no error"
    except ValueError as e:
        rec["check_ddp"] = f"ValueError: {e}"
    del ddp
    torch.save(rec, os.path.join(out, f"ckpt{rank}.pt"))


def _shared_trace_path(rank: int, out: str) -> None:
    """Every process builds its controller with the same `trace_path` (what a script launched by torchrun does), runs
    5 steps, then resumes from the state of step 3 with a fresh controller appending to that file (as the CLI does)
    and runs 4 more."""
    from unified_lora import UnifiedController
    from unified_lora.trace import TraceWriter

    path = os.path.join(out, "trace.jsonl")
    losses = [[0.9, 0.7, 0.8, 0.6, 0.5, 0.4, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]][rank]  # this process's own
    ctrl = UnifiedController(signal="loss", trace_path=path, print_fn=None)
    for step in range(5):
        if step == 3:
            state = ctrl.state_dict()
        ctrl.step(losses[step])
    ctrl.close()
    dist.barrier()
    resumed = UnifiedController(signal="loss", print_fn=None)
    resumed.writer = TraceWriter(path, append=True)
    resumed.load_state_dict(state)  # keeps the lines of steps 0-2
    for step in range(3, 7):
        resumed.step(losses[step])
    resumed.close()
    own = os.path.join(out, f"own{rank}.jsonl")  # a controller that does not all-reduce records its own steps
    local = UnifiedController(signal="loss", trace_path=own, reduce_loss=None, print_fn=None)
    for v in losses[:3]:
        local.step(v)
    local.close()
    dist.barrier()
    torch.save({"trace": read_trace(path), "own": read_trace(own)}, os.path.join(out, f"trace{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_run2(tmp_path_factory):
    out = _spawn_once(tmp_path_factory, "unified_lora_ddp2", _worker2)
    return {name: [torch.load(os.path.join(out, f"{name}{r}.pt"), weights_only=False) for r in range(2)]
            for name in ("mt", "ckpt", "trace")}


@pytest.fixture
def mt_ddp_run(ddp_run2):
    return ddp_run2["mt"]


def test_multitask_under_ddp_stays_in_lockstep_when_processes_see_different_tasks(mt_ddp_run):
    """Each process has its own tasks at a step (one process only "a", the other both; or one task each with
    `task_id=`). The old code all-reduced each process's task losses one by one (a different number of collectives
    per process: a hang), credited the all-reduced loss to each process's own `task_id` (φ drifted apart), and
    averaged conflicts that one process had and another had not yet."""
    r0, r1 = mt_ddp_run
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert len(r0["trace"]) == MT_STEPS and r0["trace"] == r1["trace"]  # every component too, bit for bit
    events = [(t[6]["topology"], t[5], t[4]) for t in r0["trace"]]
    assert ("shared", None, None) in events and ("task", "SINGLE->MULTI", None) in events
    assert ("shared", "MULTI->SINGLE", None) in events  # a merge
    assert r0["trace"][6][5] == "SINGLE->MULTI" and r0["trace"][6][6]["tasks_back"] == 2  # the split after it
    assert ("task", "MULTI->MIRROR", "saved") in events and ("task", "MIRROR->MULTI", "restored") in events
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])


def test_multitask_under_ddp_resumes_from_a_saved_state_on_the_same_trajectory(mt_ddp_run):
    """Process 0's `ctrl.state_dict()` (with the model's and optimizer's), saved in SINGLE just after a merge, in
    MULTI just after a split and mid-MIRROR, loaded on every process into a fresh model, optimizer and controller:
    the run goes on as the uninterrupted one, every trace component and weight bit for bit (and the Mirror
    snapshot it held is restored on the same step)."""
    r0, r1 = mt_ddp_run
    full = r0["trace"]
    assert [full[k - 1][6]["topology"] for k in MT_RESUME] == ["shared", "task", "task"]
    assert full[3][5] == "MULTI->SINGLE" and full[6][5] == "SINGLE->MULTI" and full[13][2] == 2
    for k in MT_RESUME:
        for r in (r0, r1):
            res = r["resumed"][k]
            assert res["error"] is None, (k, res["error"])
            assert res["trace"] == full[k:], k
            assert all(torch.equal(res["weights"][n], w) for n, w in r0["weights"].items()), k
    assert r0["resumed"][14]["trace"][0][4] == "restored"


def test_multitask_adapters_saved_through_ddp_load_into_a_bare_model_and_export_for_peft(mt_ddp_run):
    """Saved through the DDP wrapper, the files named every layer `module.q_proj`: a bare model refused them ("no
    tensor 'q_proj.lora_A'") and the PEFT export targeted `module.q_proj`, which matches nothing in a fresh base."""
    r0, r1 = mt_ddp_run
    assert r0["adapters_loaded"] is True and r1["adapters_loaded"] is True
    assert r0["peft_targets"] == ["classifier", "q_proj", "v_proj"]


def test_multitask_under_ddp_combines_task_losses_and_gradients_across_processes(mt_ddp_run):
    """Step 0: process 0 saw only task "a", process 1 both. A task's loss is the mean over the processes that saw it;
    the gradient conflict is that of the whole 2-process batch, as one process computes it on the two batches
    together (DDP's gradient is the mean of two equal-size batch means, so the per-task gradients match)."""
    from unified_lora.multitask import per_task_losses, task_context

    r0, r1 = mt_ddp_run
    (l0, l1), comps = (r0["local"][0], r1["local"][0]), r0["trace"][0][6]
    assert set(l0) == {"a"} and set(l1) == {"a", "b"}
    scale = 0.5  # _mt_setup's loss_scale; E[t] starts at the first loss / scale
    assert comps["E[a]"] == pytest.approx((l0["a"] + l1["a"]) / 2 / scale, rel=1e-12)
    assert comps["E[b]"] == pytest.approx(l1["b"] / scale, rel=1e-12)

    model, _, ctrl = _mt_setup()  # no process group here: one process, both batches
    (x0, y0, t0), (x1, y1, t1) = _mt_batch(0, 0), _mt_batch(1, 0)
    with task_context(model, t0 + t1):
        per = model(input_ids=torch.cat([x0, x1]), labels=torch.cat([y0, y1]))
    per.mean().backward()
    ctrl.step(per.mean(), task_losses=per_task_losses(per, t0 + t1))
    assert comps["C_grad"] == pytest.approx(ctrl.trace[0].components["C_grad"], abs=1e-6)
    assert comps["C_grad"] > 0.5 and comps["rho[a]"] == ctrl.trace[0].components["rho[a]"] == 0.0  # (a first step)


def test_register_new_tasks_is_refused_under_ddp(mt_ddp_run):
    """Processes see different batches: registering in the forward would give different tasks one slot."""
    for r in mt_ddp_run:
        assert "register_new_tasks cannot register it under DDP" in r["register_error"]
        assert "router.register_task('c') on every process" in r["register_error"]


def test_activation_checkpointing_under_ddp_runs_or_is_refused_with_the_setting_to_change(ddp_run2):
    """Checkpointing enabled on the model (not through TrainingArguments) made the Trainer build DDP without
    find_unused_parameters: DDP's 'Expected to have finished reduction' after the first step. Reentrant
    checkpointing cannot run with find_unused_parameters=True: 'Expected to mark a variable ready only once' at the
    first backward. Both now fail before training, naming the setting; non-reentrant checkpointing (transformers'
    default) with ddp_find_unused_parameters=True trains."""
    for r in ddp_run2["ckpt"]:
        assert r["model_ckpt"].startswith("ValueError: ddp_find_unused_parameters: must be True")
        assert "The Trainer turns it off when activation checkpointing is on" in r["model_ckpt"]
        for key in ("reentrant", "check_ddp"):
            assert r[key].startswith("ValueError: activation_checkpointing_kwargs: use_reentrant must be False")
        assert r["args_ckpt"] == 2  # both steps ran


def test_a_trace_path_shared_by_every_process_holds_each_step_once_also_after_a_resume(ddp_run2):
    """Every process wrote each record into the shared file (steps 0, 1, 1, 2, 2, ...), and on resume every process
    rewrote it: one process then appended to the file another had replaced, and the steps after the resume were
    missing or doubled. Now process 0 alone writes it; the records are the all-reduced ones every process shares."""
    r0, r1 = (r["trace"] for r in ddp_run2["trace"])
    assert r0 == r1  # one file, read after both processes finished
    assert [r["step"] for r in r0] == list(range(7))
    mean = [(a + b) / 2 for a, b in zip([0.9, 0.7, 0.8, 0.6, 0.5, 0.4, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])]
    assert [r["loss"] for r in r0] == pytest.approx(mean, rel=1e-12)
    for r, own in enumerate(([0.9, 0.7, 0.8], [0.1, 0.2, 0.3])):  # reduce_loss=None: each process its own file
        assert [x["loss"] for x in ddp_run2["trace"][r]["own"]] == own


def _worker_console(rank: int, world: int, port: int, out: str) -> None:
    """The console lines of controllers with the default `print_fn` (one built before the process group, the setup
    functions'), with `print_fn=print`, and with a `reduce_loss` group of their own, each over 3 steps
    (`log_every=1`), as each process printed them."""
    import contextlib
    import io

    from unified_lora import UnifiedController, distributed_mean, setup_unified_lora
    from unified_lora.multitask import per_task_losses, setup_multitask_lora, task_context

    early = UnifiedController(signal="loss", log_every=1)  # before init_process_group
    _init_gloo(rank, world, port, timeout=datetime.timedelta(seconds=60))
    own = [dist.new_group([r]) for r in range(world)]  # (every process makes every group)
    torch.manual_seed(0)
    plain, mt = TinyClassifier(), PerSampleClassifier()
    ctrls = {"early": early, "late": UnifiedController(signal="loss", log_every=1),
             "setup": setup_unified_lora(plain, ["q_proj", "v_proj"], signal="loss", log_every=1)[1],
             "multitask": setup_multitask_lora(mt, ["a", "b"], ["q_proj", "v_proj"], log_every=1)[1],
             "print": UnifiedController(signal="loss", log_every=1, print_fn=print),
             "own_group": UnifiedController(signal="loss", log_every=1,
                                            reduce_loss=functools.partial(distributed_mean, group=own[rank]))}
    printed = {}
    for name, ctrl in ctrls.items():
        with contextlib.redirect_stdout(io.StringIO()) as buf:
            for step in range(3):
                x, y, tids = _mt_batch(rank, step)  # (a list of task ids at steps 0-2)
                if name == "setup":
                    loss = plain(input_ids=x, labels=y)
                    loss.backward()
                    ctrl.step(loss.item())
                elif name == "multitask":
                    with task_context(mt, tids):
                        per = mt(input_ids=x, labels=y)
                    per.mean().backward()
                    ctrl.step(per.mean().item(), task_losses=per_task_losses(per, tids))
                else:
                    ctrl.step(0.5 + 0.1 * step + rank)
        printed[name] = buf.getvalue().splitlines()
    dist.barrier()
    dist.destroy_process_group()
    torch.save(printed, os.path.join(out, f"console{rank}.pt"))


@pytest.fixture(scope="module")
def console_run(tmp_path_factory):
    out = _spawn_once(tmp_path_factory, "unified_lora_console", _worker_console)
    return [torch.load(os.path.join(out, f"console{r}.pt"), weights_only=False) for r in range(2)]


def test_the_default_console_line_prints_on_process_0_only_under_ddp(console_run):
    """Every process printed each console line of `log_every` (a 2-process run printed each line twice). The default
    `print_fn` now prints on process 0 only, also for a controller built before `init_process_group` and for the
    setup functions' controllers; a `print_fn` passed (`print`) prints on every process, and a controller reducing
    over a group of its own prints on that group's first process."""
    first, second = console_run
    for name in ("early", "late", "setup", "multitask"):
        assert [line.split(" ")[0] for line in first[name]] == ["[0]", "[1]", "[2]"], (name, first[name])
        assert second[name] == [], (name, second[name])
    assert first["print"] == second["print"] == first["late"]  # the all-reduced loss: the same lines
    # each process is its own group's first: its own loss
    assert [len(run["own_group"]) for run in console_run] == [3, 3]
    assert first["own_group"][0] != second["own_group"][0]


# ---------------------------------------------------------------------------- FSDP2 (fully_shard)

FSDP_STEPS, FSDP_CORRUPT = 26, range(14, 20)


def _fsdp_batch(rank: int, step: int):
    """Process `rank`'s batch at `step` (8 rows); a window of flipped labels makes the loss jump."""
    g = torch.Generator().manual_seed(300 + 1000 * rank + step)
    y = torch.randint(0, 2, (8,), generator=g)
    x = torch.randint(5, 50, (8, 6), generator=g) + 45 * y[:, None]
    return x, (1 - y if step in FSDP_CORRUPT else y)


def _fsdp_setup(kind: str, **ctrl_kw):
    from unified_lora import MirrorConfig, SignalConfig, setup_unified_lora

    torch.manual_seed(0)
    model = TinyClassifier()
    # the drift policy: the exit decision reads the drift, which must be that of the full tensors on every process
    signal = (SignalConfig(kind="loss", alpha=0.5, beta=0.5, loss_scale=0.5) if kind == "loss"
              else SignalConfig(kind="composite", alpha=0.5, min_history=3))
    _, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], modules_to_save=["classifier"], signal=signal,
                                 mirror=MirrorConfig(policy="drift", snapshot_optimizer=True), print_fn=None,
                                 **ctrl_kw)
    return model, ctrl


def _fsdp_opt(model, ctrl):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ctrl.attach_optimizer(opt)
    return opt


def _fsdp_train(model, ctrl, batches, rec=None, opt=None, on_step=None):
    """The loop on `batches(step)` from the controller's step on; with `rec`, what the FSDP checks need after each
    step; `on_step(step, opt)` after each optimizer step."""
    opt = _fsdp_opt(model, ctrl) if opt is None else opt
    for step in range(ctrl.global_step, FSDP_STEPS):
        x, y = batches(step)
        loss = model(input_ids=x, labels=y)
        loss.backward()
        ctrl.step(loss)
        paused = _paused_blocks(ctrl.adapters)
        if rec is not None:
            assert_lockstep(ctrl)
            rec["paused_grad_none"].append(all(p.grad is None for p in paused))
            before = [p.detach().to_local().clone() for p in paused]
        opt.step()
        opt.zero_grad()
        if rec is not None:
            rec["paused_unchanged"].append(all(torch.equal(b, p.detach().to_local()) for b, p in zip(before, paused)))
        if on_step is not None:
            on_step(step, opt)
    return [(r.step, r.phi, r.mode, r.rank, r.snapshot, r.transition, r.drift) for r in ctrl.trace]


def _fsdp_sharded(kind: str, mesh=None, ctrl_kw=None, **kw):
    from torch.distributed.fsdp import fully_shard

    model, ctrl = _fsdp_setup(kind, **(ctrl_kw or {}))
    for name in ("q_proj", "v_proj", "classifier"):  # each block on its own, then the root (FSDP2's recipe)
        fully_shard(getattr(model, name), mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model, ctrl


FSDP_SAVE_AT = 12  # mid-MIRROR: the snapshot (weights and AdamW moments) was taken at step 11, step 13 restores it


def _legacy_save(ckpt: str, model, opt, ctrl) -> None:
    """What `save_sharded_checkpoint` wrote before it resharded the controller: the model and optimizer through
    torch.distributed.checkpoint, the controller's state per process (`ctrl_rank{rank}.pt`, this process's shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    torch.save(ctrl.state_dict(), os.path.join(ckpt, f"ctrl_rank{dist.get_rank()}.pt"))


def _fsdp_save(rank, out, model, ctrl, step, opt) -> None:
    """The README's FSDP2 checkpoint: the model, optimizer and controller through torch.distributed.checkpoint (every
    process writes its shards; the controller's per-process state once); and the older format beside it."""
    from unified_lora.distributed import save_sharded_checkpoint

    if step != FSDP_SAVE_AT:
        return
    save_sharded_checkpoint(os.path.join(out, "fsdp_ckpt"), model, opt, ctrl)
    _legacy_save(os.path.join(out, "fsdp_ckpt_legacy"), model, opt, ctrl)


def _fsdp_resume(rank: int, out: str) -> None:
    """Resume the composite run from the checkpoint `_fsdp_save` wrote mid-MIRROR, in a fresh model, optimizer and
    controller; then the loads that must be refused."""
    from unified_lora.distributed import load_sharded_checkpoint

    ckpt, legacy = os.path.join(out, "fsdp_ckpt"), os.path.join(out, "fsdp_ckpt_legacy")
    saved = torch.load(os.path.join(legacy, f"ctrl_rank{rank}.pt"), weights_only=True)  # plain tensors only
    rec = {}
    for key, where in (("", ckpt), ("legacy_", legacy)):  # this version's checkpoint, and the older one's
        model, ctrl = _fsdp_sharded("composite")
        opt = _fsdp_opt(model, ctrl)
        try:  # (a refusal is the same on both processes, before any collective: the other FSDP2 checks still run)
            load_sharded_checkpoint(where, model, opt, ctrl)
        except ValueError as e:
            torch.save({"refused": str(e)}, os.path.join(out, f"fsdp_resume{rank}.pt"))
            return
        rec.update({key + "held": ctrl.mirror.held, key + "step": ctrl.global_step,
                    key + "prev": sum(map(len, ctrl.grad_stats.prev))})
        rec[key + "trace"] = _fsdp_train(model, ctrl, lambda step: _fsdp_batch(rank, step), opt=opt)
        rec[key + "weights"] = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}

    def refused(ctrl, sd):
        try:
            ctrl.load_state_dict(sd)
            return "no error"
        except ValueError as e:
            return str(e)

    # the other process's state (what every process loads from accelerate's save_state, written by process 0 alone)
    other = torch.load(os.path.join(legacy, f"ctrl_rank{1 - rank}.pt"), weights_only=False)
    rec["other_rank"] = refused(ctrl, other)
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    acc.register_for_checkpointing(ctrl)
    acc.save_state(os.path.join(out, "fsdp_acc"))
    acc.wait_for_everyone()  # (save_state returns on the other processes before process 0 has written)
    try:
        acc.load_state(os.path.join(out, "fsdp_acc"))
        rec["accelerate"] = "no error"
    except ValueError as e:
        rec["accelerate"] = str(e)
    # a one-process (unsharded) state, with stored gradients
    plain, pctrl = _fsdp_setup("composite")
    popt = _fsdp_opt(plain, pctrl)
    for step in range(2):
        loss = plain(*_fsdp_batch(rank, step))
        loss.backward()
        pctrl.step(loss)
        popt.step()
        popt.zero_grad()
    rec["unsharded"] = refused(ctrl, pctrl.state_dict())
    # the state of 2 processes loaded by a run sharded over one (each process its own 1-process mesh)
    from torch.distributed.device_mesh import DeviceMesh

    groups = [dist.new_group([r]) for r in range(2)]  # every process creates every group
    _, octrl = _fsdp_sharded("composite", mesh=DeviceMesh.from_group(groups[rank], "cpu"))
    rec["world_size"] = refused(octrl, saved)
    # the same processes, each parameter sharded on its last dimension
    from torch.distributed.tensor import Shard

    _, sctrl = _fsdp_sharded("composite", shard_placement_fn=lambda p: Shard(p.dim() - 1))
    rec["placements"] = refused(sctrl, saved)
    torch.save(rec, os.path.join(out, f"fsdp_resume{rank}.pt"))


def _fsdp_loop(rank: int, out: str) -> None:
    from unified_lora import lora_state_dict
    from unified_lora.peft_io import export_peft_adapter

    rec = {}
    for kind in ("loss", "composite"):
        model, ctrl = _fsdp_sharded(kind)
        r = {"paused_grad_none": [], "paused_unchanged": []}
        save = functools.partial(_fsdp_save, rank, out, model, ctrl) if kind == "composite" else None
        r["trace"] = _fsdp_train(model, ctrl, lambda step: _fsdp_batch(rank, step), r, on_step=save)
        if kind == "loss":  # MULTI, no snapshot held, no stored gradients: a state without shards
            torch.save(ctrl.state_dict(), os.path.join(out, f"ctrl_loss{rank}.pt"))
        r["sharded"] = [type(p).__name__ for p in ctrl.managed_parameters()]
        r["local_shapes"] = [tuple(p.to_local().shape) for p in ctrl.managed_parameters()]
        r["weights"] = {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        rec[kind] = r
    sd = lora_state_dict(model)  # every process: it gathers
    rec["lora_sd"] = {k: (type(v).__name__, tuple(v.shape)) for k, v in sd.items()}
    rec["lora_sd_equal"] = all(torch.equal(v, model.get_parameter(k).full_tensor()) for k, v in sd.items()
                               if not k.endswith("_extra_state"))
    try:
        export_peft_adapter(model, None, os.path.join(out, f"peft{rank}"))
        rec["export"] = "no error"
    except ValueError as e:
        rec["export"] = str(e)
    torch.save(rec, os.path.join(out, f"fsdp{rank}.pt"))


def _fsdp1_refusal(rank: int, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model, ctrl = _fsdp_setup("composite")
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    rec = {}
    try:
        check_ddp(wrapped)
        rec["check_ddp"] = "no error"
    except ValueError as e:
        rec["check_ddp"] = str(e)
    try:
        ctrl.attach_optimizer(torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2))
        rec["attach"] = "no error"
    except ValueError as e:
        rec["attach"] = str(e)
    torch.save(rec, os.path.join(out, f"fsdp1_{rank}.pt"))


def _fsdp_multitask_refusal(rank: int, out: str) -> None:
    """Multi-task mode under FSDP2: refused at the first step on every process, before anything moves."""
    from torch.distributed.fsdp import fully_shard

    from unified_lora.multitask import setup_multitask_lora, task_context

    torch.manual_seed(0)
    model = TinyClassifier()
    _, ctrl = setup_multitask_lora(model, ["a", "b"], ["q_proj", "v_proj"], print_fn=None)
    for name in ("q_proj", "v_proj"):
        fully_shard(getattr(model, name))
    fully_shard(model)
    x, y = _fsdp_batch(rank, 0)
    with task_context(model, ["a"] * len(y)):
        loss = model(input_ids=x, labels=y)
    loss.backward()
    try:
        ctrl.step(loss, task_id="a")
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    torch.save({"multitask": msg, "step": ctrl.global_step}, os.path.join(out, f"fsdp_mt{rank}.pt"))


RESHARD_ROWS = 24  # the global batch of the resharding runs: the same rows over 1, 2 or 3 processes


def _reshard_batches(rank: int, world: int):
    """Process `rank` of `world`'s part of the global batch (three `_fsdp_batch`es, 24 rows) at each step."""
    def batches(step):
        x, y = (torch.cat(t) for t in zip(*(_fsdp_batch(r, step) for r in range(3))))
        n = RESHARD_ROWS // world
        return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    return batches


def _full(t, param):
    """A controller tensor that holds this process's shard of `param`, as the full tensor (a collective under FSDP2)."""
    from unified_lora.distributed import like_sharded, local_tensor

    t = local_tensor(t)
    d = like_sharded(t, param)
    return (d.full_tensor() if d is not t else t).detach().clone()  # (over one process, full_tensor is the shard)


def _ctrl_full(ctrl) -> dict:
    """What a resume must carry over, with the controller's shards as full tensors (every process must call it)."""
    from unified_lora.layer import blocks_of

    managed = ctrl.managed_parameters()
    rec = {"step": ctrl.global_step, "mode": ctrl.mode, "rank": ctrl.rank, "held": ctrl.mirror.held,
           "signal": ctrl.signal.state_dict(), "machine": ctrl.machine.state_dict(), "loss_ema": ctrl.loss_ema,
           "loss_at_entry": ctrl.mirror.loss_at_entry, "step_saved": ctrl.mirror.step_saved,
           "snapshot": [_full(w, p) for w, p in zip(ctrl.mirror.weights or [], managed)],
           "moments": [{k: _full(v, p) if k != "step" else v.clone() for k, v in st.items()}
                       for st, p in zip(ctrl.mirror.opt_state or [], managed) if st],
           "prev": []}
    for a, gs in zip(ctrl.adapters, ctrl.grad_stats.prev):
        k = len(gs) // 2
        blocks = blocks_of(a.lora_A)[:k] + blocks_of(a.lora_B)[:k]
        rec["prev"].append([_full(g, p) for g, p in zip(gs, blocks)])
    return rec


def _full_weights(model) -> dict:
    from unified_lora.distributed import local_tensor

    return {n: (p.full_tensor() if local_tensor(p) is not p else p.detach().clone())
            for n, p in model.named_parameters() if p.requires_grad}


def _save_at_first_snapshot(save, ctrl, rec):
    """`on_step` for `_fsdp_train`: `save(opt)` once, after the first step that leaves a Mirror snapshot held (a
    checkpoint mid-MIRROR), and what a resume from it must carry over, in `rec`."""
    def on_step(step, opt):
        if ctrl.mirror.held and "saved_at" not in rec:
            save(opt)
            rec["saved_at"], rec["at_save"] = step, _ctrl_full(ctrl)
    return on_step


def _fsdp_one_process(out: str) -> None:
    """The composite FSDP2 run over one process (in the test process, before the spawn) on the whole global batch,
    with a checkpoint mid-MIRROR that the 2-process run resumes."""
    from unified_lora.distributed import save_sharded_checkpoint

    _one_process_group()
    try:
        model, ctrl = _fsdp_sharded("composite")
        rec = {}
        save = functools.partial(save_sharded_checkpoint, os.path.join(out, "reshard1"), model, ctrl=ctrl)
        rec["trace"] = _fsdp_train(model, ctrl, _reshard_batches(0, 1), on_step=_save_at_first_snapshot(
            lambda opt: save(optimizer=opt), ctrl, rec))
        rec["weights"] = _full_weights(model)
        torch.save(rec, os.path.join(out, "reshard_one.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp_resharded_run(ckpt: str, rank: int, world: int) -> dict:
    """A fresh composite FSDP2 run over `world` processes that loads `ckpt` and trains on to the end on this
    process's part of the global batch: the state it loaded, its trace and its gathered weights (or the load's
    refusal)."""
    from unified_lora.distributed import load_sharded_checkpoint

    model, ctrl = _fsdp_sharded("composite")
    opt = _fsdp_opt(model, ctrl)
    try:
        load_sharded_checkpoint(ckpt, model, opt, ctrl)
    except (ValueError, OSError) as e:  # (raised before any collective)
        return {"refused": f"{type(e).__name__}: {e}"}
    rec = {"loaded": _ctrl_full(ctrl), "local_shapes": [tuple(p.to_local().shape) for p in ctrl.managed_parameters()]}
    rec["trace"] = _fsdp_train(model, ctrl, _reshard_batches(rank, world), opt=opt)
    rec["weights"] = _full_weights(model)
    return rec


def _ddp_reshard_run(rank: int, world: int, out: str, load: str | None = None) -> dict:
    """The composite run under DDP over `world` processes (gloo) on the global batch. Without `load`: from the start,
    with the model, optimizer and controller saved by process 0 at the first step that holds a Mirror snapshot;
    with `load`: resumed from such a save."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, ctrl = _fsdp_setup("composite")
    ddp = DDP(model, **ddp_kwargs()) if world > 1 else model
    opt = _fsdp_opt(model, ctrl)
    rec = {}
    on_step = None
    if load is not None:
        sd = torch.load(load, weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["opt"])
        ctrl.load_state_dict(sd["ctrl"])
        rec["loaded"] = _ctrl_full(ctrl)
    else:
        def save(opt):
            if rank == 0:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ctrl": ctrl.state_dict()},
                           os.path.join(out, "ddp_reshard.pt"))
        on_step = _save_at_first_snapshot(save, ctrl, rec)
    rec["trace"] = _fsdp_train(ddp, ctrl, _reshard_batches(rank, world), opt=opt, on_step=on_step)
    rec["weights"] = _full_weights(model)
    return rec


def _fsdp_reshard(rank: int, out: str) -> None:
    """The resharding runs of two processes: the composite FSDP2 run over 2 processes with a checkpoint mid-MIRROR
    (which the 1- and 3-process runs resume), the same over 1 process (process 0 on a mesh of its own) and its
    resume over 2; the DDP run whose controller state the 1- and 3-process runs resume; and a checkpoint of
    controllers whose states differ between the processes."""
    from unified_lora.distributed import save_sharded_checkpoint

    rec = {}
    model, ctrl = _fsdp_sharded("composite")
    rec["two"] = r = {}
    save = functools.partial(save_sharded_checkpoint, os.path.join(out, "reshard2"), model, ctrl=ctrl)
    r["trace"] = _fsdp_train(model, ctrl, _reshard_batches(rank, 2), on_step=_save_at_first_snapshot(
        lambda opt: save(optimizer=opt), ctrl, r))
    r["weights"] = _full_weights(model)
    rec["1->2"] = _fsdp_resharded_run(os.path.join(out, "reshard1"), rank, 2)  # `_fsdp_one_process` saved it
    rec["ddp"] = _ddp_reshard_run(rank, 2, out)
    # controllers that feed each process its own loss (reduce_loss=None): their signals differ
    from unified_lora import SignalConfig, setup_unified_lora
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyClassifier()
    _, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], signal=SignalConfig(kind="loss"), reduce_loss=None,
                                 print_fn=None)
    fully_shard(model)
    opt = _fsdp_opt(model, ctrl)
    for step in range(2):
        loss = model(*_fsdp_batch(rank, step))
        loss.backward()
        ctrl.step(loss)
        opt.step()
        opt.zero_grad()
    try:
        save_sharded_checkpoint(os.path.join(out, "reshard_apart"), model, opt, ctrl)
        rec["apart"] = "no error"
    except ValueError as e:
        rec["apart"] = str(e)
    rec["apart_written"] = os.path.exists(os.path.join(out, "reshard_apart"))
    torch.save(rec, os.path.join(out, f"reshard{rank}.pt"))


def _worker_fsdp(rank: int, world: int, port: int, out: str) -> None:
    _init_gloo(rank, world, port, timeout=datetime.timedelta(seconds=60))
    _fsdp_loop(rank, out)
    _fsdp_resume(rank, out)
    _fsdp1_refusal(rank, out)
    _fsdp_multitask_refusal(rank, out)
    _fsdp_reshard(rank, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = _spawn_once(tmp_path_factory, "unified_lora_fsdp", _worker_fsdp, before=_fsdp_one_process)
    return [dict(torch.load(os.path.join(out, f"fsdp{r}.pt"), weights_only=False),
                 fsdp1=torch.load(os.path.join(out, f"fsdp1_{r}.pt"), weights_only=False),
                 mt=torch.load(os.path.join(out, f"fsdp_mt{r}.pt"), weights_only=False),
                 resume=torch.load(os.path.join(out, f"fsdp_resume{r}.pt"), weights_only=False),
                 reshard=torch.load(os.path.join(out, f"reshard{r}.pt"), weights_only=False), out=out,
                 ckpt=os.path.join(out, "fsdp_ckpt")) for r in range(2)]


def _worker_reshard3(rank: int, world: int, port: int, out: str) -> None:
    """Three processes resume what two saved: the FSDP2 checkpoint (each block's rows split unevenly, 4 rows as 2, 2
    and 0) and the DDP run's controller state."""
    _init_gloo(rank, world, port, timeout=datetime.timedelta(seconds=60))
    two = os.path.join(os.path.dirname(out), "unified_lora_fsdp")  # (fsdp_run's folder: the fixture runs it first)
    rec = {"2->3": _fsdp_resharded_run(os.path.join(two, "reshard2"), rank, world),
           "ddp": _ddp_reshard_run(rank, world, out, load=os.path.join(two, "ddp_reshard.pt"))}
    torch.save(rec, os.path.join(out, f"reshard3_{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reshard_runs(fsdp_run, tmp_path_factory):
    """The resharding runs: over 2 processes (fsdp_run), over 3 (spawned here) and over 1 (in this process)."""
    from torch.distributed.fsdp import fully_shard

    from unified_lora.distributed import load_sharded_checkpoint

    runs = {k: [r["reshard"][k] for r in fsdp_run] for k in ("two", "1->2", "ddp", "apart", "apart_written")}
    runs["one"] = torch.load(os.path.join(fsdp_run[0]["out"], "reshard_one.pt"), weights_only=False)
    out = _spawn_once(tmp_path_factory, "unified_lora_reshard3", _worker_reshard3, nprocs=3)
    three = [torch.load(os.path.join(out, f"reshard3_{r}.pt"), weights_only=False) for r in range(3)]
    runs["2->3"] = [r["2->3"] for r in three]
    runs["ddp->3"] = [r["ddp"] for r in three]
    two = fsdp_run[0]["out"]
    runs["ddp->1"] = [_ddp_reshard_run(0, 1, two, load=os.path.join(two, "ddp_reshard.pt"))]
    _one_process_group()
    try:
        runs["2->1"] = [_fsdp_resharded_run(os.path.join(two, "reshard2"), 0, 1)]
        # the older per-process format at another number of processes: refused before anything is loaded
        model, ctrl = _fsdp_setup("composite")
        fully_shard(model)
        opt = _fsdp_opt(model, ctrl)
        before = _full_weights(model)
        with pytest.raises(ValueError) as e:
            load_sharded_checkpoint(os.path.join(two, "fsdp_ckpt_legacy"), model, opt, ctrl)
        runs["legacy->1"] = {"error": str(e.value), "step": ctrl.global_step, "opt_state": len(opt.state),
                             "unchanged": all(torch.equal(w, _full_weights(model)[n]) for n, w in before.items())}
    finally:
        dist.destroy_process_group()
    return runs


@pytest.fixture(scope="module")
def fsdp_reference():
    """The same runs in one process on the global batch (both processes' rows): what FSDP2 must reproduce."""
    ref = {}
    for kind in ("loss", "composite"):
        model, ctrl = _fsdp_setup(kind)
        both = lambda step: tuple(torch.cat(t) for t in zip(_fsdp_batch(0, step), _fsdp_batch(1, step)))  # noqa: E731
        ref[kind] = {"trace": _fsdp_train(model, ctrl, both),
                     "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
    return ref


@pytest.mark.parametrize("kind", ["loss", "composite"])
def test_fsdp2_processes_decide_together_and_follow_the_single_process_run(fsdp_run, fsdp_reference, kind):
    """setup_unified_lora, then fully_shard on each block and the root: every managed parameter is a DTensor and
    each process holds half of it. The composite signal failed at its first step (DTensor's in-place pow_ on a
    norm), and the first Mirror entry failed on the DTensors' storage; per shard, the norms, cosines and drift
    would be each process's own. Now both processes make the same decisions on the same steps (a Mirror cycle
    restored or kept by the drift rule, the rank raised to 16 and dropped back), and the result is the run of one
    process on the global batch: the same modes, ranks and Mirror events, and φ, drift and final weights equal to
    float rounding. (FSDP2 averages the two processes' gradients by a reduce-scatter where one process takes the
    mean over 16 rows, and the norms are fp32 sums of squares over two shards, then all-reduced: the sums differ
    in their last bits. Measured after 26 AdamW steps: weights within 6e-8 (a few fp32 ulps at their ~0.1 scale),
    φ within 2e-8; the bounds below leave a 15-50x margin and are still far below any decision threshold.)"""
    r0, r1 = (r[kind] for r in fsdp_run)
    ref = fsdp_reference[kind]
    assert set(r0["sharded"]) == {"DTensor"} and r0["local_shapes"][0] == (2, 32)  # q_proj.lora_A.0: (4, 32) split
    assert r0["trace"] == r1["trace"]
    events = [(s, snap) for s, _, _, _, snap, _, _ in r0["trace"] if snap]
    assert ("saved" in dict(events).values()) and any(snap in ("restored", "kept") for _, snap in events)
    assert {rank for *_, rank, _, _, _ in r0["trace"]} >= {8, 16}  # raised at the Mirror entry, dropped at its exit
    assert [t[2:6] for t in r0["trace"]] == [t[2:6] for t in ref["trace"]]
    assert [t[1] for t in r0["trace"]] == pytest.approx([t[1] for t in ref["trace"]], rel=1e-6)
    drifts = [(t[6], u[6]) for t, u in zip(r0["trace"], ref["trace"]) if u[6] is not None]
    assert drifts and [d for d, _ in drifts] == pytest.approx([d for _, d in drifts], rel=1e-5)
    assert r0["weights"].keys() == ref["weights"].keys()
    for n, w in ref["weights"].items():
        assert torch.equal(r0["weights"][n], r1["weights"][n]), n
        torch.testing.assert_close(r0["weights"][n], w, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["loss", "composite"])
def test_fsdp2_leaves_paused_blocks_without_grad_and_bit_identical(fsdp_run, kind):
    """A paused block is not in the graph: FSDP2 reduce-scatters no gradient into it, so AdamW skips it (weight
    decay included) before the Mirror entry raises the rank and after its exit drops it again."""
    for r in fsdp_run:
        assert all(r[kind]["paused_grad_none"]) and all(r[kind]["paused_unchanged"])
        assert sum(rank < 16 for *_, rank, _, _, _ in r[kind]["trace"]) > 10


def test_fsdp2_lora_state_dict_gathers_full_blocks_and_the_peft_export_refuses_a_shard(fsdp_run):
    for r in fsdp_run:
        blocks = {k: v for k, v in r["lora_sd"].items() if not k.endswith("_extra_state")}
        assert blocks["q_proj.lora_A.0"] == ("Tensor", (4, 32)) and blocks["v_proj.lora_B.2"] == ("Tensor", (32, 8))
        assert r["lora_sd_equal"] is True
        assert r["export"].startswith("export_peft_adapter: the model is sharded by FSDP")


def test_fsdp1_is_refused_before_the_first_step(fsdp_run):
    """FSDP1 with use_orig_params=True left process 0 an empty slice of q_proj.lora_A.0: its ctrl.step raised
    'no gradient on the adapters; call loss.backward()' while process 1 went on into a collective (a hang)."""
    for r in fsdp_run:
        for key in ("check_ddp", "attach"):
            assert "flattened by FSDP1" in r["fsdp1"][key] and "fully_shard" in r["fsdp1"][key], r["fsdp1"][key]


def test_fsdp2_multitask_mode_is_refused_at_the_first_step(fsdp_run):
    """Multi-task mode's task-conflict statistics and split/merge read the adapters' local shards under FSDP2, so
    the processes would decide apart; its first ctrl.step is refused on every process, before the step counts."""
    for r in fsdp_run:
        assert "sharded by FSDP2" in r["mt"]["multitask"] and "DDP" in r["mt"]["multitask"], r["mt"]["multitask"]
        assert r["mt"]["step"] == 0


def test_fsdp2_resumes_mid_mirror_bit_for_bit_from_per_process_states(fsdp_run):
    """The README's FSDP2 checkpoint mid-MIRROR (snapshot of weights and AdamW moments held, the composite signal's
    previous gradients stored): the model and optimizer through torch.distributed.checkpoint, ctrl.state_dict() per
    process. The load used to be refused (the state's tensors are this process's shards, checked against the
    parameters' global shapes), and torch.save of the state wrote the snapshot's moments as DTensors. Now a fresh
    model, optimizer and controller on each process continue exactly as the uninterrupted run: the same trace
    (φ, decisions, the restore at step 13 and its drift, bit for bit) and bit-identical gathered weights."""
    for rank, r in enumerate(fsdp_run):
        res, full = r["resume"], r["composite"]
        assert "refused" not in res, res["refused"]
        for key in ("", "legacy_"):  # this version's checkpoint, and the older per-process one (ctrl_rank*.pt)
            assert res[key + "held"] and res[key + "step"] == FSDP_SAVE_AT + 1 and res[key + "prev"] > 0
            assert res[key + "trace"] == full["trace"][FSDP_SAVE_AT + 1:]
            assert res[key + "trace"][0][4:6] == ("restored", "MIRROR->MULTI")
            assert res[key + "weights"].keys() == full["weights"].keys()
            for n, w in full["weights"].items():
                assert torch.equal(res[key + "weights"][n], w), n
        saved = torch.load(os.path.join(r["ckpt"] + "_legacy", f"ctrl_rank{rank}.pt"), weights_only=True)
        assert saved["sharding"]["rank"] == rank and saved["sharding"]["world_size"] == 2
    ctrl = torch.load(os.path.join(fsdp_run[0]["ckpt"], "ctrl.pt"), weights_only=True)  # once, without shards
    assert ctrl["world_size"] == 2 and ctrl["state"]["mirror"]["weights"] == [None] * 14


def test_fsdp2_state_of_another_process_or_sharding_is_refused(fsdp_run):
    """A state holds one process's shards: loaded by the other process (what accelerate's load_state does, as its
    save_state writes registered objects from process 0 alone), by a run sharded over another number of
    processes or on another dimension, or a one-process state loaded under FSDP2, it would have restored wrong rows (or was refused by a
    shape message that did not say why). Each is a ValueError that names the processes and the recipe."""
    for rank, r in enumerate(fsdp_run):
        res = r["resume"]
        for key, saver in (("other_rank", 1 - rank), ("accelerate", 0)):
            msg = res[key]
            if saver == rank:  # process 0 loads its own state back
                assert msg == "no error"
                continue
            assert f"process {saver} of 2" in msg and f"this is process {rank} of 2" in msg, msg
            assert "ctrl_rank{rank}.pt" in msg and "register_for_checkpointing" in msg, msg
            assert "nothing was loaded" in msg
        assert f"process {rank} of 2" in res["world_size"] and "this is process 0 of 1" in res["world_size"], \
            res["world_size"]
        assert f"process {rank} of 2, sharded with other placements than this run's (managed parameter 0: saved " \
            "['Shard(dim=0)'], here ['Shard(dim=1)'])" in res["placements"], res["placements"]
        assert "were not sharded" in res["unsharded"] and f"process {rank} of 2" in res["unsharded"], \
            res["unsharded"]


def test_fsdp2_state_loaded_into_an_unsharded_controller_is_refused_unless_it_holds_no_shards(fsdp_run):
    """A process's FSDP2 state loaded into a one-process controller: its snapshot and stored gradients are that
    process's shards, refused with the sharding it needs. A state that holds no tensors (the loss signal, no
    snapshot held) is the same on every process and loads: the controller goes on where the FSDP2 run stopped."""
    sd = torch.load(os.path.join(fsdp_run[1]["ckpt"] + "_legacy", "ctrl_rank1.pt"), weights_only=False)
    _, ctrl = _fsdp_setup("composite")
    with pytest.raises(ValueError, match="process 1 of 2's shards .* not sharded. Resume it under FSDP2 over 2"):
        ctrl.load_state_dict(sd)
    assert ctrl.global_step == 0
    out = os.path.dirname(fsdp_run[1]["ckpt"])
    sd = torch.load(os.path.join(out, "ctrl_loss1.pt"), weights_only=False)
    assert sd["sharding"]["rank"] == 1 and sd["mirror"]["weights"] is None and sd["grad_stats"]["prev"] == []
    _, ctrl = _fsdp_setup("loss")
    ctrl.load_state_dict(sd)
    assert (ctrl.global_step, ctrl.mode, ctrl.rank) == (FSDP_STEPS, 1, 8)
    assert ctrl.signal.state_dict() == sd["signal"]


def _same_state(got: dict, want: dict) -> None:
    """Two `_ctrl_full` records hold the same controller: step, mode, rank, signal, machine, and bit for bit the
    Mirror snapshot, its optimizer moments and the stored gradients as full tensors."""
    tensors = ("snapshot", "moments", "prev")
    assert {k: v for k, v in got.items() if k not in tensors} == {k: v for k, v in want.items() if k not in tensors}
    assert len(got["snapshot"]) == len(want["snapshot"]) and all(map(torch.equal, got["snapshot"], want["snapshot"]))
    assert [sorted(m) for m in got["moments"]] == [sorted(m) for m in want["moments"]]
    assert all(torch.equal(u[k], v[k]) for u, v in zip(got["moments"], want["moments"]) for k in v)
    assert [len(gs) for gs in got["prev"]] == [len(gs) for gs in want["prev"]]
    assert all(map(torch.equal, [g for gs in got["prev"] for g in gs], [g for gs in want["prev"] for g in gs]))


def _continues(runs: list[dict], saved: dict) -> None:
    """Every process of a resumed run loaded the state `saved` held at its checkpoint and trained on as `saved`'s
    own run did from there: the same decisions on the same steps, φ and the drift to float rounding (rel 1e-6 and
    1e-5), the gathered weights within 1e-6 (the sums over another number of processes round differently)."""
    at = saved["saved_at"]
    tail = saved["trace"][at + 1:]
    for r in runs:
        assert "refused" not in r, r["refused"]
        assert r["loaded"]["held"] and r["loaded"]["step"] == at + 1 and any(r["loaded"]["prev"])
        _same_state(r["loaded"], saved["at_save"])
        assert r["trace"] == runs[0]["trace"]  # the processes decide together
        assert [t[2:6] for t in r["trace"]] == [t[2:6] for t in tail]
        assert [t[1] for t in r["trace"]] == pytest.approx([t[1] for t in tail], rel=1e-6)
        drifts = [(t[6], u[6]) for t, u in zip(r["trace"], tail) if u[6] is not None]
        assert [d for d, _ in drifts] == pytest.approx([d for _, d in drifts], rel=1e-5)
        assert r["weights"].keys() == saved["weights"].keys()
        for n, w in saved["weights"].items():
            torch.testing.assert_close(r["weights"][n], w, rtol=0, atol=1e-6, msg=n)
    # a Mirror exit (restore or keep, on its drift) after the resume, and a rank change
    assert any(t[4] in ("restored", "kept") for t in tail) and len({t[3] for t in tail}) > 1


@pytest.mark.parametrize("case", ["2->1", "1->2", "2->3"])
def test_fsdp2_checkpoint_resumes_over_another_number_of_processes_mid_mirror(reshard_runs, case):
    """Preempted on 2 processes, resumed on 1 (or on 1, resumed on 2; on 2, resumed on 3, where FSDP2 splits each
    rank block's 4 rows as 2, 2 and 0). The controller's state held each process's shards (the Mirror snapshot, its
    AdamW moments, the composite signal's stored gradients), so load_sharded_checkpoint refused any other number of
    processes, and the whole resume with it. save_sharded_checkpoint now puts those tensors into the dcp checkpoint
    as DTensors sharded as their parameters, which dcp reshards on load, and the rest of the state once. A fresh run
    over the new number of processes, on the same global batch, holds the saved snapshot (as full tensors, bit for
    bit), mode, rank, step and signal history, and continues as the saved run did from its checkpoint (the resume at
    the saved number of processes is that run bit for bit: test_fsdp2_resumes_mid_mirror_bit_for_bit_from_per_
    process_states)."""
    saved = reshard_runs["one" if case == "1->2" else "two"]
    saved = saved if isinstance(saved, dict) else saved[0]
    assert all(r["saved_at"] == saved["saved_at"] for r in reshard_runs["two"])
    world = int(case[-1])
    assert len(reshard_runs[case]) == world
    assert all("refused" not in r for r in reshard_runs[case]), reshard_runs[case][0]["refused"]
    assert [r["local_shapes"][0] for r in reshard_runs[case]] == {1: [(4, 32)], 2: [(2, 32)] * 2,
                                                                  3: [(2, 32), (2, 32), (0, 32)]}[world]
    _continues(reshard_runs[case], saved)


def test_fsdp2_checkpoint_of_controllers_whose_states_differ_is_refused(reshard_runs):
    """One state resumes every process, so it must be the same on each: controllers that feed each process its own
    loss (reduce_loss=None) have different signals. save_sharded_checkpoint refuses them on every process, naming
    the first difference, before anything is written."""
    for msg in reshard_runs["apart"]:
        assert "differs between process 0 and process 1 at state['loss_ema']" in msg and "nothing was written" in msg, \
            msg
        assert "reduce_loss" in msg
    assert reshard_runs["apart_written"] == [False, False]


def test_fsdp2_older_per_process_checkpoint_at_another_number_of_processes_is_refused_before_loading(reshard_runs):
    """A checkpoint with the per-process controller files of the earlier format (`ctrl_rank{rank}.pt`) cannot be
    resharded: loaded over 1 process it is refused with the sharding it needs and the new recipe, and now before
    the model and optimizer are loaded (they used to be, then the controller refused)."""
    got = reshard_runs["legacy->1"]
    assert got["step"] == 0 and got["opt_state"] == 0 and got["unchanged"]
    assert "process 0 of 2" in got["error"] and "this is process 0 of 1" in got["error"], got["error"]
    assert "ctrl_rank{rank}.pt, as earlier versions wrote it" in got["error"] and "save_sharded_checkpoint again" \
        in got["error"]


@pytest.mark.parametrize("case", ["ddp->1", "ddp->3"])
def test_ddp_controller_state_resumes_over_another_number_of_processes(reshard_runs, case):
    """A DDP run's controller state holds replicated, whole tensors (no sharding recorded): saved by process 0 of 2
    mid-MIRROR (with model.state_dict() and opt.state_dict()), it loads into a run over 1 or 3 processes, which
    continues as the 2-process run did on the same global batch."""
    saved = reshard_runs["ddp"]
    assert saved[0]["trace"] == saved[1]["trace"] and saved[0]["at_save"]["held"]
    _continues(reshard_runs[case], saved[0])


def _one_process_group():
    """A one-process gloo group in this process (FSDP2 over one process: each shard is the whole tensor), for the
    FSDP2 checks that need no second process. Destroy it in a `finally`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


@pytest.mark.parametrize("reshard_after_forward", [None, False])
def test_fsdp2_controller_state_and_optimizer_after_an_evaluation_forward(reshard_after_forward, tmp_path):
    """A forward without backward (an evaluation under torch.no_grad() between training steps) leaves FSDP2's
    unsharded parameters registered until the next backward: the root's (the LoRA blocks of v_proj, which has no
    fully_shard of its own), or every module's with reshard_after_forward=False, as plain tensors. ctrl.state_dict()
    then raised '6 of 14 are DTensors ... Apply fully_shard to the root model too', or (with every module unsharded)
    wrote a state of shards recorded as not sharded, which no FSDP2 run could load back; attach_optimizer and
    load_state_dict after an evaluation failed the same way. The controller now reads the sharded parameters, as
    model.state_dict() does (FSDP2's own state-dict hook): the state records the sharding and loads into a fresh
    run after its own evaluation, and the Mirror snapshot survives a re-attach. An optimizer built after an
    evaluation (from the unsharded parameters) is refused with a message that says so. So is a PEFT export after
    an evaluation with reshard_after_forward=False (it failed inside FSDP: 'FSDP does not support deepcopy')."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    if reshard_after_forward is not None:
        kw["reshard_after_forward"] = reshard_after_forward

    def build():
        model, ctrl = _fsdp_setup("composite")
        for m in (model.q_proj, model.classifier, model):
            fully_shard(m, **kw)
        return model, ctrl, _fsdp_opt(model, ctrl)

    def evaluate(model):
        with torch.no_grad():
            model(*_fsdp_batch(0, 0))

    _one_process_group()
    try:
        model, ctrl, opt = build()
        for step in range(FSDP_STEPS):
            x, y = _fsdp_batch(0, step)
            loss = model(input_ids=x, labels=y)
            loss.backward()
            ctrl.step(loss)
            opt.step()
            opt.zero_grad()
            evaluate(model)
            if ctrl.mirror.held:
                break
        assert ctrl.mirror.held and any(ctrl.grad_stats.prev)
        assert any(type(p).__name__ != "DTensor" for p in model.v_proj.lora_A)  # what the evaluation left
        sd = ctrl.state_dict()
        assert sd["sharding"] is not None and sd["sharding"]["world_size"] == 1
        assert all(w.dtype == torch.float32 for w in sd["mirror"]["weights"])  # the fp32 shards, not bf16 copies
        ctrl.attach_optimizer(opt)  # (again, e.g. after a resize): the snapshot stays
        assert ctrl.mirror.held
        fresh, fctrl, _ = build()
        evaluate(fresh)
        fctrl.load_state_dict(sd)
        assert fctrl.mirror.held and fctrl.global_step == ctrl.global_step
        assert all(type(v).__name__ == "DTensor" for st in fctrl.mirror.opt_state if st for k, v in st.items()
                   if k != "step")
        # a PEFT export after an evaluation: every parameter of the model may be an unsharded plain tensor now
        from unified_lora.peft_io import export_peft_adapter

        evaluate(model)
        with pytest.raises(ValueError, match="export_peft_adapter: the model is sharded by FSDP"):
            export_peft_adapter(model, None, str(tmp_path / "peft"))
        # an optimizer built after an evaluation holds the unsharded parameters FSDP2 drops at the next backward
        model, ctrl = _fsdp_setup("composite")
        for m in (model.q_proj, model.classifier, model):
            fully_shard(m, **kw)
        evaluate(model)
        with pytest.raises(ValueError, match="manages; missing: .*not after a forward without backward"):
            _fsdp_opt(model, ctrl)
    finally:
        dist.destroy_process_group()


def test_fsdp2_reshard_after_backward_false_is_named_and_the_accumulation_recipe_trains():
    """model.set_reshard_after_backward(False) (FSDP2's gradient-accumulation setting) leaves the unsharded
    parameters on the modules after backward, without gradients (those went to the sharded ones the optimizer
    holds): ctrl.step said "no gradient on the adapters; call loss.backward()", which the user had called. It now
    names the setting and what to do; doing that (True before the backward ctrl.step follows) trains."""
    from torch.distributed.fsdp import fully_shard

    def build():
        model, ctrl = _fsdp_setup("composite")
        for m in (model.q_proj, model.classifier, model):
            fully_shard(m)
        return model, ctrl, _fsdp_opt(model, ctrl)

    _one_process_group()
    try:
        model, ctrl, opt = build()
        model.set_reshard_after_backward(False)
        model(*_fsdp_batch(0, 0)).backward()
        with pytest.raises(ValueError, match=r"FSDP2's unsharded parameters.*set_reshard_after_backward\(False\).*"
                                             r"Call model.set_reshard_after_backward\(True\) before the backward"):
            ctrl.step(1.0)
        model, ctrl, opt = build()
        for step in range(4):  # two micro-batches a step: unsharded between them, resharded by the last backward
            model.set_reshard_after_backward(False)
            (model(*_fsdp_batch(0, 2 * step)) / 2).backward()
            model.set_reshard_after_backward(True)
            loss = model(*_fsdp_batch(0, 2 * step + 1)) / 2
            loss.backward()
            ctrl.step(loss)
            opt.step()
            opt.zero_grad()
        assert ctrl.global_step == 4
    finally:
        dist.destroy_process_group()


def test_fsdp2_ctrl_step_after_optimizer_step_is_warned_about_and_a_right_loop_after_a_warm_up_is_not():
    """The order warning compares the version counter of block 0's gradient at the first ctrl.step with the one the
    optimizer's step before it left. FSDP2 adds a backward into an existing gradient through its local shard
    (`_local_tensor +=`), which leaves the DTensor's own counter as it was: a right loop whose warm-up optimizer
    step left its gradients (no zero_grad before the next backward) was warned about as calling ctrl.step after
    optimizer.step(). A warm-up with zero_grad(set_to_none=False), which bumps the DTensor's counter alone, is
    not warned about either; the late loop is."""
    import warnings

    def run(order: str) -> list:
        model, ctrl = _fsdp_sharded("loss")
        opt = _fsdp_opt(model, ctrl)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model(*_fsdp_batch(0, 0)).backward()  # a warm-up step without the controller
            opt.step()
            if order == "zeroed":
                opt.zero_grad(set_to_none=False)
            for step in range(1, 3):
                loss = model(*_fsdp_batch(0, step))
                loss.backward()
                if order == "late":
                    opt.step()
                ctrl.step(loss)
                if order != "late":
                    opt.step()
                opt.zero_grad(set_to_none=order != "zeroed")
        return [str(w.message) for w in record if str(w.message).startswith("ctrl.step: it reads")]

    _one_process_group()
    try:
        assert run("late") != []
        for order in ("accumulated", "zeroed"):
            assert run(order) == [], order
    finally:
        dist.destroy_process_group()


def test_fsdp2_setup_after_fully_shard_is_refused():
    """setup_unified_lora after fully_shard (the other order than the README's): FSDP2 manages only the parameters
    it found, so the new LoRA blocks stay plain tensors that no process shares. With two processes each trained its
    own blocks on its own data (measured: q_proj.lora_B.0 differed between the processes after 26 steps) while the
    loss signal's decisions agreed, so assert_lockstep passed: nothing said so. attach_optimizer and check_ddp now
    refuse it, naming the order."""
    from torch.distributed.fsdp import fully_shard

    from unified_lora import setup_unified_lora

    _one_process_group()
    try:
        for root_only in (False, True):
            torch.manual_seed(0)
            model = TinyClassifier()
            if not root_only:
                fully_shard(model.q_proj)
            fully_shard(model)
            _, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            for call in (lambda: ctrl.attach_optimizer(opt), lambda: check_ddp(model)):
                with pytest.raises(ValueError, match=r"q_proj, v_proj.*sharded by FSDP2.*setup_unified_lora"
                                                     r".*before fully_shard"):
                    call()
        model, ctrl = _fsdp_sharded("composite")  # the README's order passes
        _fsdp_opt(model, ctrl)
        check_ddp(model)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------- lockstep: desyncs raise on every process, at once

def _ls_setup(**machine):
    """A plain (unwrapped) TinyClassifier's controller: the controller's all-reduce is the only collective."""
    from unified_lora import MachineConfig, SignalConfig, setup_unified_lora

    torch.manual_seed(0)
    model = TinyClassifier()
    _, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], signal=SignalConfig(kind="loss", alpha=0.5, beta=0.5),
                                 machine=MachineConfig(**machine) if machine else None, print_fn=None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    return model, ctrl, opt


def _ls_step(rank, step, model, ctrl, opt, drop_grads=False, mt=False):
    """One training step; the outcome of its ctrl.step: None, or (error type, message, this process's step count)."""
    if mt:
        from unified_lora.multitask import task_context

        x, y, tids = _mt_batch(rank, step)
        with task_context(model, tids):
            loss = model(input_ids=x, labels=y).mean()
    else:
        x, y = _fsdp_batch(rank, step)
        loss = model(input_ids=x, labels=y)
    loss.backward()
    if drop_grads:
        opt.zero_grad()
    try:
        ctrl.step(loss.detach())
    except (RuntimeError, ValueError) as e:
        return type(e).__name__, str(e), ctrl.global_step
    finally:
        opt.step()
        opt.zero_grad()
    return None


def _lockstep_cases(rank: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from unified_lora import distributed_mean, set_rank

    rec = {}
    # 1. ctrl.load_state_dict on process 0 only (under DDP), of a state two steps old
    model, ctrl, opt = _ls_setup()
    ddp = DDP(model, **ddp_kwargs())
    got = [_ls_step(rank, s, ddp, ctrl, opt) for s in range(5)]
    if rank == 0:
        saved = ctrl.state_dict()
    got += [_ls_step(rank, s, ddp, ctrl, opt) for s in range(5, 7)]
    if rank == 0:
        ctrl.load_state_dict(saved)
    rec["loaded_on_one"] = got + [_ls_step(rank, 7, ddp, ctrl, opt)]
    del ddp
    # 2. model.load_state_dict on process 0 only set its adapters' rank (here: set_rank); refused there, before the
    # all-reduce, and the other process raised with it instead of waiting in the collective
    model, ctrl, opt = _ls_setup()
    got = [_ls_step(rank, s, model, ctrl, opt) for s in range(2)]
    if rank == 0:
        set_rank(ctrl.adapters, 16)
    rec["rank_set_on_one"] = got + [_ls_step(rank, 2, model, ctrl, opt)]
    # ... and on every process: each raises its own ValueError, as a single process does
    set_rank(ctrl.adapters, 16)
    rec["rank_set_on_all"] = _ls_step(rank, 3, model, ctrl, opt)
    # 3. no gradients on process 1 only at step 2 (its gradients dropped before ctrl.step), under FSDP2 with the
    # composite signal: that process raised after the loss's all-reduce and the other one waited in the signal's
    model, ctrl = _fsdp_sharded("composite")
    opt = _fsdp_opt(model, ctrl)
    rec["no_grad_on_one"] = [_ls_step(rank, s, model, ctrl, opt, drop_grads=(rank == 1 and s == 2)) for s in range(4)]
    del model, ctrl, opt
    # 3b. a transition that failed on process 1 only (its Mirror snapshot raised: an out-of-memory there), after the
    # all-reduce; caught, and the loop went on: the processes are in different modes
    model, ctrl, opt = _ls_setup(theta0=0.01, theta1=0.02)  # MULTI -> MIRROR at the first step
    if rank == 1:
        def out_of_memory(*args, **kwargs):
            raise RuntimeError("out of memory (on this process only)")
        ctrl.mirror.save = out_of_memory
    rec["transition_failed_on_one"] = [_ls_step(rank, s, model, ctrl, opt) for s in range(2)]
    # 4. a controller built with other settings on process 1
    model, ctrl, opt = _ls_setup(theta1=0.7 if rank == 0 else 0.8)
    rec["other_settings"] = _ls_step(rank, 0, model, ctrl, opt)
    # 5. a multi-task model's state of another topology loaded on process 0 only (model.load_state_dict restores
    # the topology it was saved in): its controller refused the step before the all-reduce
    model, _, ctrl = _mt_setup()  # SINGLE: the shared adapter
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    if rank == 0:
        other, _, other_ctrl = _mt_setup()
        other_ctrl.split()  # MULTI's task adapters, as a model saved in MULTI has them
        model.load_state_dict(other.state_dict())
    rec["topology_on_one"] = _ls_step(rank, 0, model, ctrl, opt, mt=True)
    # 6. multi-task controllers reducing over a group of their own (here each process's own: two one-process runs,
    # of different lengths) run as with no reduction at all
    own = [dist.new_group([0]), dist.new_group([1])][rank]  # (every process creates every group, in one order)
    rec["multitask_own_group"] = [_mt_own_run(rank, reduce_loss=functools.partial(distributed_mean, group=own)),
                                  _mt_own_run(rank, reduce_loss=None)]
    torch.save(rec, os.path.join(out, f"lockstep{rank}.pt"))


def _mt_own_run(rank: int, reduce_loss):
    from unified_lora.multitask import per_task_losses, task_context

    model, _, ctrl = _mt_setup()
    ctrl.reduce_loss = reduce_loss
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    for step in range(6 + 3 * rank):
        x, y, tids = _mt_batch(rank, step)
        with task_context(model, tids):
            per = model(input_ids=x, labels=y)
        per.mean().backward()
        if isinstance(tids, str):
            ctrl.step(per.mean(), task_id=tids)
        else:
            ctrl.step(per.mean(), task_losses=per_task_losses(per, tids))
        opt.step()
        opt.zero_grad()
    return [(r.step, r.loss, r.phi, r.mode, r.transition) for r in ctrl.trace]


def _submesh_fsdp(rank: int, out: str) -> None:
    """Two independent FSDP2 runs in one world of 4 processes: meshes {0, 1} and {2, 3}, each with its own model and
    data. Each controller's loss mean, Mirror and signal collectives and assert_lockstep run over its own mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("run", "shard"))["shard"]
    trace = os.path.join(out, f"submesh_trace{rank // 2}.jsonl")  # one file per run, given on each of its processes
    model, ctrl = _fsdp_sharded("composite", mesh=mesh, ctrl_kw={"trace_path": trace})
    opt = _fsdp_opt(model, ctrl)
    rec = {"local": [], "used": [], "lockstep": None}
    steps = 4 if rank < 2 else 6  # the runs need not even take the same number of steps
    for step in range(steps):
        x, y = _fsdp_batch(rank, step + (100 if rank >= 2 else 0))
        loss = model(input_ids=x, labels=y)
        loss.backward()
        rec["local"].append(loss.item())
        ctrl.step(loss)
        rec["used"].append(ctrl.last_loss)
        try:
            assert_lockstep(ctrl)
        except RuntimeError as e:
            rec["lockstep"] = str(e)
        opt.step()
        opt.zero_grad()
    ctrl.close()
    # a controller over plain (DDP) parameters reduces over the world; a DDP over a subgroup names its group
    from unified_lora import UnifiedController, distributed_mean

    plain = UnifiedController(reduce_loss=functools.partial(distributed_mean, group=mesh.get_group()), print_fn=None)
    rec["partial"] = []
    for v in rec["local"]:
        plain.step(v)
        rec["partial"].append(plain.last_loss)
    torch.save(rec, os.path.join(out, f"submesh{rank}.pt"))


def _worker_lockstep(rank: int, world: int, port: int, out: str) -> None:
    # a short timeout: a process left waiting in a collective fails the run instead of hanging it
    _init_gloo(rank, world, port, timeout=datetime.timedelta(seconds=20))
    _lockstep_cases(rank, out)
    dist.barrier()
    dist.destroy_process_group()


def _worker_submesh(rank: int, world: int, port: int, out: str) -> None:
    _init_gloo(rank, world, port, timeout=datetime.timedelta(seconds=20))
    _submesh_fsdp(rank, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def lockstep_run(tmp_path_factory):
    out = _spawn_once(tmp_path_factory, "unified_lora_lockstep", _worker_lockstep)
    return [torch.load(os.path.join(out, f"lockstep{r}.pt"), weights_only=False) for r in range(2)]


def _out_of_lockstep(outcome, step: int, *says: str) -> None:
    assert outcome is not None, "no error"
    kind, msg, _ = outcome
    assert kind == "RuntimeError" and "out of lockstep" in msg and "loaded on some processes only" in msg, msg
    for s in says:
        assert s in msg, msg


def test_a_state_loaded_on_one_process_only_stops_every_process_at_its_next_step(lockstep_run):
    """Process 0 alone loaded its controller state of step 5 at step 7 (a 'load on rank 0, then broadcast' habit):
    the processes went on at other steps, silently (or hung under FSDP2 at a collective one process took). The
    loss's all-reduce carries a fingerprint of the controller's state, so both raise at the next step, naming it."""
    for r, run in enumerate(lockstep_run):
        got = run["loaded_on_one"]
        assert got[:7] == [None] * 7
        _out_of_lockstep(got[7], 7, "process steps differ: min 5 (process 0), max 7 (process 1)")
        assert got[7][2] == (5 if r == 0 else 7)  # nothing moved at the refused step
    assert lockstep_run[0]["loaded_on_one"][7][1] == lockstep_run[1]["loaded_on_one"][7][1]


def test_a_step_refused_on_one_process_only_is_raised_on_every_process(lockstep_run):
    """Process 0's adapters ran at another rank than its controller's mode (a model.load_state_dict there only): its
    ctrl.step refused the step before the all-reduce, and process 1 waited in the collective. Both raise now."""
    a, b = (run["rank_set_on_one"] for run in lockstep_run)
    assert a[:2] == b[:2] == [None, None]
    _out_of_lockstep(a[2], 2, "process 0 refused the step: ValueError: ctrl.step: the adapters run at rank 16")
    _out_of_lockstep(b[2], 2, "process 0 refused the step")
    for run in lockstep_run:  # refused on every process: each raises its own ValueError, as one process does
        kind, msg, _ = run["rank_set_on_all"]
        assert kind == "ValueError" and "the adapters run at rank 16" in msg


def test_no_gradients_on_one_process_only_stop_every_process_at_that_step_under_fsdp2(lockstep_run):
    """Process 1 had no gradients at step 2: its ctrl.step raised after the loss's all-reduce, and under FSDP2 with
    the composite signal process 0 went on into the signal's all-reduce and hung. The check now runs before the
    all-reduce: both raise at step 2, before anything moved, and step 3 goes on together."""
    for got in (run["no_grad_on_one"] for run in lockstep_run):
        assert got[:2] == [None, None] and got[3] is None
        _out_of_lockstep(got[2], 2, "process 1 refused the step: ValueError: ctrl.step: no gradient on the adapters")
        assert got[2][2] == 2


def test_a_transition_that_failed_on_one_process_stops_every_process_at_the_next_step(lockstep_run):
    """Process 1's Mirror snapshot raised (an out-of-memory there only): its transition was undone and the error
    raised after the all-reduce, while process 0 entered MIRROR. The loop caught it and went on: both raise at the
    next step, naming the modes."""
    a, b = (run["transition_failed_on_one"] for run in lockstep_run)
    assert a[0] is None and b[0][0] == "RuntimeError" and "out of memory" in b[0][1]
    for got in (a, b):
        _out_of_lockstep(got[1], 1, "process modes differ: min 1 (process 1), max 2 (process 0)",
                         "process Mirror snapshots held differ")


def test_controllers_built_with_other_settings_are_refused_at_the_first_step(lockstep_run):
    for run in lockstep_run:
        _out_of_lockstep(run["other_settings"], 0, "process settings digests")


def test_a_multitask_topology_loaded_on_one_process_only_is_raised_on_every_process(lockstep_run):
    for run in lockstep_run:
        _out_of_lockstep(run["topology_on_one"], 0, "process 0 refused the step: ValueError: ctrl.step: the model "
                                                    "runs the task adapters (topology 'task')")


def test_multitask_reductions_run_over_the_group_its_reduce_loss_names(lockstep_run):
    """A multi-task controller with reduce_loss=functools.partial(distributed_mean, group=...) (a DDP over a
    subgroup) combined its task losses and gradients over the whole world all the same: here each process is a
    one-process run of its own, of different lengths, which must run as with no reduction at all."""
    for run in lockstep_run:
        grouped, alone = run["multitask_own_group"]
        assert grouped == alone and len({t for *_, t in alone} - {None}) >= 1


def test_the_lockstep_fingerprint_compares_exactly_at_any_world_size():
    """world · Σs² == (Σs)² holds iff every s is equal, with Σs and Σs² packed into one float64 sum (s·2**K + s²),
    whatever order the all-reduce sums in: the fingerprints' range shrinks with the world so that the sums stay
    exact integers."""
    from unified_lora.distributed import _fingerprint, _in_lockstep, _packed

    g = torch.Generator().manual_seed(0)
    for world in (2, 3, 1000, 1024, 8191, 50000, 1 << 20):
        top = _fingerprint({}, True, world)  # the refusal's value, above every hash
        assert _fingerprint({"steps": 10 ** 7}, False, world) < top
        for near in (top, top - 1, 0, 1):
            count = min(world, 4096)  # the other processes' fingerprints all equal `top`: added as one exact term
            for differ in (False, True):
                s = torch.full((count,), _packed(top, world), dtype=torch.float64)
                if differ:
                    s[int(torch.randint(count, (1,), generator=g))] = _packed(near, world)
                s = s[torch.randperm(count, generator=g)]
                total = float(s.sum()) + (world - count) * _packed(top, world)  # (float64 sums, as the all-reduce's)
                assert total < 2 ** 53
                assert _in_lockstep(total, world) == (not differ or near == top), (world, near, differ)
    fp = functools.partial(_fingerprint, refused=False, world=1024)
    assert fp({"steps": 10 ** 7, "modes": 1}) != fp({"steps": 10 ** 7 + 1, "modes": 1})


@pytest.fixture(scope="module")
def submesh_run(tmp_path_factory):
    out = _spawn_once(tmp_path_factory, "unified_lora_submesh", _worker_submesh, nprocs=4)
    return [dict(torch.load(os.path.join(out, f"submesh{r}.pt"), weights_only=False),
                 trace=read_trace(os.path.join(out, f"submesh_trace{r // 2}.jsonl"))) for r in range(4)]


def test_fsdp2_controllers_on_two_meshes_in_one_world_reduce_over_their_own_mesh(submesh_run):
    """Two FSDP2 runs in one world, on meshes {0, 1} and {2, 3}: each controller's loss is the mean over its own
    mesh (it was the world's: the other run's losses leaked in, and runs of different lengths hung), and
    assert_lockstep compares the processes of its own mesh. A plain controller reduces over the group its
    `functools.partial(distributed_mean, group=...)` names."""
    for a, b in ((0, 1), (2, 3)):
        ra, rb = submesh_run[a], submesh_run[b]
        assert len(ra["used"]) == (4 if a == 0 else 6)
        assert ra["used"] == rb["used"] == pytest.approx([(x + y) / 2 for x, y in zip(ra["local"], rb["local"])],
                                                          rel=1e-12)
        assert ra["lockstep"] is None and rb["lockstep"] is None
        assert ra["partial"] == rb["partial"] == ra["used"]


def test_fsdp2_runs_on_two_meshes_in_one_world_each_write_their_trace_file(submesh_run):
    """The trace file is written by the first process of the controller's mesh: only the world's process 0 wrote,
    so the run on mesh {2, 3} left its trace_path empty."""
    for r in (0, 2):
        run = submesh_run[r]
        assert [t["step"] for t in run["trace"]] == list(range(len(run["used"])))
        assert [t["loss"] for t in run["trace"]] == pytest.approx(run["used"], rel=1e-12)


def test_a_damaged_controller_file_of_a_sharded_checkpoint_is_an_error_naming_it(tmp_path):
    """`load_sharded_checkpoint` read `ctrl.pt` (and an older checkpoint's `ctrl_rank{rank}.pt`) with a bare
    torch.load: a file cut short or of junk raised torch's own error ("PytorchStreamReader failed reading zip
    archive", an UnpicklingError "Unsupported operand"), naming no file. Now, as every other state file, one line
    that names it and says it is damaged; nothing is loaded."""
    from conftest import VOCAB, tiny_llama

    from unified_lora import setup_unified_lora, trainable_parameters
    from unified_lora.distributed import load_sharded_checkpoint, save_sharded_checkpoint

    model = tiny_llama()
    _, ctrl = setup_unified_lora(model, target_modules=["q_proj"], print_fn=None)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    ctrl.attach_optimizer(opt)
    x = torch.randint(0, VOCAB, (2, 6))
    model(input_ids=x, labels=x).loss.backward()
    ctrl.step(loss=0.5)
    opt.step()
    ckpt = tmp_path / "ckpt"
    _one_process_group()
    try:
        save_sharded_checkpoint(ckpt, model, opt, ctrl)
        step = ctrl.global_step
        fresh_model = tiny_llama(seed=1)
        _, fresh = setup_unified_lora(fresh_model, target_modules=["q_proj"], print_fn=None)
        fresh_opt = torch.optim.AdamW(trainable_parameters(fresh_model), lr=1e-3)
        fresh.attach_optimizer(fresh_opt)
        whole = (ckpt / "ctrl.pt").read_bytes()
        (ckpt / "ctrl.pt").write_bytes(whole[:len(whole) // 2])
        for name in ("ctrl.pt", "ctrl_rank0.pt"):
            with pytest.raises(ValueError, match=re.escape(f"{ckpt / name}: cannot read it (")) as e:
                load_sharded_checkpoint(ckpt, fresh_model, fresh_opt, fresh)
            assert "the file is damaged" in str(e.value) and "\n" not in str(e.value) and fresh.global_step == 0
            (ckpt / "ctrl.pt").unlink(missing_ok=True)  # an older checkpoint's per-process file, of junk
            (ckpt / "ctrl_rank0.pt").write_text("not a controller state\n" * 5)
        (ckpt / "ctrl.pt").write_bytes(whole)  # whole again: it loads
        load_sharded_checkpoint(ckpt, fresh_model, fresh_opt, fresh)
        assert fresh.global_step == step
    finally:
        dist.destroy_process_group()
