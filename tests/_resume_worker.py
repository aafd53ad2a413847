"""Subprocess worker for the resume test: trains a tiny Llama with the controller.

usage: python _resume_worker.py SIGNAL START STOP OUT_DIR [RESUME_FROM]
Runs steps [START, STOP); saves everything at STOP into OUT_DIR/state.pt and the
per-step (phi, mode, lr) into OUT_DIR/trace.json.
"""

import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import VOCAB, tiny_llama  # noqa: E402

from unified_lora import ActuatorConfig, MirrorConfig, setup_unified_lora  # noqa: E402

signal, start, stop, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
resume = sys.argv[5] if len(sys.argv) > 5 else None

model = tiny_llama(0)
model.train()
adapters, ctrl = setup_unified_lora(model, target_modules=["q_proj", "v_proj"], signal=signal, print_fn=None,
                                    actuators=ActuatorConfig(lr_mode="multiplier"),
                                    mirror=MirrorConfig(snapshot_optimizer=True, policy="always"))
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60)
ctrl.attach_optimizer(opt)
if resume:
    sd = torch.load(resume, weights_only=False)
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
            "ctrl": ctrl.state_dict()}, f"{out}/state.pt")
with open(f"{out}/trace.json", "w") as f:
    json.dump([[r.step, r.phi, r.mode, r.rank, r.lr, r.snapshot] for r in ctrl.trace], f)
