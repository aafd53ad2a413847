"""The README's Python examples run as written, on tiny models, and do what the README says they do.

Each test takes one ```python block out of README.md verbatim (found by a line it contains), gives it the names
the README leaves to the reader (a model, a data loader, ...), runs it in a scratch folder, and checks the effect:
a README example that drifts from the API fails here.
"""

import itertools
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


def classification_batches(n: int = 6, rows: int = 4):
    x, y = classification_batch(n * rows)
    return [{"input_ids": x[i:i + rows], "labels": y[i:i + rows]} for i in range(0, n * rows, rows)]


def test_v1_learning_rate_controller(tmp_path):
    model = tiny_llama().train()
    before = model.lm_head.weight.detach().clone()
    ns = run(snippet("controller.update(loss.item())"), {"model": model, "train_loader": lm_batches(), "torch": torch},
             tmp_path)
    ctrl = ns["controller"]
    assert ctrl.global_step == 6
    assert ns["optimizer"].param_groups[0]["lr"] in (5e-5, 3e-5, 1e-5)  # the v1 README's mode LRs, set by the loop
    assert not torch.equal(model.lm_head.weight, before)


def test_v3_nested_adapters_and_the_full_controller(tmp_path):
    model = tiny_bert().train()
    ns = run(snippet("ctrl.step(loss=loss.item())     # reads gradients"),
             {"model": model, "dataloader": classification_batches(), "torch": torch}, tmp_path)
    adapters, ctrl = ns["adapters"], ns["ctrl"]
    assert len(adapters) == 2 * len(model.bert.encoder.layer)  # query and value in each layer
    assert all(n.endswith(("query", "value")) for n in adapters)
    assert ctrl.global_step == 6 and ctrl.optimizer is ns["optimizer"] and ctrl.signal_config.kind == "composite"
    assert all(a.lora_B[0].abs().sum() > 0 for a in adapters.values())  # B starts at zero: the adapters trained


QUICK_START = ["controller.update(loss.item())", "ctrl.step(loss=loss.item())     # reads gradients",
               "(loss / accum).backward()"]


@pytest.mark.parametrize("marker", QUICK_START)
def test_the_quick_start_setup_runs_each_quick_start_block_on_the_bundled_minilm(marker, tmp_path):
    """A new user puts the Quick start's set-up block above each block, as the README says, and runs it: the bundled
    all-MiniLM-L6-v2 and the shipped MRPC rows, nothing else given. Before the set-up block, the blocks named `model`
    and `dataloader` without saying where they come from, and the v3 block's Llama targets (q_proj, v_proj) matched
    nothing in MiniLM. The loader is cut to 8 batches: two optimizer steps at the hand-written loop's accumulation 4
    (its warm-up gives the first LR 0)."""
    from unified_lora import lora_layers

    ns = run(snippet("path = default_model_path()"), {}, tmp_path)
    model, train = ns["model"], ns["train"]
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 2
    assert len(train) == 128 and {"input_ids", "attention_mask", "labels"} <= set(train[0])
    ns["dataloader"] = ns["train_loader"] = list(itertools.islice(ns["dataloader"], 8))
    head = model.classifier.weight.detach().clone()
    run(snippet(marker), ns, tmp_path)
    ctrl = ns.get("ctrl") or ns["controller"]
    assert ctrl.global_step == (2 if marker == QUICK_START[2] else 8)
    if marker == QUICK_START[0]:  # v1 fine-tunes the whole model, its new head included
        assert not torch.equal(model.classifier.weight, head)
    else:  # the nested blocks sit on MiniLM's query and value, and trained (B starts at zero)
        assert len(lora_layers(model)) == 12 and all(n.endswith(("query", "value")) for n in ns["adapters"])
        assert all(a.lora_B[0].abs().sum() > 0 for a in ns["adapters"].values())


def test_hand_written_loop_with_accumulation_and_a_checkpoint_resumes_in_a_fresh_model(tmp_path):
    """The hand-written loop counts one controller step per optimizer step (accumulation 4: 8 micro-batches, 2
    steps), and its resume lines, run on a fresh model whose head is initialised afresh, give back the trained
    model's logits, rank, controller state and optimizer state."""
    code = snippet("(loss / accum).backward()")
    loop, resume = code.split("# resume in a fresh process")
    x, y = classification_batch(32)
    batches = [{"input_ids": x[i:i + 4], "labels": y[i:i + 4]} for i in range(0, 32, 4)]
    model = tiny_bert().train()
    ns = run(code, {"model": model, "dataloader": batches, "torch": torch}, tmp_path)
    ctrl, optimizer = ns["ctrl"], ns["optimizer"]
    assert ctrl.global_step == 2 and ns["scheduler"].last_epoch == 2 and ns["losses"] == []

    fresh = tiny_bert()
    with torch.no_grad():  # a newly initialised head, as from_pretrained gives one in a new process
        fresh.classifier.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    (tmp_path / "fresh").mkdir()  # the set-up lines of the loop, with no data: their save must not overwrite
    ns2 = run(loop, {"model": fresh, "dataloader": [], "torch": torch}, tmp_path / "fresh")
    run("# resume" + resume, ns2, tmp_path)
    assert ns2["ctrl"].global_step == 2 and ns2["ctrl"].rank == ctrl.rank
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
    ours, theirs = optimizer.state_dict()["state"], ns2["optimizer"].state_dict()["state"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k]["exp_avg"], theirs[k]["exp_avg"]) for k in ours)


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
    ns = run(snippet("UnifiedLoRACallback(ctrl).add_to(trainer)         # first in the list"),
             {"model": tiny_bert().train(), "train": train}, tmp_path)
    trainer, ctrl = ns["trainer"], ns["ctrl"]
    assert trainer.state.global_step == 12 and ctrl.global_step == 12  # 3 epochs of 32 rows at batch 8
    assert [r.step for r in ctrl.trace] == list(range(12))  # one controller step per optimizer step
    # what the text under the block says: the LR leaves its warm-up (10 % of the steps, rounded up: 2) and the cosine
    # runs; the controller's values are logged with the Trainer's loss; the last checkpoint holds the controller state
    # (the block used to warm up over 50 steps, the whole run, and log nothing before step 500)
    lrs = [r.lr for r in ctrl.trace]
    assert lrs[:3] == pytest.approx([0.0, 2.5e-5, 5e-5]) and lrs[-1] < lrs[3] < 5e-5
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [10] and logged[0]["unified_lora/rank"] == ctrl.trace[9].rank
    assert {"unified_lora/phi", "unified_lora/mode", "unified_lora/lr", "unified_lora/loss"} <= set(logged[0])
    assert (tmp_path / "out" / "checkpoint-12" / "unified_lora_controller.pt").is_file()


def test_trainer_on_a_quantized_model(tmp_path):
    """README "Quantized base models": the QLoRA block, with a tiny Llama loaded in 4-bit by transformers."""
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer,
                              TrainingArguments)

    from unified_lora import setup_unified_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no")
    train = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in lm_batches(2) for i in range(2)]
    ns = run(snippet("with quantized_model_for_trainer(model):"),
             {"model": model, "args": args, "train": train, "setup_unified_lora": setup_unified_lora,
              "Trainer": Trainer}, tmp_path)
    assert ns["trainer"].state.global_step == 3 and ns["ctrl"].global_step == 3


def test_fsdp2_resume_recipe(tmp_path):
    """README "Multi-GPU", FSDP2 resuming: the block's save runs on a model sharded by fully_shard (a one-process
    gloo group) after 3 steps at rank 8, so the rank-16 blocks were paused since the start and have no optimizer
    state; its load runs into a fresh model, optimizer and controller. torch's plain recipe (get_state_dict of the
    fresh optimizer, dcp.load) stopped there at "Missing key in checkpoint state_dict: optim.state.q_proj.lora_A.2.
    step". The resumed optimizer holds exactly the saved states, the weights and the controller's state are the
    saved ones (with the composite signal's stored gradients, tensors, in it)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from unified_lora import setup_unified_lora

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = torch.nn.Linear(16, 16), torch.nn.Linear(16, 2)

        def forward(self, x):
            return self.v_proj(torch.tanh(self.q_proj(x)))

    def build(seed):
        torch.manual_seed(seed)
        model = Tiny()
        _, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None)
        fully_shard(model.q_proj)
        fully_shard(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ctrl.attach_optimizer(opt)
        return {"model": model, "opt": opt, "ctrl": ctrl, "ckpt_dir": str(tmp_path / "ckpt")}

    def full(v):
        return v.full_tensor() if hasattr(v, "full_tensor") else torch.as_tensor(v)

    def opt_state(ns):
        return {n: {k: full(v) for k, v in ns["opt"].state[p].items()}
                for n, p in ns["model"].named_parameters() if p in ns["opt"].state}

    save, load = snippet("save_sharded_checkpoint(ckpt_dir, model, opt, ctrl)").split("# resume")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        trained = build(0)
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            loss = trained["model"](x).square().mean()
            loss.backward()
            trained["ctrl"].step(loss.item())
            trained["opt"].step()
            trained["opt"].zero_grad()
        assert trained["ctrl"].rank == 8 and any(trained["ctrl"].grad_stats.prev)
        run(save, trained, tmp_path)
        fresh = build(1)  # other initial blocks: the load must replace them
        run(save.split("\n", 2)[0] + "\n# resume" + load, fresh, tmp_path)
        want, got = opt_state(trained), opt_state(fresh)
        assert got.keys() == want.keys() and "q_proj.lora_A.2" not in got  # paused since the start: no state
        assert all(torch.equal(got[n][k], want[n][k]) for n in want for k in want[n])
        assert all(torch.equal(p.full_tensor(), q.full_tensor()) for p, q in
                   zip(fresh["model"].parameters(), trained["model"].parameters()))
        assert fresh["ctrl"].global_step == 3 and fresh["ctrl"].rank == 8
        prev = list(zip(fresh["ctrl"].grad_stats.prev, trained["ctrl"].grad_stats.prev))
        assert prev and all(len(u) == len(v) and all(map(torch.equal, u, v)) for u, v in prev)
    finally:
        dist.destroy_process_group()


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
