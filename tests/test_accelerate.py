"""A hand-written Hugging Face accelerate loop in one process (CPU): `accelerator.prepare` of the model, the
optimizer, the data and the scheduler, gradient accumulation with `accelerator.accumulate`, and
`accelerator.save_state` / `load_state` with the controller registered for checkpointing."""

import warnings

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from conftest import classification_batch, tiny_bert
from unified_lora import MirrorConfig, SignalConfig, setup_unified_lora

ACCUM, SHOCK = 2, range(2, 6)  # loss × 40 on these optimizer steps: the controller enters MIRROR


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate's state is one per process: a Trainer test before this one (on a GPU machine, say) would refuse
    Accelerator(cpu=True). Start from a fresh state, and leave a fresh one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _micro_batch(accelerator, model, ctrl, opt, xb, yb, step_loss: float, sched=None) -> float:
    """One micro-batch under accelerator.accumulate: the controller steps on the mean loss of an optimizer step's
    micro-batches (×40 on the SHOCK steps). Returns the running sum, reset after a sync step."""
    with accelerator.accumulate(model):
        loss = model(input_ids=xb, labels=yb).loss
        accelerator.backward(loss)
        step_loss += loss.item() / ACCUM
        if accelerator.sync_gradients:
            ctrl.step(loss=step_loss * (40.0 if ctrl.global_step in SHOCK else 1.0))
            step_loss = 0.0
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
    return step_loss


def _run(steps: int, save_dir=None, save_at=None, resume_from=None):
    """An accelerate loop with two param groups (the head at 10× the LR) under a LambdaLR warm-up. The
    controller steps once per optimizer step, on the mean loss of its micro-batches."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model = tiny_bert()
    _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                 signal=SignalConfig(kind="loss", alpha=0.5, beta=0.5), print_fn=None,
                                 mirror=MirrorConfig(policy="always", snapshot_optimizer=True))
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier")]
    opt = torch.optim.AdamW([{"params": rest, "lr": 1e-3}, {"params": head, "lr": 1e-2}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    x, y = classification_batch(4 * ACCUM * steps, seed=1)  # one epoch: no epoch boundary to resume across
    data = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    model, opt, data, sched = accelerator.prepare(model, opt, data, sched)
    ctrl.attach_optimizer(opt)
    accelerator.register_for_checkpointing(ctrl)
    if resume_from is not None:
        accelerator.load_state(resume_from)
        data = accelerator.skip_first_batches(data, ctrl.global_step * ACCUM)
    step_loss = 0.0
    for xb, yb in data:
        step_loss = _micro_batch(accelerator, model, ctrl, opt, xb, yb, step_loss, sched)
        if accelerator.sync_gradients and ctrl.global_step == save_at:
            accelerator.save_state(save_dir)
            accelerator.save_model(model, save_dir / "model")
        if ctrl.global_step == steps:
            break
    return model, ctrl


def test_save_state_in_mirror_resumes_bit_for_bit_and_save_model_keeps_every_tensor(tmp_path):
    """Mirror's first entry packs the snapshotted parameters into one buffer, and accelerate's safetensors
    writer (save_state, save_model) takes tensors that share a storage for one tied weight: it kept one of the
    26 trainable tensors, so load_state failed on missing keys and save_model's file lacked the adapter. The
    model's state_dict now gives packed parameters as copies of their own."""
    model, ctrl = _run(14, save_dir=tmp_path, save_at=6)
    assert [(r.step, r.snapshot) for r in ctrl.trace if r.snapshot] == [(3, "saved"), (10, "restored")]
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == 26 and trained <= set(saved)
    resumed_model, resumed = _run(14, resume_from=tmp_path)  # in MIRROR, its snapshot held; restored at step 10
    assert [(r.step, r.mode, r.phi, r.loss, r.lr, r.snapshot) for r in resumed.trace] == \
        [(r.step, r.mode, r.phi, r.loss, r.lr, r.snapshot) for r in ctrl.trace if r.step >= 6]
    a, b = model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("attach", ["prepared", "raw_before_prepare", "none"])
def test_ctrl_step_on_an_accumulation_micro_batch_is_refused(attach):
    """Called on every micro-batch of `accelerator.accumulate`, ctrl.step counted each one as an optimizer step
    (whose `optimizer.step()` accelerate skips): warm-up, dwell and eval_interval ran N times too fast, and the
    signal read one micro-batch's loss. With accelerate's optimizer attached it is refused, before anything is
    counted; the sync step goes on. With the torch optimizer attached before `prepare` (or none attached) only
    accelerate's process-wide gradient state can tell, which an Accelerator leaves behind (a later plain loop would
    be refused for nothing): the step is warned about, and counted."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_bert()
    _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], print_fn=None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if attach == "raw_before_prepare":
        ctrl.attach_optimizer(opt)
    x, y = classification_batch(8, seed=1)
    model, opt, data = accelerator.prepare(model, opt, DataLoader(TensorDataset(x, y), batch_size=4))
    if attach == "prepared":
        ctrl.attach_optimizer(opt)
    for i, (xb, yb) in enumerate(data):
        with accelerator.accumulate(model):
            loss = model(input_ids=xb, labels=yb).loss
            accelerator.backward(loss)
            if i == 0:
                assert not accelerator.sync_gradients
                if attach == "prepared":
                    with pytest.raises(ValueError, match="only when accelerator.sync_gradients is true"):
                        ctrl.step(loss=loss.item())
                    assert ctrl.global_step == 0 and ctrl.trace == [] and ctrl.loss_ema is None
                else:
                    with pytest.warns(UserWarning, match="gradient-accumulation micro-batch"):
                        ctrl.step(loss=loss.item())
            else:
                assert accelerator.sync_gradients
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # no warning on the sync step
                    ctrl.step(loss=loss.item())
            opt.step()
            opt.zero_grad()
    assert ctrl.global_step == (1 if attach == "prepared" else 2)


def test_a_plain_loop_after_an_accelerate_loop_that_stopped_on_a_micro_batch_is_not_refused():
    """accelerate's gradient state outlives its Accelerator: a loop stopped on a micro-batch leaves
    `sync_gradients` False. A later plain torch loop in the same process (no Accelerator) must train: it is at most
    warned about, never refused."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_bert()
    model, data = accelerator.prepare(model, DataLoader(TensorDataset(*classification_batch(16, seed=1)),
                                                        batch_size=4))
    for i, (xb, yb) in enumerate(data):
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=xb, labels=yb).loss)
        if i == 2:  # the third micro-batch: not a sync step
            break
    assert not accelerator.sync_gradients
    del accelerator
    plain = tiny_bert()
    _, ctrl = setup_unified_lora(plain, target_modules=["query", "value"], print_fn=None)
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    x, y = classification_batch(4, seed=2)
    for _ in range(2):
        plain(input_ids=x, labels=y).loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ctrl.step(loss=1.0)
        opt.step()
        opt.zero_grad()
    assert ctrl.global_step == 2


@pytest.fixture
def one_process_group():
    """A gloo group of one process: DDP wraps a model as under `accelerate launch`."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_injecting_after_ddp_wrapped_the_model_is_refused(one_process_group):
    """Under `accelerate launch`, `setup_unified_lora(accelerator.prepare(model), ...)` (inject after prepare)
    ran: DDP had taken its parameters when it wrapped the model, so the LoRA blocks were never all-reduced and two
    processes trained different adapters without an error (checked with 2 gloo processes: their lora_B sums
    differed after 3 steps). Injecting into the DDP model is refused now, leaving it as it was; `check_ddp` names
    trainable parameters added to the bare model after the wrap."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from unified_lora import NestedLoRALayer
    from unified_lora.distributed import check_ddp, ddp_kwargs

    model = tiny_bert()
    wrapped = DDP(model, **ddp_kwargs())
    with pytest.raises(ValueError, match="wrapped in DistributedDataParallel.*then wrap it"):
        setup_unified_lora(wrapped, target_modules=["query", "value"], print_fn=None)
    assert not any(isinstance(m, NestedLoRALayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())

    setup_unified_lora(model, target_modules=["query", "value"], print_fn=None)  # into the bare model, too late
    with pytest.raises(ValueError, match=r"24 trainable parameters were added after DDP wrapped the model "
                                         r"\(bert\.encoder\.layer\.0\.attention\.self\.query\.lora_A\.0"):
        check_ddp(wrapped)
    check_ddp(DDP(model, **ddp_kwargs()))  # the right order: wrapped after the injection


def _randomized(model, adapters, rank, seed=0):
    """Every block (paused ones too) random, then the layers at `rank`: a delta that depends on the rank."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.values():
            for p in layer.lora_parameters():
                p.normal_(0.0, 0.2, generator=g)
            layer.set_rank(rank)
    return model


def test_a_sharded_save_model_folder_loads_with_load_checkpoint_in_model_at_its_rank(tmp_path):
    """accelerate's `load_checkpoint_in_model` (what its docs pair with `accelerator.save_model`) loads through
    torch.distributed.checkpoint's `set_model_state_dict`, which passes a placeholder object as the `_extra_state` of
    every module whose key the loaded file lacks: each shard of a sharded folder lacks the other shards' ranks, and
    the layer's `int()` of the placeholder raised a TypeError (an AttributeError for a multi-task layer), so the
    folder did not load at all. So did a file without the ranks (saved before they were kept). The placeholder now
    leaves the rank alone, as a missing key does: the folder loads at the saved rank, with the same outputs."""
    from accelerate.utils import load_checkpoint_in_model
    from safetensors.torch import save_file

    from unified_lora import MULTI, MachineConfig, NestedLoRALayer
    from unified_lora.multitask import setup_multitask_lora, task_context

    accelerator = Accelerator(cpu=True)
    x = classification_batch(4, seed=2)[0]

    def single():
        model = tiny_bert()
        adapters, _ = setup_unified_lora(model, target_modules=["query", "value"], print_fn=None)
        return model, adapters

    def multi():
        model = tiny_bert()
        adapters, _ = setup_multitask_lora(model, ["a", "b"], ["query", "value", "classifier"], print_fn=None,
                                           machine=MachineConfig(initial_mode=MULTI))  # split: task adapters
        return model, adapters

    for build, rank, ctx in ((single, 4, [None]), (multi, 16, ["a", "b"])):
        trained = accelerator.prepare(_randomized(*build(), rank))
        out = tmp_path / build.__name__
        accelerator.save_model(trained, out, max_shard_size="20KB")
        assert len(list(out.glob("*.safetensors"))) > 2
        fresh, adapters = build()
        load_checkpoint_in_model(fresh, str(out))
        assert {layer.rank for layer in adapters.values()} == {rank}
        for task in ctx:
            with torch.no_grad(), task_context(trained, task) if task else torch.enable_grad(), \
                    task_context(fresh, task) if task else torch.enable_grad():
                assert torch.equal(fresh(input_ids=x).logits, trained(input_ids=x).logits)

    # a file without the ranks loads too, and leaves them as they are (as model.load_state_dict does)
    model, adapters = single()
    sd = {k: v for k, v in _randomized(*single(), 4).state_dict().items() if not k.endswith("_extra_state")}
    save_file(sd, str(tmp_path / "model.safetensors"))
    load_checkpoint_in_model(model, str(tmp_path / "model.safetensors"))
    assert {m.rank for m in model.modules() if isinstance(m, NestedLoRALayer)} == {8}
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items() if k in sd)


def test_with_a_device_map_the_model_loads_at_its_rank_through_load_state_dict_then_dispatch_model(tmp_path):
    """README: with a `device_map`, accelerate's `load_checkpoint_in_model` / `load_checkpoint_and_dispatch` set each
    saved tensor with `set_module_tensor_to_device`, which knows parameters and buffers only, and stop at the first
    layer's `_extra_state` (the rank). The recipe: `model.load_state_dict(load_file(path))`, then `dispatch_model`,
    gives the saved rank and outputs. (If accelerate learns extra state, the first check fails: update README.)"""
    from accelerate import dispatch_model, load_checkpoint_and_dispatch
    from accelerate.utils import infer_auto_device_map
    from safetensors.torch import save_model

    def single():
        model = tiny_bert()
        adapters, _ = setup_unified_lora(model, target_modules=["query", "value"], print_fn=None)
        return model, adapters

    trained = _randomized(*single(), 4).eval()
    save_model(trained, str(tmp_path / "model.safetensors"))
    fresh, adapters = single()
    with pytest.raises(ValueError, match="does not have a parameter or a buffer named _extra_state"):
        load_checkpoint_and_dispatch(fresh, str(tmp_path / "model.safetensors"), device_map="auto")
    fresh, adapters = single()
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    fresh = dispatch_model(fresh.eval(), device_map=infer_auto_device_map(fresh))
    assert {layer.rank for layer in adapters.values()} == {4}
    x = classification_batch(4, seed=2)[0]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, trained(input_ids=x).logits)


def _run_epochs(steps: int, per_epoch: int, save_dir=None, save_at=None, resume_from=None):
    """README's recipe for the data order: a shuffled DataLoader with no generator of its own, accelerate's seedable
    sampler with a data seed, `set_epoch` at each epoch, and on resume the epoch and the batches of it already
    trained, from `ctrl.global_step`. Gives the controller's trace and the model."""
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM, dataloader_config=DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=0))
    model = tiny_bert()
    _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                 signal=SignalConfig(kind="loss", alpha=0.5, beta=0.5), print_fn=None,
                                 mirror=MirrorConfig(policy="always", snapshot_optimizer=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = classification_batch(4 * ACCUM * per_epoch, seed=1)
    data = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    model, opt, data = accelerator.prepare(model, opt, data)
    ctrl.attach_optimizer(opt)
    accelerator.register_for_checkpointing(ctrl)
    start, done = 0, 0
    if resume_from is not None:
        accelerator.load_state(resume_from)
        start, done = divmod(ctrl.global_step, per_epoch)
    for epoch in range(start, steps):  # (enough epochs: each has a step)
        data.set_epoch(epoch)
        batches = accelerator.skip_first_batches(data, done * ACCUM) if epoch == start and done else data
        step_loss = 0.0
        for xb, yb in batches:
            step_loss = _micro_batch(accelerator, model, ctrl, opt, xb, yb, step_loss)
            if accelerator.sync_gradients and ctrl.global_step == save_at:
                accelerator.save_state(save_dir)
            if ctrl.global_step == steps:
                return model, ctrl


def test_the_readme_recipe_resumes_a_shuffled_multi_epoch_run_in_the_same_data_order(tmp_path):
    """With `shuffle=True` and no generator of the DataLoader's own, each epoch's order came from the global RNG when
    the epoch began, which `load_state` does not give back: `skip_first_batches` then skipped batches of another
    order, and the resumed run trained on other data (some samples twice, some never), its φ and weights apart
    from the step after the save. README's recipe (seedable sampler, data seed, `set_epoch`) resumes in the second
    of three epochs, in MIRROR with its snapshot, on the same data: the same trace and weights, bit for bit."""
    model, ctrl = _run_epochs(12, 4, save_dir=tmp_path, save_at=6)  # epoch 1, two of its four steps done
    assert [(r.step, r.snapshot) for r in ctrl.trace if r.snapshot] == [(3, "saved"), (10, "restored")]
    resumed_model, resumed = _run_epochs(12, 4, resume_from=tmp_path)
    assert [(r.step, r.mode, r.phi, r.loss, r.lr, r.snapshot) for r in resumed.trace] == \
        [(r.step, r.mode, r.phi, r.loss, r.lr, r.snapshot) for r in ctrl.trace if r.step >= 6]
    a, b = model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
