"""Subprocess worker for the resume test: trains a tiny Llama with the controller.

usage: python _resume_worker.py START STOP OUT_DIR [RESUME_DIR]
For each signal (composite, loss): runs steps [START, STOP), saves everything at
STOP into OUT_DIR/<signal>.pt and the per-step trace into OUT_DIR/<signal>.json.
One process handles both signals to keep the interpreter start-ups few.
"""

import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import VOCAB, tiny_llama  # noqa: E402

from unified_lora import ActuatorConfig, MirrorConfig, setup_unified_lora  # noqa: E402

start, stop, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
resume_dir = sys.argv[4] if len(sys.argv) > 4 else None


def run(signal: str) -> None:

    model = tiny_llama(0)
    model.train()
    adapters, ctrl = setup_unified_lora(model, target_modules=["q_proj", "v_proj"], signal=signal, print_fn=None,
                                        actuators=ActuatorConfig(lr_mode="multiplier"),
                                        mirror=MirrorConfig(snapshot_optimizer=True, policy="always"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60)
    ctrl.attach_optimizer(opt)
    if resume_dir:
        sd = torch.load(f"{resume_dir}/{signal}.pt", weights_only=False)
        for p, v in zip(params, sd["params"]):
            p.data.copy_(v)
        opt.load_state_dict(sd["opt"])
        sched.load_state_dict(sd["sched"])
        ctrl.load_state_dict(sd["ctrl"])

    pattern = torch.arange(16) % 5 + 3
    for step in range(start, stop):
        g = torch.Generator().manual_seed(step)
        x = (pattern + torch.randint(0, 2, (8, 16), generator=g)) % VOCAB
        labels = torch.randint(0, VOCAB, x.shape, generator=g) if 25 <= step < 40 else x  # corrupted stretch
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        ctrl.step(loss=loss.item())
        opt.step()
        sched.step()
        opt.zero_grad()

    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict(), "sched": sched.state_dict(),
                "ctrl": ctrl.state_dict(), "mirror_held": ctrl.mirror.held}, f"{out}/{signal}.pt")
    with open(f"{out}/{signal}.json", "w") as f:
        json.dump([[r.step, r.phi, r.mode, r.rank, r.lr, r.snapshot] for r in ctrl.trace], f)


for sig in ("composite", "loss"):
    run(sig)
