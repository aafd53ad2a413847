"""Subprocess worker for tests/test_cuda.py's process-group checks: a one-process group (world size 1) over nccl on
the GPU, or over gloo with UNIFIED_LORA_TEST_DEVICE=cpu, so a hang or a crash of the collectives costs only this
process (the test runs it under a hard timeout).

usage: python _cuda_dist_worker.py PHASES DEVICE OUT_DIR     PHASES: a comma list of ddp, multitask, fsdp

The phases run one after the other in this one process and its one process group (one interpreter start-up and one
group for all of them). It never calls torch.cuda.set_device: the library's collectives pick their device themselves
(`unified_lora.distributed._device`, `distributed_mean`). Each phase runs the same loop with and without the
distributed wrapper on DEVICE and writes what the test compares (traces, weights on the CPU) to OUT_DIR/PHASE.pt as
soon as it ends, so a phase that crashes or hangs leaves the records of the phases before it.
"""

import os
import socket
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_distributed import (CORRUPT, FSDP_CORRUPT, FSDP_STEPS, MT_STEPS, STEPS, PerSampleClassifier,  # noqa: E402
                              TinyClassifier, _mt_batch, _paused_blocks)

from unified_lora import MachineConfig, MirrorConfig, SignalConfig, setup_unified_lora  # noqa: E402
from unified_lora.controller import distributed_mean  # noqa: E402
from unified_lora.distributed import _device, assert_lockstep, check_ddp, ddp_kwargs  # noqa: E402

phases, DEV, out = sys.argv[1].split(","), torch.device(sys.argv[2]), sys.argv[3]
PHASES = ("ddp", "multitask", "fsdp")
if not phases or any(p not in PHASES for p in phases):
    raise SystemExit(f"phases: a comma list of {', '.join(PHASES)}, got {sys.argv[1]!r}")
torch.set_num_threads(1)


def _group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if DEV.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def _weights(model) -> dict:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _batch(step: int, corrupt):
    g = torch.Generator().manual_seed(100 + step)  # on the CPU, then moved: the same data on every device
    y = torch.randint(0, 2, (8,), generator=g)
    x = torch.randint(5, 50, (8, 6), generator=g) + 45 * y[:, None]
    return x.to(DEV), (1 - y if step in corrupt else y).to(DEV)


def ddp(rec: dict) -> None:
    """The README's DDP loop (Mirror policy "always" with the optimizer snapshot: a restore of weights and AdamW
    moments) through DistributedDataParallel, and the same loop on the bare model."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for wrap in (False, True):
        torch.manual_seed(0)
        model = TinyClassifier().to(DEV)
        adapters, ctrl = setup_unified_lora(
            model, ["q_proj", "v_proj"], modules_to_save=["classifier"],
            signal=SignalConfig(kind="loss", alpha=0.5, beta=0.5, loss_scale=0.5),
            mirror=MirrorConfig(policy="always", snapshot_optimizer=True), print_fn=None)
        net = DDP(model, **ddp_kwargs()) if wrap else model
        if wrap:
            check_ddp(net)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        ctrl.attach_optimizer(opt)
        paused_none = []
        for step in range(STEPS):
            loss = net(*_batch(step, CORRUPT))
            loss.backward()
            paused_none.append(all(p.grad is None for p in _paused_blocks(adapters.values())))
            ctrl.step(loss)
            assert_lockstep(ctrl)
            opt.step()
            opt.zero_grad()
        key = "ddp" if wrap else "plain"
        rec[key] = {"trace": [(r.step, r.phi, r.mode, r.rank, r.snapshot, r.transition) for r in ctrl.trace],
                    "weights": _weights(model), "paused_grad_none": paused_none,
                    "block_device": str(adapters["q_proj"].lora_A[0].device)}


def multitask(rec: dict) -> None:
    """Multi-task training through DDP (SINGLE → MULTI → ... with per-sample task ids), and the two collectives the
    multi-task controller runs only at world size > 1, called directly here on the group's device."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from unified_lora import trainable_parameters
    from unified_lora.multitask import MultiTaskSignalConfig, per_task_losses, setup_multitask_lora, task_context

    for wrap in (False, True):
        torch.manual_seed(0)
        model = PerSampleClassifier().to(DEV)
        _, ctrl = setup_multitask_lora(model, tasks=["a", "b"], target_modules=["q_proj", "v_proj", "classifier"],
                                       machine=MachineConfig(initial_mode=0),
                                       # (as test_distributed's _mt_setup: the plain gradient conflict)
                                       signal=MultiTaskSignalConfig(alpha=0.3, loss_scale=0.5, phi_init=0.0,
                                                                    grad_noise="none"),
                                       print_fn=None)
        net = DDP(model, **ddp_kwargs()) if wrap else model
        opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
        ctrl.attach_optimizer(opt)
        for step in range(MT_STEPS):
            x, y, tids = _mt_batch(0, step)
            x, y = x.to(DEV), y.to(DEV)
            with task_context(net, tids):
                per = net(input_ids=x, labels=y)
            loss = per.mean()
            loss.backward()
            if isinstance(tids, str):
                ctrl.step(loss, task_id=tids)
            else:
                ctrl.step(loss, task_losses=per_task_losses(per, tids))
            assert_lockstep(ctrl)
            opt.step()
            opt.zero_grad()
        key = "ddp" if wrap else "plain"
        rec[key] = {"trace": [(r.step, r.phi, r.mode, r.rank, r.snapshot, r.transition) for r in ctrl.trace],
                    "weights": _weights(model)}
    rec["task_losses"] = ctrl._all_reduce_task_losses({"b": 0.25, "a": 0.5})
    numel = sum(a.rank * (a.in_features + a.out_features) for a in ctrl.adapters)
    g = torch.Generator().manual_seed(7)
    local = {1: [torch.randn(numel - 3, generator=g).to(DEV), torch.randn(3, generator=g).to(DEV)]}
    got = ctrl._all_reduce_task_gradients(local)
    rec["task_grads"] = {s: v.cpu() for s, v in got.items()}
    rec["task_grads_want"] = {1: torch.cat(local[1]).cpu()}
    rec["task_grads_device"] = sorted({str(v.device) for v in got.values()})


def fsdp(rec: dict, ckpt: str) -> None:
    """FSDP2 (`fully_shard` on each block and the root) through a Mirror cycle with the composite signal, a sharded
    checkpoint saved mid-MIRROR and resumed in a fresh model; and the same loop on the bare model."""
    from torch.distributed.fsdp import fully_shard

    from unified_lora.distributed import load_sharded_checkpoint, save_sharded_checkpoint

    save_at = 16  # mid-MIRROR (entered at step 14, left at 19)

    def build(shard: bool):
        torch.manual_seed(0)
        model = TinyClassifier().to(DEV)
        _, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], modules_to_save=["classifier"],
                                     signal=SignalConfig(kind="composite", alpha=0.5, min_history=3),
                                     mirror=MirrorConfig(policy="drift", snapshot_optimizer=True), print_fn=None)
        if shard:
            for m in (model.q_proj, model.v_proj, model.classifier, model):
                fully_shard(m)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        ctrl.attach_optimizer(opt)
        return model, ctrl, opt

    def train(model, ctrl, opt, save=False):
        for step in range(ctrl.global_step, FSDP_STEPS):
            loss = model(*_batch(step, FSDP_CORRUPT))
            loss.backward()
            ctrl.step(loss)
            opt.step()
            opt.zero_grad()
            if save and step == save_at:
                rec["held_at_save"] = ctrl.mirror.held
                save_sharded_checkpoint(ckpt, model, opt, ctrl)
        return [(r.step, r.phi, r.mode, r.rank, r.snapshot, r.transition, r.drift) for r in ctrl.trace]

    for shard in (False, True):
        model, ctrl, opt = build(shard)
        rec["fsdp" if shard else "plain"] = {"trace": train(model, ctrl, opt, save=shard), "weights": _weights(model)}
        if shard:
            rec["sharded"] = sorted({type(p).__name__ for p in ctrl.managed_parameters()})
            rec["param_device"] = sorted({str(p.device) for p in model.parameters()})
    model, ctrl, opt = build(True)
    load_sharded_checkpoint(ckpt, model, opt, ctrl)
    rec["resumed_at"] = (ctrl.global_step, ctrl.mirror.held)
    rec["resumed"] = {"trace": train(model, ctrl, opt), "weights": _weights(model)}


_group()
try:
    common = {"backend": dist.get_backend(), "collective_device": str(_device()),
              "distributed_mean": distributed_mean(0.25),
              # what this process's imports (test_distributed, conftest, unified_lora) loaded of transformers' models
              "models_imported": sorted(m for m in sys.modules if m.startswith("transformers.models."))}
    t = torch.tensor([1.5], device=_device())
    dist.all_reduce(t)
    common["all_reduce"] = t.item()
    for phase in phases:
        rec = dict(common)
        if phase == "ddp":
            ddp(rec)
        elif phase == "multitask":
            multitask(rec)
        else:
            fsdp(rec, os.path.join(out, "fsdp.ckpt"))
        torch.save(rec, os.path.join(out, f"{phase}.pt"))
        print(f"{phase}: done", flush=True)
finally:
    dist.destroy_process_group()
