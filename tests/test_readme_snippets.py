"""The README's Python examples run as written, on tiny models, and do what the README says they do.

Each test takes one ```python block out of README.md verbatim (found by a line it contains), gives it the names
the README leaves to the reader (a model, a data loader, ...), runs it in a scratch folder, and checks the effect:
a README example that drifts from the API fails here.
"""

import os
from pathlib import Path

import pytest
import torch

from conftest import classification_batch, tiny_bert, tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(marker: str) -> str:
    blocks = [b.split("```", 1)[0] for b in README.read_text(encoding="utf-8").split("```python\n")[1:]]
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README: expected one python block containing {marker!r}, found {len(found)}"
    return found[0]


def run(code: str, ns: dict, tmp_path) -> dict:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, f"README.md<{code.splitlines()[0]}>", "exec"), ns)
    finally:
        os.chdir(cwd)
    return ns


def lm_batches(n: int = 6, seq: int = 12):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (x := torch.randint(0, 64, (4, seq), generator=g)), "labels": x} for _ in range(n)]


def test_v1_learning_rate_controller(tmp_path):
    model = tiny_llama().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.lm_head.weight.detach().clone()
    ns = run(snippet("controller.update(loss.item())"),
             {"model": model, "train_loader": lm_batches(), "optimizer": optimizer}, tmp_path)
    ctrl = ns["controller"]
    assert ctrl.global_step == 6
    assert optimizer.param_groups[0]["lr"] in (5e-5, 3e-5, 1e-5)  # the v1 README's mode LRs, set by the loop
    assert not torch.equal(model.lm_head.weight, before)


def test_v3_nested_adapters_and_the_full_controller(tmp_path):
    model = tiny_llama().train()
    ns = run(snippet("ctrl.step(loss=loss.item())     # reads gradients"),
             {"model": model, "dataloader": lm_batches(), "torch": torch}, tmp_path)
    adapters, ctrl = ns["adapters"], ns["ctrl"]
    assert len(adapters) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in adapters)
    assert ctrl.global_step == 6 and ctrl.optimizer is ns["optimizer"] and ctrl.signal_config.kind == "composite"
    assert all(a.lora_B[0].abs().sum() > 0 for a in adapters.values())  # B starts at zero: the adapters trained


def test_peft_export_import_merge_and_attach(tmp_path):
    from peft import LoraConfig, get_peft_model

    from unified_lora import setup_unified_lora

    model = tiny_bert()
    adapters, _ = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                     print_fn=None)
    with torch.no_grad():
        for a in adapters.values():
            for b in a.lora_B:
                b.normal_(0, 0.1)
    x, _ = classification_batch(8)
    ours = model(input_ids=x).logits.detach()
    theirs = get_peft_model(tiny_bert(), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "some" / "peft-lora-dir")

    ns = run(snippet("export_peft_adapter(model, adapters"),
             {"model": model, "adapters": adapters, "fresh_base": tiny_bert(), "base_model": tiny_bert(),
              "other_base": tiny_bert()}, tmp_path)
    assert torch.equal(ns["peft_model"](input_ids=x).logits, ours)  # "same logits (max abs diff 0.0 in fp32)"
    assert ns["imp"].rank == 8 and ns["ctrl"].optimizer is ns["peft_opt"]
    assert torch.allclose(ns["base_model"](input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-6)
    from transformers import BertForSequenceClassification

    merged = BertForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert torch.allclose(merged(input_ids=x).logits, ours, atol=1e-5)


def test_trainer_callback(tmp_path):
    x, y = classification_batch(32)
    train = [{"input_ids": a, "labels": b} for a, b in zip(x, y)]
    ns = run(snippet("UnifiedLoRACallback(ctrl).add_to(trainer)"), {"model": tiny_bert().train(), "train": train},
             tmp_path)
    trainer, ctrl = ns["trainer"], ns["ctrl"]
    assert trainer.state.global_step == 12 and ctrl.global_step == 12  # 3 epochs of 32 rows at batch 8
    assert [r.step for r in ctrl.trace] == list(range(12))  # one controller step per optimizer step


def test_multitask_mode(tmp_path):
    x, y = classification_batch(32)
    loader = [({"input_ids": x[i:i + 8]}, y[i:i + 8], ["sst2"] * 4 + ["mrpc"] * 4) for i in range(0, 32, 8)]
    ns = run(snippet("setup_multitask_lora(model"), {"model": tiny_bert().train(), "loader": loader}, tmp_path)
    ctrl = ns["ctrl"]
    assert ctrl.global_step == 4 and ctrl.optimizer is ns["opt"]
    assert ctrl.trace[0].transition == "SINGLE->MULTI"  # it started in SINGLE, as the block asks


@pytest.mark.parametrize("marker", ["controller.update(loss.item())", "setup_multitask_lora(model"])
def test_snippet_lookup_fails_loudly_on_a_missing_block(marker):
    with pytest.raises(AssertionError, match="expected one python block"):
        snippet(marker + " (no such line)")


def inline_code(marker: str) -> str:
    """The one `inline code` span of README.md's prose that contains `marker`."""
    spans = README.read_text(encoding="utf-8").replace("```", "").split("`")[1::2]
    found = [s for s in spans if marker in s]
    assert len(found) == 1, f"README: expected one inline code span containing {marker!r}, found {len(found)}"
    return found[0]


def test_causal_lm_per_task_losses_are_each_tasks_mean_nll_over_its_target_tokens():
    """The multi-task section's causal-LM recipe, as its two inline spans write it."""
    import torch.nn.functional as F

    from unified_lora import MachineConfig
    from unified_lora.multitask import per_task_losses, setup_multitask_lora, task_context

    model = tiny_llama().train()
    setup_multitask_lora(model, tasks=["a", "b"], target_modules=["q_proj", "v_proj"],
                         machine=MachineConfig(initial_mode=0), print_fn=None)
    x = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[:2, 4:] = -100  # task a's rows are short: most of their labels are padding
    task_ids = ["a", "a", "b", "b"]
    with task_context(model, task_ids):
        logits = model(input_ids=x).logits
    ns = {"F": F, "logits": logits, "labels": labels, "task_ids": task_ids, "per_task_losses": per_task_losses}
    exec(inline_code("per = F.cross_entropy(logits[:, :-1]"), ns)
    losses = eval(inline_code("per_task_losses(per, task_ids, mask="), ns)
    for t, rows in (("a", slice(0, 2)), ("b", slice(2, 4))):
        with task_context(model, t):  # the model's own loss: the mean NLL over the task's counted target tokens
            want = model(input_ids=x[rows], labels=labels[rows]).loss.item()
        assert abs(losses[t] - want) < 1e-5, (t, losses[t], want)


def test_every_readme_python_block_is_run_by_a_test_here():
    import re

    markers = re.findall(r'snippet\("([^"]+)"\)', Path(__file__).read_text(encoding="utf-8"))
    blocks = [b.split("```", 1)[0] for b in README.read_text(encoding="utf-8").split("```python\n")[1:]]
    uncovered = [b.splitlines()[0] for b in blocks if not any(m in b for m in markers)]
    assert not uncovered, f"README python blocks no test runs (add one with snippet(...)): {uncovered}"
