"""PEFT interop in one run: train nested adapters a few steps, export them at
ranks 4, 8 and 16 in PEFT's format, reload each with `PeftModel.from_pretrained`
and compare logits; import one back into nested layers; merge-and-unload and
reload the plain model with `from_pretrained`.

    python examples/peft_interop.py            # all-MiniLM-L6-v2 (offline wheel), ~10 s on CPU
    python examples/peft_interop.py --tiny     # a random tiny BERT, no files needed
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
from transformers.utils import logging as hf_logging

from unified_lora import set_rank, setup_unified_lora
from unified_lora.peft_io import export_peft_adapter, import_peft_adapter, merge_and_unload

warnings.filterwarnings("ignore")
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
SENTENCES = ["The movie was wonderful.", "A dull, lifeless film.", "I would watch it again.", "Never again."]
LABELS = torch.tensor([1, 0, 1, 0])


def base_and_batch(tiny: bool):
    torch.manual_seed(0)
    if tiny:
        cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, num_labels=2)
        ids = torch.randint(0, 128, (len(SENTENCES), 12), generator=torch.Generator().manual_seed(1))
        return BertForSequenceClassification(cfg), {"input_ids": ids}
    from unified_lora.data import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    return BertForSequenceClassification.from_pretrained(path, num_labels=2), batch


@torch.no_grad()
def logits(model, batch):
    return model.eval()(**batch).logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="random tiny BERT instead of MiniLM")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    if args.steps < 0:
        ap.error(f"--steps must be at least 0, got {args.steps}")

    model, batch = base_and_batch(args.tiny)
    fresh = copy.deepcopy(model)  # the untouched base every reload starts from
    adapters, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                        signal="loss", print_fn=None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ctrl.attach_optimizer(opt)
    model.train()

    def train_step(use_ctrl: bool = True) -> float:
        loss = model(**batch, labels=LABELS).loss
        loss.backward()
        if use_ctrl:
            ctrl.step(loss=loss.item())
        opt.step()
        opt.zero_grad()
        return loss.item()

    for _ in range(args.steps):  # the controller keeps MULTI (rank 8) here: blocks 1-2 train
        loss = train_step()
    set_rank(adapters, 16)  # two steps at rank 16 so the third block is non-zero too
    for _ in range(2):
        loss = train_step(use_ctrl=False)
    print(f"trained {args.steps + 2} steps, last loss {loss:.4f}")

    base_out = logits(fresh, batch)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in (4, 8, 16):
            set_rank(adapters, r)
            ours = logits(model, batch)
            export_peft_adapter(model, adapters, tmp / f"r{r}")
            theirs = logits(PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp / f"r{r}")), batch)
            print(f"rank {r:2d}: max |ours - PEFT| = {(ours - theirs).abs().max().item():.2e}   "
                  f"(adapter moves logits by {(ours - base_out).abs().max().item():.2e})")

        other = copy.deepcopy(fresh)
        imp = import_peft_adapter(other, tmp / "r8")
        set_rank(adapters, 8)
        print(f"import r8 into nested layers (rank {imp.rank}, modules_to_save {imp.modules_to_save}): "
              f"max diff {(logits(other, batch) - logits(model, batch)).abs().max().item():.2e}")

        ours = logits(model, batch)
        plain = merge_and_unload(model)
        plain.save_pretrained(tmp / "merged")
        reloaded = BertForSequenceClassification.from_pretrained(tmp / "merged")
        print(f"merge_and_unload -> save_pretrained -> from_pretrained: max diff "
              f"{(logits(reloaded, batch) - ours).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
