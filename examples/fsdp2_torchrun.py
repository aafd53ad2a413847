"""Unified LoRA under FSDP2 (`fully_shard`): sharded blocks, the same decision on every process, a sharded
checkpoint mid-run and a resume from it.

    torchrun --nproc_per_node 2 examples/fsdp2_torchrun.py                 # all-MiniLM-L6-v2 on MRPC, CPU / gloo
    torchrun --nproc_per_node 2 examples/fsdp2_torchrun.py --tiny          # a random tiny BERT, seconds
    torchrun --nproc_per_node 2 examples/fsdp2_torchrun.py --tiny --resume CKPT   # continue from step 40's checkpoint
    python examples/fsdp2_torchrun.py --tiny                               # one process works too (a group of one)

The order matters: `setup_unified_lora` first, then `fully_shard` on each encoder layer and on the root (the other
order leaves the LoRA blocks outside FSDP2 and is refused), then the optimizer and `ctrl.attach_optimizer`. Every
LoRA block is then a DTensor and each process holds a shard of it. The controller all-reduces the loss, so rank
switches, LR changes and the Mirror snapshot/restore (its shards and their optimizer moments) happen on the same
step everywhere; `assert_lockstep` checks that at every step. As in examples/ddp_torchrun.py, steps 50-57 flip the
labels: the loss jumps and φ raises the mode to MIRROR, which snapshots each process's shards (and their AdamW
moments) and at its end keeps or restores them, on the same step everywhere.

At step `--save-at` (40) every process writes `save_sharded_checkpoint(dir, model, opt, ctrl)`: the model, the
optimizer and the controller's shards (its Mirror snapshot, stored gradients) through torch.distributed.checkpoint
(each process its shards), and the rest of the controller's state once (`ctrl.pt`). `--resume dir` builds the same
run, `load_sharded_checkpoint`s it and trains on from the saved step, on the same data: the adapter digest printed at
the end equals the uninterrupted run's. The resume may run over another number of processes (dcp reshards); each
process then reads other rows of the data (`batch_for`), so the run goes on differently. The digest comes from `lora_state_dict(model)`, which all-gathers the blocks
into full tensors (a collective: every process calls it).
"""

import argparse
import dataclasses
import gc
import hashlib
import os
import tempfile

import torch
import torch.distributed as dist
from ddp_torchrun import (FLIP, LORA, STEPS, init_distributed, tiny_bert, toy_batch,  # examples/ddp_torchrun.py
                          train_step)
from torch.distributed.fsdp import fully_shard

from unified_lora import lora_state_dict, setup_unified_lora
from unified_lora.distributed import load_sharded_checkpoint, save_sharded_checkpoint


def minilm_mrpc(n=1024):
    """MiniLM with a fresh 2-class head (no dropout, so a resumed run repeats the uninterrupted one) and the first
    `n` MRPC training pairs, padded to one length so that any rows stack into a batch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from unified_lora.data import default_model_path, encode, load_glue

    path = default_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0,
                                                               attention_probs_dropout_prob=0.0)
    data = encode(AutoTokenizer.from_pretrained(path), load_glue("mrpc", "train").examples[:n], max_length=48,
                  padding="max_length")
    return model, data


def batch_for(data, step, rank, world, n=16):
    """This process's batch of `step`: a function of the step alone, so a resumed run sees the uninterrupted run's
    data. A different shard per process; the FLIP steps carry wrong labels."""
    if data is None:
        return toy_batch(torch.Generator().manual_seed(1000 * (step + 1) + rank), step, n)
    idx = (torch.arange(n) + (step * world + rank) * n) % len(data["labels"])
    b = {k: v[idx] for k, v in data.items()}
    b["labels"] = 1 - b["labels"] if step in FLIP else b["labels"]
    return b


def digest(model) -> str:
    """sha256 of every LoRA block, gathered into full tensors (a collective: call it on every process)."""
    h = hashlib.sha256()
    for k, v in sorted(lora_state_dict(model).items()):
        if isinstance(v, torch.Tensor):
            h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(a):
    launched, rank, world, device = init_distributed(one_process_group=True)
    master = rank == 0

    torch.manual_seed(0)  # identical initial weights on every process
    model, data = (tiny_bert(), None) if a.tiny else minilm_mrpc()
    model.to(device)
    # examples/ddp_torchrun.py's controller, with the calibrated loss mapped higher (2.0 instead of 1.0):
    # the burst of wrong labels then sends φ past θ1 into MIRROR (a snapshot of the shards and their AdamW moments)
    signal = dataclasses.replace(LORA["signal"], calibration_target=2.0)
    adapters, ctrl = setup_unified_lora(model, **{**LORA, "signal": signal})  # prints on process 0 alone by default
    for layer in model.bert.encoder.layer:  # after setup: each layer's LoRA blocks are sharded with it
        fully_shard(layer)
    fully_shard(model)  # the root: embeddings, pooler, classifier
    lr = 1e-2 if a.tiny else 2e-3  # pretrained MiniLM: at 1e-2 its loss only wobbled around ln 2
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    ctrl.attach_optimizer(opt)  # lr_mode="multiplier": the mode scales this LR

    start = 0
    if a.resume:
        load_sharded_checkpoint(a.resume, model, opt, ctrl)
        start = ctrl.global_step
        if master:
            print(f"resumed from {a.resume} at step {start} (mode={ctrl.trace[-1].mode if ctrl.trace else '-'})")
    ckpt = a.checkpoint_dir
    if ckpt is None and a.save_at and start < a.save_at:  # one folder for all processes: process 0 picks it
        name = [tempfile.mkdtemp(prefix="unified_lora_fsdp2_") if master else None]
        dist.broadcast_object_list(name, src=0)
        ckpt = name[0]

    model.train()
    for step in range(start, a.steps):
        if step == a.save_at and ckpt is not None:
            save_sharded_checkpoint(ckpt, model, opt, ctrl)  # on every process; resume with --resume ckpt
            if master:
                print(f"[{step}] sharded checkpoint of {step} steps in {ckpt}")
        train_step(model, ctrl, opt, batch_for(data, step, rank, world), device, step, master)

    fingerprint = digest(model)  # every process
    if master:
        events = [(r.step, r.transition, r.snapshot) for r in ctrl.trace if r.transition]
        r = ctrl.trace[-1]
        print(f"transitions: {events}")
        print(f"{world} process(es), steps {start}-{a.steps}, in lockstep at every step; final mode={r.mode} "
              f"rank={r.rank}")
        print(f"adapter digest after {ctrl.global_step} steps: {fingerprint}")
        if ckpt is not None and a.save_at >= start:
            print(f"checkpoint of step {a.save_at}: {ckpt}   (continue: --resume {ckpt})")
    # Free the sharded model (its DTensors hold the process group) before destroying the group, as
    # examples/ddp_torchrun.py frees its DDP model: a gloo group destroyed from its last reference can deadlock at exit
    del model, opt, ctrl, adapters
    gc.collect()
    dist.destroy_process_group()


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a random tiny BERT instead of MiniLM on MRPC")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--save-at", type=int, default=40, help="step of the sharded checkpoint (0: none)")
    ap.add_argument("--checkpoint-dir", default=None, help="where to save it (default: a new temp dir)")
    ap.add_argument("--resume", default=None, metavar="DIR", help="a checkpoint that --save-at wrote")
    a = ap.parse_args()
    if a.steps < 1:
        ap.error(f"--steps must be at least 1, got {a.steps}")
    if not 0 <= a.save_at < a.steps:
        ap.error(f"--save-at must be between 0 (no checkpoint) and --steps - 1 ({a.steps - 1}), got {a.save_at}")
    if a.resume is not None and not os.path.isfile(os.path.join(a.resume, ".metadata")):
        ap.error(f"--resume {a.resume}: no sharded checkpoint there (no .metadata file that save_sharded_checkpoint "
                 f"writes)")
    return a


if __name__ == "__main__":
    main(parse_args())  # --help prints the docstring instead of running the example
