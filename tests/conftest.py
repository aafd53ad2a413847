"""Tiny models built from transformers configs (hidden size <= 64), so tests run in seconds."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# transformers' model classes are imported where a tiny model is built, not here: a process that imports conftest
# (through a test module, as test_distributed's and _cuda_dist_worker's processes do) and builds no transformers
# model skips their import, a few seconds of every such process's start-up on 2 cores.

VOCAB = 64
# Tiny models are faster single-threaded, and xdist workers must not oversubscribe 2 cores.
torch.set_num_threads(1)


def can_build_cpp() -> bool:
    """g++ and ninja are here, so torch's load_inline can build MirrorConfig(kernel="fused")'s kernels."""
    import shutil

    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which("g++") is not None and is_ninja_available()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


# The attributes the first version's UnifiedController.__init__ set, which a controller pickled by any version holds
# (`_extra_params` under its first name, `extra_params`). Every attribute added since must get its value from
# `__setstate__` when a pickle lacks it: `unpickled_as_first_version` checks that.
FIRST_CONTROLLER_ATTRIBUTES = frozenset({
    "signal_config", "machine", "actuators", "mirror", "signal", "grad_stats", "adapters", "optimizer", "_hooks",
    "_base_lrs", "global_step", "loss_ema", "nonfinite_steps", "last_decision", "trace", "keep_trace", "writer",
    "log_every", "print_fn", "reduce_loss"})


def unpickled_as_first_version(ctrl, *others, first=FIRST_CONTROLLER_ATTRIBUTES):
    """A new controller `ctrl` (with `others`, pickled along: its model, its optimizer) through a pickle holding only
    the attributes in `first` of `vars(ctrl)`, as the first version pickled it, and back. Checks that the copy has
    every attribute `ctrl` has, each one added since with `ctrl`'s value, and returns (the copy, *others' copies)."""
    import pickle

    now = dict(vars(ctrl))
    later = set(now) - set(first) - {"_extra_params"}
    for name in later:
        delattr(ctrl, name)
    ctrl.__dict__["extra_params"] = ctrl.__dict__.pop("_extra_params")
    copies = pickle.loads(pickle.dumps((ctrl, *others)))
    ctrl.__dict__.update(now)  # (the original as it was; its own extra_params key dropped)
    ctrl.__dict__.pop("extra_params")
    got = copies[0]
    assert set(vars(got)) == set(now), f"not given back: {sorted(set(now) - set(vars(got)))}"
    # what a pickle cannot hold: the adapters' names (the keys of the dict `__init__` was given) are those of
    # adapters given as a list, and no modules own the extra parameters (the pickled ones are used)
    unknown = {"_adapter_names": [getattr(a, "name", f"adapter {i}") for i, a in enumerate(ctrl.adapters)],
               "_extra_owners": None}
    for name in sorted(later):
        want = unknown.get(name, now[name])
        assert vars(got)[name] == want, (name, vars(got)[name], want)
    assert [p.shape for p in got.extra_params] == [p.shape for p in now["_extra_params"]]
    return copies


class RunsCode:
    """Pickles as a call that writes `marker`: what a malicious state file carries. Unpickled with
    `torch.load(weights_only=False)`, the call runs; `weights_only=True` refuses it before it can."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def snapshot_then_train(snap, ps, opt, steps: int = 3):
    """Save `ps` (with `opt`'s moments) into `snap`, then move them with `steps` AdamW steps. Returns the
    weights and the first parameter's exp_avg as they were at the save."""
    snap.save(ps, optimizer=opt)
    w = [p.detach().clone() for p in ps]
    m = opt.state[ps[0]]["exp_avg"].clone()
    for _ in range(steps):
        sum((p ** 2).sum() for p in ps).backward()
        opt.step()
        opt.zero_grad()
    return w, m


def grads_after_in_place_ops(layer, x, res, y):
    """`y += res; y.relu_()` (in-place ops on a layer's output), then a backward of `y.square().sum()`: the gradients of
    x and of the layer's active blocks, cleared after (for comparing a nested layer's output with a plain reference)."""
    y += res
    y.relu_()
    y.square().sum().backward()
    got = [x.grad] + [p.grad for p in layer.active_parameters()]
    x.grad = None
    layer.zero_grad(set_to_none=True)
    return got


def quantized_linear(bnb, quant_type: str, device, in_f: int = 64, out_f: int = 48):
    """A bitsandbytes layer ("nf4"/"fp4": Linear4bit with a bf16 compute dtype; "int8": Linear8bitLt without fp16
    weights) holding a fresh `nn.Linear`'s weights, quantized by its move to `device`: (the layer, that Linear)."""
    import torch.nn as nn

    lin = nn.Linear(in_f, out_f)
    if quant_type == "int8":
        q = bnb.nn.Linear8bitLt(in_f, out_f, has_fp16_weights=False, threshold=0.0)
    else:
        q = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=torch.bfloat16, quant_type=quant_type)
    q.load_state_dict(lin.state_dict())
    return q.to(device), lin


def classification_batch(n: int = 32, seq: int = 12, seed: int = 0):
    """Learnable synthetic task: label = 1 iff token 7 occurs in the sequence."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(8, VOCAB, (n, seq), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(0, seq, (n,), generator=g)
    x[y == 1, pos[y == 1]] = 7
    return x, y


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


REPO = Path(__file__).resolve().parents[1]


def load_benchmark(rel: str):
    """A benchmark script (`benchmarks/<rel>`) as a module, with `benchmarks/` importable (its `_common`)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    path = REPO / "benchmarks" / rel
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 32) with the bundled MiniLM tokenizer, saved as an HF folder named `tiny_bert` (the
    quality harness records a model by its folder name)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from unified_lora.data import default_model_path

    d = tmp_path_factory.mktemp("tiny_bert") / "tiny_bert"
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(d)
    return d
