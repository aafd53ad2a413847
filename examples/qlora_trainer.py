"""QLoRA with Unified LoRA in the stock Hugging Face Trainer: a 4-bit (nf4) base, nested LoRA blocks in fp32.

    python examples/qlora_trainer.py            # all-MiniLM-L6-v2 in 4-bit on 128 MRPC pairs (CPU, about a minute)
    python examples/qlora_trainer.py --tiny     # a random tiny BERT, saved and reloaded in 4-bit, no files needed

The base is loaded with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=
...)` (bitsandbytes' CPU backend runs it on a machine without a GPU). The classifier head is a new, trained layer:
it must stay in full precision (`llm_int8_skip_modules=["classifier"]`; a quantized head in `modules_to_save` is
refused). The stock Trainer refuses a quantized model that is not a PEFT model, so it is built inside
`quantized_model_for_trainer(model)`. Training changes only the LoRA blocks and the head: the packed 4-bit weights
stay bit-identical (checked at the end). The adapter is then exported in PEFT's format (`export_peft_adapter`),
which `import_peft_adapter` or PEFT's `PeftModel.from_pretrained` loads onto a 4-bit or a full-precision base.
"""

import argparse
import tempfile
from pathlib import Path

import bitsandbytes as bnb
import torch
from trainer_callback import DictDataset, minilm_mrpc, print_log_table  # examples/trainer_callback.py
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          BitsAndBytesConfig, Trainer, TrainingArguments)

from unified_lora import SignalConfig, setup_unified_lora
from unified_lora.callbacks import UnifiedLoRACallback, quantized_model_for_trainer
from unified_lora.peft_io import export_peft_adapter


def tiny_bert_4bit(n, folder, quantization_config):
    """A random tiny BERT classifier saved to `folder` and loaded back in 4-bit, with `n` examples whose class is in
    the tokens."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=32, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=quantization_config,
                                                               device_map=_device_map())
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(5, 50, (n, 12), generator=g) + 45 * y[:, None]
    return model, DictDataset({"input_ids": x, "labels": y}), ["query", "value"], ["classifier"]


def _device_map():
    return {"": 0} if torch.cuda.is_available() else "cpu"


def packed_weights(model):
    """{name: a copy of the packed 4-bit codes} of every quantized layer, to check that training left them alone."""
    return {n.replace(".base_layer", ""): m.weight.detach().clone()  # setup moves a wrapped layer to .base_layer
            for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a random tiny BERT instead of MiniLM on MRPC")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="bnb_4bit_compute_dtype (bfloat16 on a GPU; the LoRA blocks are fp32 either way)")
    ap.add_argument("--output-dir", default=None, help="checkpoints and the exported adapter (default: a new temp dir)")
    a = ap.parse_args()
    for flag, value in (("--steps", a.steps), ("--examples", a.examples)):
        if value < 1:  # the Trainer still runs one step at max_steps=0; an empty data set fails in its sampler
            ap.error(f"{flag} must be at least 1, got {value}")

    out = Path(a.output_dir or tempfile.mkdtemp(prefix="unified_lora_qlora_"))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=getattr(torch, a.compute_dtype),
                           llm_int8_skip_modules=["classifier"])  # the new head trains: keep it in full precision
    torch.manual_seed(0)
    if a.tiny:
        model, train, targets, heads = tiny_bert_4bit(a.examples, out / "tiny_base", q)
    else:
        model, train, targets, heads = minilm_mrpc(a.examples, quantization_config=q, device_map=_device_map())
    before = packed_weights(model)
    adapters, ctrl = setup_unified_lora(model, target_modules=targets, modules_to_save=heads,
                                        signal=SignalConfig(kind="loss", calibration_steps=4), log_every=4)
    args = TrainingArguments(
        output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=2, logging_steps=4, save_steps=8,
        report_to="none", use_cpu=not torch.cuda.is_available(), seed=0, disable_tqdm=True,
    )
    with quantized_model_for_trainer(model):  # the Trainer's constructor refuses a plain quantized model
        trainer = Trainer(model=model, args=args, train_dataset=train)
    UnifiedLoRACallback(ctrl).add_to(trainer)
    trainer.train()

    print_log_table(trainer)
    after = packed_weights(model)
    same = len(after) == len(before) and all(torch.equal(before[n], after[n]) for n in before)
    print(f"{len(before)} 4-bit layers ({len(adapters)} with nested LoRA), packed weights unchanged: {same}")
    info = export_peft_adapter(model, adapters, out / "adapter")
    transitions = [r for r in ctrl.trace if r.transition]
    print(f"{len(ctrl.trace)} controller steps, {len(transitions)} transitions; checkpoints in {out}")
    print(f"PEFT adapter (rank {info['r']}) in {out / 'adapter'}")


if __name__ == "__main__":
    main()
