"""Unified LoRA inside the stock Hugging Face Trainer (CPU, under a minute).

    python examples/trainer_callback.py             # a random 2-layer Llama, no files needed
    python examples/trainer_callback.py --minilm    # all-MiniLM-L6-v2 on 128 MRPC pairs (slower on CPU)

The callback feeds the controller the loss of every optimizer step (averaged
over gradient accumulation), runs `ctrl.step` between backward and
`optimizer.step`, scales the Trainer's own cosine/warmup schedule by the mode's
multiplier, saves the controller in every checkpoint (`checkpoint-N/
unified_lora_controller.pt`, so `trainer.train(resume_from_checkpoint=True)`
continues the same trajectory), and logs φ, mode, rank and LR as
`unified_lora/*` in `trainer.state.log_history`.
"""

import argparse
import tempfile

import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer,
                          TrainingArguments)

from unified_lora import SignalConfig, setup_unified_lora
from unified_lora.callbacks import UnifiedLoRACallback


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


def minilm_mrpc(n, **load_kwargs):
    """MiniLM with a fresh 2-class head, the first `n` MRPC training pairs, its LoRA targets and head.
    `load_kwargs` go to `from_pretrained` (examples/qlora_trainer.py passes a `quantization_config`)."""
    from unified_lora.data import default_model_path, encode, load_glue

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **load_kwargs)
    train = load_glue("mrpc", "train")
    return model, DictDataset(encode(tok, train.examples[:n], max_length=48)), ["query", "value"], ["classifier"]


def tiny_random(n):
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 32, (n, 1), generator=g) + torch.arange(12)) % 32  # count up from a random token
    return LlamaForCausalLM(cfg), DictDataset({"input_ids": x, "labels": x}), "all-linear", None


def print_log_table(trainer) -> None:
    """The controller's φ, mode, rank and LR per logged step, as the callback logs them."""
    print("\nstep  loss    phi    mode rank lr        (from trainer.state.log_history)")
    for h in trainer.state.log_history:
        if "unified_lora/phi" in h:
            v = {k.split("/")[1]: x for k, x in h.items() if k.startswith("unified_lora/")}
            print(f"{h['step']:>4}  {v['loss']:.4f}  {v['phi']:.3f}  {v['mode']:>4} {v['rank']:>4} {v['lr']:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", action="store_true", help="MiniLM on MRPC instead of a random tiny Llama")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--output-dir", default=None)
    a = ap.parse_args()
    for flag, value in (("--steps", a.steps), ("--examples", a.examples)):
        if value < 1:  # the Trainer still runs one step at max_steps=0; an empty data set fails in its sampler
            ap.error(f"{flag} must be at least 1, got {value}")

    torch.manual_seed(0)
    model, train, targets, heads = minilm_mrpc(a.examples) if a.minilm else tiny_random(a.examples)
    # Loss signal with warmup calibration: the first 4 steps set the loss scale, so φ starts in MULTI
    # whatever the task's loss level is (SPEC §2a: the raw signal depends on the loss scale).
    adapters, ctrl = setup_unified_lora(model, target_modules=targets, modules_to_save=heads,
                                        signal=SignalConfig(kind="loss", calibration_steps=4), log_every=4)
    out = a.output_dir or tempfile.mkdtemp(prefix="unified_lora_trainer_")
    args = TrainingArguments(
        output_dir=out, max_steps=a.steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=2, logging_steps=4, save_steps=8,
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[UnifiedLoRACallback(ctrl)])
    trainer.train()

    print_log_table(trainer)
    transitions = [r for r in ctrl.trace if r.transition]
    print(f"{len(ctrl.trace)} controller steps, {len(transitions)} transitions; checkpoints in {out}")


if __name__ == "__main__":
    main()
