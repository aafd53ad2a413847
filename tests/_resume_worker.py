"""Subprocess worker for the resume test: trains a tiny Llama with the controller.

usage: python _resume_worker.py START STOP OUT_DIR [RESUME_DIR] [--save-at K SAVE_DIR]
For each signal (composite, loss): runs steps [START, STOP), saves everything at
STOP into OUT_DIR/<signal>.pt and the per-step trace into OUT_DIR/<signal>.json;
with --save-at, the same into SAVE_DIR as it stands before step K (what a run of
[START, K) saves), and the run goes on. One process handles both signals to keep
the interpreter start-ups few.
"""

import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import VOCAB, tiny_llama  # noqa: E402

from unified_lora import ActuatorConfig, MirrorConfig, setup_unified_lora  # noqa: E402

argv = sys.argv[1:]
save_at, save_dir = (int(argv[-2]), argv[-1]) if "--save-at" in argv else (None, None)
argv = argv[:argv.index("--save-at")] if "--save-at" in argv else argv
start, stop, out = int(argv[0]), int(argv[1]), argv[2]
resume_dir = argv[3] if len(argv) > 3 else None


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

    def save(folder: str) -> None:
        torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "ctrl": ctrl.state_dict(), "mirror_held": ctrl.mirror.held},
                   f"{folder}/{signal}.pt")
        with open(f"{folder}/{signal}.json", "w") as f:
            json.dump([[r.step, r.phi, r.mode, r.rank, r.lr, r.snapshot] for r in ctrl.trace], f)

    pattern = torch.arange(16) % 5 + 3
    for step in range(start, stop):
        if step == save_at:
            save(save_dir)
        g = torch.Generator().manual_seed(step)
        x = (pattern + torch.randint(0, 2, (8, 16), generator=g)) % VOCAB
        labels = torch.randint(0, VOCAB, x.shape, generator=g) if 25 <= step < 40 else x  # corrupted stretch
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        ctrl.step(loss=loss.item())
        opt.step()
        sched.step()
        opt.zero_grad()

    save(out)


for sig in ("composite", "loss"):
    run(sig)
