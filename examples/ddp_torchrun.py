"""Unified LoRA under DDP: every process makes the same decision on the same step.

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py        # CPU / gloo, under a minute
    python examples/ddp_torchrun.py                             # one process works too

Each process trains a tiny BERT on its own shard of data. The controller
all-reduces the loss before updating φ, so rank switches, LR changes and the
Mirror snapshot/restore happen on the same step everywhere; `assert_lockstep`
checks that at every step. As the model learns, φ falls and the controller
drops to SINGLE (rank 4); steps 50-57 flip the labels, the real loss jumps and
φ sends it back up. (tests/test_distributed.py also drives a full Mirror
save/restore cycle through DDP.)

DDP needs `find_unused_parameters=True` (paused rank blocks are not in the
graph); `ddp_kwargs()` gives it and refuses `static_graph`.
"""

import argparse
import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401 - before the process group exists (README "Multi-GPU")
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import BertConfig, BertForSequenceClassification

from unified_lora import MirrorConfig, SignalConfig, setup_unified_lora
from unified_lora.distributed import assert_lockstep, ddp_kwargs

STEPS, FLIP = 80, range(50, 58)
# the controller of this example and of examples/fsdp2_torchrun.py: φ from the all-reduced loss, calibrated over
# the first 10 steps; Mirror snapshots the optimizer moments too
LORA = dict(target_modules="all-linear", modules_to_save=["classifier", "pooler"],
            signal=SignalConfig(kind="loss", alpha=0.5, beta=0.5, calibration_steps=10, calibration_target=1.0),
            min_dwell=5, mirror=MirrorConfig(snapshot_optimizer=True))


def init_distributed(one_process_group=False):
    """(launched by torchrun?, rank, world size, device). Under torchrun: the process group (nccl on GPUs, else gloo).
    Without it: one CPU process, and with `one_process_group` a gloo group of one (FSDP2 needs a group even alone)."""
    launched = int(os.environ.get("RANK", -1)) != -1  # nanoGPT style: launched by torchrun?
    if not launched:
        if one_process_group:
            with socket.socket() as s:  # a free local port for the group's store
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        return False, 0, 1, torch.device("cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def tiny_bert():
    """A random 2-layer BERT classifier (hidden 32), without dropout: the same weights for the same seed."""
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def toy_batch(g, step, n=16):
    """`n` sequences whose class is in the tokens; on the FLIP steps the labels are wrong (real stress)."""
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(5, 50, (n, 10), generator=g) + 45 * y[:, None]  # the class is in the tokens
    return {"input_ids": x, "labels": 1 - y if step in FLIP else y}


def train_step(model, ctrl, opt, batch, device, step: int, master: bool) -> None:
    """One optimizer step under the controller, checked for lockstep; process 0 prints every tenth."""
    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    ctrl.step(loss=loss)  # all-reduced inside; may switch rank / LR / Mirror
    assert_lockstep(ctrl)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if master and step % 10 == 0:
        r = ctrl.trace[-1]
        print(f"[{step}] local loss={loss.item():.3f} mean loss={r.loss:.3f} φ={r.phi:.3f} mode={r.mode} "
              f"rank={r.rank} lr={r.lr:.2e}")


def main():
    ddp, rank, world, device = init_distributed()
    master = rank == 0

    torch.manual_seed(0)  # identical initial weights on every process
    model = tiny_bert().to(device)
    adapters, ctrl = setup_unified_lora(model, **LORA)  # console lines print on process 0 alone by default
    model = DDP(model, **ddp_kwargs()) if ddp else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    ctrl.attach_optimizer(opt)  # lr_mode="multiplier": the mode scales this LR

    g = torch.Generator().manual_seed(1000 + rank)  # a different data shard per process
    for step in range(STEPS):
        train_step(model, ctrl, opt, toy_batch(g, step), device, step, master)

    # every process ends with bit-identical adapter weights
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters() if p.requires_grad]).cpu()
    if ddp:
        every = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(every, flat)
        same = all(torch.equal(e, every[0]) for e in every)
    else:
        same = True
    if master:
        events = [(r.step, r.transition, r.snapshot) for r in ctrl.trace if r.transition]
        print(f"transitions: {events}")
        print(f"{world} process(es), weights identical on all: {same}")
    if ddp:
        # Free DDP's reducer while the process group is still registered, then destroy the group. If the reducer
        # held the group's last reference, the group would be destroyed with the GIL held while gloo's worker thread
        # may still need it to free a finished collective: a deadlock at exit (pytorch/pytorch#56297), seen on a busy
        # 2-core machine with torch 2.13.
        del model
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    # no options; --help prints the docstring instead of running the example
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
