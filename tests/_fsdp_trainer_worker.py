"""torchrun worker (2 processes, gloo, CPU): the stock Trainer's own FSDP2 path with UnifiedLoRACallback.

usage: torchrun --nproc-per-node 2 _fsdp_trainer_worker.py OUT_DIR
accelerate 1.16 selects FSDP on GPUs only: on the CPU `AcceleratorState._prepare_backend` makes the run MULTI_CPU, and
the FSDP branch of `AcceleratorState.__init__` lists GPU types alone, so `TrainingArguments(fsdp=..., use_cpu=True)`
trains under DDP, silently. `_fsdp2` sets the two fields accelerate sets on a GPU (`distributed_type`, `fsdp_plugin`
from the Trainer's own `fsdp_plugin_args`) and the Trainer's `is_fsdp_enabled`, so that everything after runs as on
GPUs: `fsdp2_prepare_model` (fully_shard inside train(), after setup_unified_lora), the optimizer built after it, and
the dcp checkpoints (SHARDED_STATE_DICT) that save_fsdp_model / load_fsdp_optimizer write and read.
Runs: the whole run (checkpoints at steps 3 and 6); resumes from checkpoint-6 (mid-MIRROR) and from checkpoint-3 (before
the first MIRROR: the rank-16 blocks have no optimizer state yet); then resumes from checkpoint-6 with one process's
controller file missing, then with another's damaged, each of which must raise the same error on both processes
(before, the process that raised alone left the other waiting in a collective: the test's torchrun timed out), and
with the file missing under strict_resume=False, where both processes restart their controllers.
Then a run in which one process's shard of a gradient holds a NaN at one step, its loss finite (`nan_grad_run`).
Writes OUT_DIR/rank{r}.pt for the tests (test_trainer_callback.py) to compare.
"""

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_llama  # noqa: E402

out = sys.argv[1]
torch.set_num_threads(1)
# the loss the controller sees, scaled per step: φ rises into MIRROR (snapshot) and falls back (restore)
FACTOR = [1, 1, 6, 6, 0.05, 0.05, 0.05, 0.05]


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        x = torch.randint(3, 60, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x.clone()}


def _fsdp2(trainer) -> None:
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def run(resume=None, strict_resume=True) -> dict:
    from transformers import Trainer, TrainingArguments

    from unified_lora import MirrorConfig, SignalConfig, setup_unified_lora
    from unified_lora.callbacks import UnifiedLoRACallback
    from unified_lora.distributed import local_tensor

    model = tiny_llama().train()
    _, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None,
                                 signal=SignalConfig(kind="loss", alpha=1.0, loss_scale=2.05),
                                 mirror=MirrorConfig(policy="always", snapshot_optimizer=True))
    args = TrainingArguments(output_dir=out, max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2,
                             use_cpu=True, ddp_backend="gloo", report_to="none", disable_tqdm=True, seed=0,
                             save_strategy="steps", save_steps=3, logging_steps=1, fsdp="full_shard",
                             fsdp_config={"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT",
                                          "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    step = {}

    def loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 reduction="sum") / num_items_in_batch
        return loss * FACTOR[step["trainer"].state.global_step]

    trainer = step["trainer"] = Trainer(model=model, args=args, train_dataset=Rows(), compute_loss_func=loss_func)
    UnifiedLoRACallback(ctrl, strict_resume=strict_resume).add_to(trainer)
    _fsdp2(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    return {"trace": [(r.step, r.loss, r.phi, r.mode, r.rank, r.lr, r.snapshot, r.transition) for r in ctrl.trace],
            "sharded": all(type(p).__name__ == "DTensor" for p in ctrl.managed_parameters()),
            "shards": [local_tensor(p).detach().clone() for p in ctrl.managed_parameters()],
            "warnings": [str(w.message) for w in caught if "UnifiedLoRACallback" in str(w.message)]}


rank = int(os.environ["RANK"])
rec = {"full": run()}
rec["files"] = sorted(os.listdir(os.path.join(out, "checkpoint-6")))
rec["resumed"] = run(os.path.join(out, "checkpoint-6"))  # mid-MIRROR: the snapshot and its moments are held
rec["resumed3"] = run(os.path.join(out, "checkpoint-3"))  # the rank-16 blocks not stepped yet


def spoilt_resume(rank_to_spoil: int, spoil, strict_resume=True) -> dict | tuple[str, str]:
    path = os.path.join(out, "checkpoint-6", f"unified_lora_controller_rank{rank_to_spoil}.pt")
    kept = path + ".kept"
    if rank == rank_to_spoil:
        os.replace(path, kept)
        spoil(path)
    try:
        return run(os.path.join(out, "checkpoint-6"), strict_resume)
    except Exception as e:
        return type(e).__name__, str(e)
    finally:
        if rank == rank_to_spoil:
            os.replace(kept, path)


def cut_short(path):
    with open(path + ".kept", "rb") as f, open(path, "wb") as g:
        g.write(f.read()[:100])


def nan_grad_run() -> dict:
    """`max_grad_norm=0`, with which accelerate 1.16 does not clip (a NaN stays in the entries it is in): at step 3 one
    entry of process 1's shard of a LoRA block's gradient is NaN, its loss finite, when the callback checks the
    gradients (`Poison` runs before it). Each process's shards before and after step 3, and its callback's lines."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from unified_lora import setup_unified_lora
    from unified_lora.callbacks import UnifiedLoRACallback
    from unified_lora.distributed import local_tensor

    lines, got = [], {}
    model = tiny_llama().train()
    # the loss signal, which reads no gradient (the composite one reads the adapters' shards, all-reduced); every
    # process's lines
    _, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], signal="loss", print_fn=lines.append)

    def shards():
        return [local_tensor(p).detach().clone() for p in ctrl.managed_parameters()]

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == 3:
                got["before"] = shards()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if state.global_step + 1 == 3 and rank == 1:
                p = next(p for p in ctrl.managed_parameters() if p.grad is not None)
                local_tensor(p.grad).view(-1)[0] = float("nan")

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                got["after"] = shards()

    args = TrainingArguments(output_dir=os.path.join(out, "nan_grad"), max_steps=5, per_device_train_batch_size=2,
                             learning_rate=1e-2, max_grad_norm=0.0, use_cpu=True, ddp_backend="gloo",
                             report_to="none", disable_tqdm=True, seed=0, save_strategy="no", fsdp="full_shard",
                             fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[Poison(), UnifiedLoRACallback(ctrl)])
    _fsdp2(trainer)
    trainer.train()
    return {"said": [x for x in lines if "UnifiedLoRACallback" in x], "steps": trainer.state.global_step,
            "trace": [(r.step, r.loss, r.phi, r.mode, r.rank) for r in ctrl.trace], "final": shards(), **got}


rec["missing"] = spoilt_resume(1, lambda path: None)
rec["damaged"] = spoilt_resume(0, cut_short)
rec["restarted"] = spoilt_resume(1, lambda path: None, strict_resume=False)
rec["nan_grad"] = nan_grad_run()
torch.save(rec, os.path.join(out, f"rank{rank}.pt"))
# The gloo group the Trainer (accelerate) made keeps its three threads (gloo_tcp_loop, 2 x pt_gloo_runloop) running
# to the end, even after a gc.collect() and dist.destroy_process_group() here (tried, read from /proc: something
# outside Python's reach holds the group, FSDP2's mesh or accelerate's state). At the interpreter's shutdown a gloo
# thread that takes the GIL aborts the process ("terminate called without an active exception", SIGABRT): torchrun
# then failed this test once (CI on a 2-core machine, stop 53) after every run had passed and its record was saved.
# So the process ends here, its record written and flushed, without the interpreter's shutdown.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
