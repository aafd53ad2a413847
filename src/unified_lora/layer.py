"""The nested LoRA layer: one A/B pair at max_rank, active rank by prefix slices.

    y = base(x) + scaling(r) · dropout(x) @ A[:r]ᵀ @ B[:, :r]ᵀ

A (max_rank × in) and B (out × max_rank) are stored as *row/column blocks*, one
block per rank level: with levels (4, 8, 16), A is the blocks A[0:4], A[4:8],
A[8:16]. The active rank uses the first blocks, so r4 ⊂ r8 ⊂ r16 and switching
rank allocates nothing (the same Parameter objects stay in place).

Why blocks rather than slicing one tensor: a paused block never enters the
graph, so its `.grad` stays None and every torch optimizer skips it entirely -
no Adam momentum drift, no decoupled weight decay, no step-count change. Paused
dimensions come back bit-identical, which plain slicing cannot give.
"""

from __future__ import annotations

import contextlib
import math
import operator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import _fused
from .config import KERNELS, _scalar, check_rank_levels

try:  # transformers' Conv1D (GPT-2): weight is (in, out), y = x @ W + b
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


def scaling_for(rank: int, lora_alpha: float, max_rank: int, kind: str) -> float:
    if kind == "alpha_over_r":  # PEFT default
        return lora_alpha / rank
    if kind == "max_rank_over_r":  # the seed's rule
        return max_rank / rank
    if kind == "rslora":  # Kalajdzievski 2023, rank-stabilised LoRA
        return lora_alpha / math.sqrt(rank)
    if kind == "alpha_over_max_rank":  # one scale at every rank: a switch keeps the kept blocks' contribution
        return lora_alpha / max_rank
    raise ValueError(f"scaling: unknown kind {kind!r}")


class _NestedLoRAPath(torch.autograd.Function):
    """base_out + scaling · (h A_catᵀ) B_catᵀ with per-block gradients.

    Autograd through `torch.cat` would save both concatenations (r·(in+out)
    extra values per layer) that PEFT, holding one A/B tensor, does not keep.
    This saves only h and u = h A_catᵀ, as PEFT does, and re-concatenates in
    backward. The up-projection accumulates straight into the base output with
    one `addmm` (scaling as its alpha), and backward applies the scaling to the
    rank-sized products, so no tokens × out pass is spent on scaling or on the
    residual add. Under autocast it computes in the autocast dtype, like F.linear (which leaves fp64 alone: so do
    fp64 blocks here);
    a base output of another dtype (fp32 blocks on a bf16 base) gets the delta added in the wider dtype and
    rounded once (`_add_delta`).
    """

    @staticmethod
    def forward(ctx, base_out, h, scaling, k, *blocks):
        dev = h.device.type
        if torch.is_autocast_enabled(dev) and blocks[0].dtype is not torch.float64:  # autocast leaves fp64 alone
            dt = torch.get_autocast_dtype(dev)
            with torch.autocast(dev, enabled=False):
                h2, u, out = _path_forward(base_out, h, scaling, k, blocks, dt)
        else:  # no context manager on the common path: this Function's host time is per layer and call
            dt = blocks[0].dtype
            h2, u, out = _path_forward(base_out, h, scaling, k, blocks, dt)
        # h is saved as it is (as PEFT's Linear saves it): neither the copy a strided h's reshape makes nor a view
        # made here, which would have no graph to h, so a double backward (create_graph=True) would lose h's terms.
        # A cast h2 is a copy either way.
        ctx.save_for_backward(h2 if h2.dtype != h.dtype else h, u, *blocks)
        ctx.scaling, ctx.k, ctx.dt, ctx.h_shape = scaling, k, dt, h.shape
        return _unsafe_view(out, base_out.shape)

    @staticmethod
    def backward(ctx, gy):
        h2, u, *blocks = ctx.saved_tensors
        need = ctx.needs_input_grad
        dev = h2.device.type
        if torch.is_grad_enabled():  # create_graph=True (a double backward): these gradients are differentiated
            u = _double_backward_u(h2, need[1])
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                gh, gA, gB = _path_backward(gy, h2, u, blocks, ctx.k, ctx.dt, ctx.scaling, need[1])
        else:
            gh, gA, gB = _path_backward(gy, h2, u, blocks, ctx.k, ctx.dt, ctx.scaling, need[1])
        return gy if need[0] else None, None if gh is None else gh.view(ctx.h_shape), None, None, *gA, *gB


class _NestedLoRAPathFunc(torch.autograd.Function):
    """`_NestedLoRAPath` in the form torch.func transforms accept (grad, vmap, jacrev, functional per-sample
    gradients): forward takes no ctx, `setup_context` saves, and vmap runs forward and backward over the batch
    (`generate_vmap_rule`). It returns u as a second, non-differentiable output, since setup_context sees only
    inputs and outputs. The layer uses it only while functorch transforms are active (the extra output and call
    cost host time on every call); the arithmetic is the same helpers'. Forward-mode AD (jvp, jacfwd) is not
    defined for either Function: torch raises its own error there.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(base_out, h, scaling, k, *blocks):
        dev = h.device.type
        if torch.is_autocast_enabled(dev) and blocks[0].dtype is not torch.float64:
            with torch.autocast(dev, enabled=False):
                _, u, out = _path_forward(base_out, h, scaling, k, blocks, torch.get_autocast_dtype(dev))
        else:
            _, u, out = _path_forward(base_out, h, scaling, k, blocks, blocks[0].dtype)
        return _unsafe_view(out, base_out.shape), u

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, h, scaling, k, *blocks = inputs
        u = output[1]
        ctx.mark_non_differentiable(u)
        ctx.save_for_backward(h, u, *blocks)  # h as given: backward takes its rows
        ctx.scaling, ctx.k, ctx.dt, ctx.h_shape = scaling, k, u.dtype, h.shape

    @staticmethod
    def backward(ctx, gy, _gu):
        return _NestedLoRAPath.backward(ctx, gy)


# `Function.apply` is a Python classmethod that, outside functorch transforms, re-wraps the arguments and then calls
# the C++ apply it inherits. On a small layer that Python costs about 5 µs of a ~150 µs forward and backward (the
# `tiny` row of benchmarks/perf/layer.py), so the layer calls the C++ apply directly where that is all `apply` would
# do: not under functorch transforms (vmap, grad) and not while torch.compile traces (Dynamo recognises `apply`).
_c_apply = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get("apply")
_nested_apply = _c_apply.__get__(None, _NestedLoRAPath) if _c_apply is not None else _NestedLoRAPath.apply


_is_compiling = torch.compiler.is_compiling  # (one lookup: it runs on every forward)


def _traced() -> bool:
    """True while torch.compile traces or under functorch transforms (vmap, grad): there only the Python Function
    (through `Function.apply`) is traceable; the C++ kernel and the direct C++ apply are not."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _apply_nested_path(*args):
    if torch._C._are_functorch_transforms_active():
        return _NestedLoRAPathFunc.apply(*args)[0]
    if torch.compiler.is_compiling():
        return _NestedLoRAPath.apply(*args)
    return _nested_apply(*args)


# The output in the input's shape without a view: autograd marks a view returned by a custom Function, and an in-place
# op on it (`y += residual`, `nn.ReLU(inplace=True)`, which plain ops and the one-block path allow) raises. `out` is an
# intermediate nothing else holds, so `_unsafe_view` (as torch's own matmul returns its reshaped result) is safe.
_unsafe_view = torch.ops.aten._unsafe_view.default

# The two halves below run on every call of every adapted layer. Where the GEMMs take microseconds (a GPU), host
# time is most of a layer's time, so they make no helper calls and cast only what is not already in `dt`.


def _path_forward(base_out, h, scaling, k, blocks, dt):
    """(h as rows in dt, u = h A_catᵀ, base_out + scaling · u B_catᵀ as rows); autocast is off here."""
    A, B = torch.cat(blocks[:k], 0), torch.cat(blocks[k:], 1)
    h2 = h.reshape(-1, h.shape[-1])
    if A.dtype != dt or B.dtype != dt or h2.dtype != dt:
        A, B, h2 = A.to(dt), B.to(dt), h2.to(dt)
    u = h2.mm(A.t())
    base2 = base_out.reshape(-1, base_out.shape[-1])
    if base_out.dtype == dt:
        out = torch.addmm(base2, u, B.t(), alpha=scaling)
    else:
        out = _add_delta(base2, u, B.t(), scaling)
    return h2, u, out


def _add_delta(base2, u, Bt, scaling):
    """base2 + scaling · u Btᵀ for a base output of another dtype than u's, summed in the wider of the two and
    rounded once to base2's dtype, as PEFT's `(result + lora_B(lora_A(x)) * scaling).to(result.dtype)`: fp32
    adapters on a bf16 base add their delta to the base output in fp32 (a delta rounded to bf16 and then added in
    bf16 would be rounded twice)."""
    if torch.promote_types(base2.dtype, u.dtype) == u.dtype:
        return torch.addmm(base2.to(u.dtype), u, Bt, alpha=scaling).to(base2.dtype)
    return base2 + (torch.mm(u, Bt) * scaling).to(base2.dtype)  # a wider base (fp64 under autocast): exact upcast


def _double_backward_u(h, need_h: bool):
    """The u a differentiable backward uses: None, so `_path_backward` recomputes it from h and A with its graph
    (forward ran without grad, so the saved u has none and d(grad B)/dA would be lost silently). An h cast inside
    the Function (autocast, or blocks of another dtype) was saved as a copy without a graph to the input, so the
    input's second-order terms cannot be formed: that is an error rather than a wrong gradient."""
    if need_h and not h.requires_grad:
        raise RuntimeError(
            "NestedLoRALayer: a double backward (create_graph=True) through two or more active blocks needs the "
            "input in the adapters' dtype without autocast; this input was cast inside the layer (autocast, or "
            "blocks of another dtype), so its second-order terms are not available. Run that backward without "
            "autocast, or at the lowest rank (one block runs as plain torch ops)")
    return None


def _path_backward(gy, h2, u, blocks, k, dt, scaling, need_h):
    """(grad h as rows, grads of the A blocks, grads of the B blocks); u is rows (None: recompute it, with its
    graph, for a double backward), h2 the input as saved (cast here) or its cast copy; autocast is off here."""
    A, B = torch.cat(blocks[:k], 0), torch.cat(blocks[k:], 1)
    g2 = gy.reshape(-1, gy.shape[-1])
    if h2.dim() != 2:  # the input, saved as it was (see forward)
        h2 = h2.reshape(-1, h2.shape[-1])
    if A.dtype != dt or B.dtype != dt or g2.dtype != dt or h2.dtype != dt:  # h2: torch.func's Function saves h
        A, B, g2, h2 = A.to(dt), B.to(dt), g2.to(dt), h2.to(dt)
    if u is None:
        u = h2.mm(A.t())
    gu = g2.mm(B).mul_(scaling)  # tokens × r
    gA = gu.t().mm(h2)  # r × in
    gB = g2.t().mm(u).mul_(scaling)  # out × r
    gh = gu.mm(A) if need_h else None
    sizes = [a.shape[0] for a in blocks[:k]]
    # split_with_sizes: the C++ method, without Tensor.split's Python wrapper (host time counts on small layers)
    # A block of another dtype gets its gradient cast by the autograd engine, which casts every gradient a
    # Function returns to its input's dtype.
    return gh, gA.split_with_sizes(sizes, 0), gB.split_with_sizes(sizes, 1)


def blocks_of(plist) -> list:
    """The parameters of a ParameterList (or any sequence) as a plain list. Slicing an
    nn.ParameterList builds a new module on every call; this reads the values."""
    return list(plist._parameters.values()) if isinstance(plist, nn.ParameterList) else list(plist)


def _dcp_placeholder(value) -> bool:
    """The object `torch.distributed.checkpoint.state_dict.set_model_state_dict` puts under `<module>._extra_state`
    for a module whose extra state the loaded state dict lacks: no state, not a value to set."""
    t = type(value)
    return t.__name__ == "_EXTRA_STATE" and t.__module__.startswith("torch.distributed.checkpoint")


def _as(t, dtype):
    """t in `dtype`; no call at all when it already is (each .to costs host time on small layers)."""
    return t if t.dtype == dtype else t.to(dtype)


_ON_META = (
    "NestedLoRALayer: the LoRA blocks are still on the meta device (the layers were injected into a model built "
    "with accelerate.init_empty_weights() or on torch.device('meta')), so they hold no values. Load the base model "
    "first (from_pretrained, or load_checkpoint_and_dispatch) and inject after; or materialise the injected "
    "model with model.to_empty(device=...), which initialises the blocks again (B = 0), and then load the base "
    "weights into it")


# Activation checkpointing runs a layer's forward again inside loss.backward(), at the layer's rank *then*: after a
# set_rank between the forward and its backward, the recomputed graph is the new rank's, and its gradients (of the
# other rank's blocks, at the other scaling, against the old rank's output) would be mixed silently (reentrant
# checkpointing) or refused with torch's note on mismatched saved tensors (non-reentrant).
_RECOMPUTED_AT_ANOTHER_RANK = (
    "NestedLoRALayer: this forward is recomputed inside backward (activation checkpointing) at rank {1}, but the "
    "forward it replays ran at rank {0}: set_rank was called between a forward and its backward, and the recomputed "
    "gradients would belong to rank {1}, not to the rank that gave the loss. Call loss.backward() before changing the "
    "rank (ctrl.step runs after backward), or set rank {0} back until the backward is done")


def _execution_device(base_layer: nn.Module) -> torch.device:
    """Where the LoRA blocks of `base_layer` live: its weight's device, or, for a weight that accelerate has
    offloaded (`device_map` with "cpu"/"disk" entries: the weight is on meta and an `AlignDevicesHook` brings it in
    for each forward), the hook's execution device, where the forward runs."""
    dev = base_layer.weight.device
    if dev.type == "meta":
        hook = getattr(base_layer, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or (hook,):  # accelerate's SequentialHook holds several
            run_on = getattr(h, "execution_device", None)
            if run_on is not None:
                return torch.device(run_on) if not isinstance(run_on, int) else torch.device("cuda", run_on)
    return dev


def _computed_weight(base_layer: nn.Module) -> str:
    """What computes `base_layer.weight` at each forward ("" when it is a stored parameter): a
    torch.nn.utils.parametrize parametrization (parametrizations.weight_norm, spectral_norm, orthogonal) or one of
    torch's old weight_norm / spectral_norm forward pre-hooks. Writing into such a weight changes nothing."""
    if parametrize.is_parametrized(base_layer, "weight"):
        return "a torch.nn.utils.parametrize parametrization"
    for hook in base_layer._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == "weight":
            return f"torch.nn.utils.{'weight_norm' if isinstance(hook, WeightNorm) else 'spectral_norm'}"
    return ""


_MERGE_IN_FULL_PRECISION = (
    "Run the model unmerged (each forward adds the delta to the quantized base's output), or merge in full precision: "
    "unified_lora.peft_io.export_peft_adapter(model, None, adapter_dir), load the base model again in bf16 or fp32 "
    "(from_pretrained without quantization_config), import_peft_adapter(base, adapter_dir), then "
    "merge_and_unload(base)")


def packed_weight(base_layer: nn.Module) -> str:
    """What stores `base_layer.weight` as packed integers ("" for a float weight): a bitsandbytes `Linear4bit`
    (a uint8 `Params4bit` of shape [N, 1], 4-bit codes with a quant state) or `Linear8bitLt` (an int8
    `Int8Params` with its scales), the QLoRA base layers. Such a layer computes its own output from the packed
    weight; the LoRA blocks take their shape from its `in_features`/`out_features` and are fp32, and a delta
    cannot be folded into it exactly (`check_mergeable`). A 4-bit weight is packed whatever its storage dtype:
    `bnb_4bit_quant_storage=torch.bfloat16` (FSDP-QLoRA) stores the codes as a [N, 1] bf16 tensor, which read as a
    float weight gave bf16 blocks, a merge that failed on shapes, and the setup probe's eval forward that repacked
    the weight for bitsandbytes' CPU inference kernel (wrong gradients after). A `Params4bit` not quantized yet (a
    Linear4bit built on the CPU holds its float weight until its first `.to(device)`/`.cuda()`) counts as packed
    too: the move packs it, and its forward cannot run before (the setup probe's failed, which refused the layer
    as "not a linear map" and left it out of "all-linear" silently)."""
    w = base_layer.weight
    if (w.is_floating_point() or w.is_complex()) and not hasattr(w, "bnb_quantized"):
        return ""
    return f"{type(base_layer).__name__} ({type(w).__name__}, packed {w.dtype})"


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """The dtype of the LoRA blocks on a base weight of `base_dtype`: fp32 for a float narrower than fp32 (bf16,
    fp16, fp8) when `autocast_adapter_dtype`, as PEFT's `get_peft_model(..., autocast_adapter_dtype=True)` upcasts
    its adapters; otherwise (and for fp32 and fp64 bases) the base's own dtype."""
    if autocast_adapter_dtype and base_dtype.is_floating_point and torch.finfo(base_dtype).bits < 32:
        return torch.float32
    return base_dtype


class NestedLoRALayer(nn.Module):
    """Wraps a frozen `nn.Linear` or transformers `Conv1D` with a nested LoRA pair.

    `kernel` ("python" or "cpp") picks how two or more active blocks run: `_NestedLoRAPath`, or the same
    computation as a C++ autograd Function (`csrc/nested_path.cpp`); see `NestedLoRAConfig`.
    `autocast_adapter_dtype`: True makes the blocks fp32 on a bf16/fp16 base (`adapter_dtype`), as
    `inject_nested_lora` does by default (`NestedLoRAConfig.autocast_adapter_dtype`); a layer built directly keeps
    the base's dtype by default, as PEFT's own LoRA layer does before `get_peft_model` upcasts it. Either way the
    output has the base output's dtype.
    """

    kernel = "python"  # class default: layers pickled whole before the option existed still load and run
    _premerge = None  # the base weight as it was before `merge` (bf16/fp16 only); the class default, as above
    # Read by transformers' `save_pretrained` (only the keys, as name patterns), which refuses two state-dict entries
    # on one storage unless one of them is declared tied: a base weight tied to another module's (a targeted
    # `lm_head` and GPT-2's `transformer.wte`) is then left out of the file as `lm_head.weight` is for the bare
    # model, and the other entry keeps the values. An untied base weight shares no storage, so this does not apply.
    _tied_weights_keys = {"base_layer.weight": "base_layer.weight"}

    def __init__(
        self,
        base_layer: nn.Module,
        rank_levels=(4, 8, 16),
        max_rank: int | None = None,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        scaling: str = "alpha_over_r",
        initial_rank: int | None = None,
        kernel: str = "python",
        autocast_adapter_dtype: bool = False,
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel: must be one of {KERNELS}, got {kernel!r}")
        if kernel == "cpp":
            _fused.layer_kernels()  # build (or load) it now, so a missing compiler fails here and not mid-step
        self.kernel = kernel
        if isinstance(base_layer, nn.Linear):
            self.fan_in_fan_out = False
            in_f, out_f = base_layer.in_features, base_layer.out_features
        elif Conv1D and isinstance(base_layer, Conv1D):
            self.fan_in_fan_out = True
            in_f, out_f = base_layer.weight.shape
        else:
            raise TypeError(f"NestedLoRALayer wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        # as NestedLoRAConfig checks it: max_rank=24.5 was truncated to 24 (a block boundary at 24), and 0 read as None
        max_rank = None if max_rank is None else _scalar("max_rank", max_rank, int)
        levels = check_rank_levels(rank_levels, max_rank)
        max_rank = levels[-1] if max_rank is None else max_rank
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.max_rank = max_rank
        self.lora_alpha = float(lora_alpha)
        # as NestedLoRAConfig checks them (a layer built directly took lora_dropout=-0.1 as "no dropout", silently)
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha: must be a positive finite number, got {lora_alpha}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {lora_dropout}")
        self.scaling_kind = scaling
        scaling_for(levels[0], lora_alpha, max_rank, scaling)  # validate the kind early
        # Block boundaries: every level, plus max_rank when it exceeds the top level.
        self.boundaries = tuple(sorted(set(levels) | {max_rank}))
        self.rank_levels = levels
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

        w = base_layer.weight
        # fp32 blocks on a quantized base (4-bit/8-bit integers), whatever autocast_adapter_dtype, as PEFT's bnb
        # LoRA layers make them; its compute dtype (bf16) gets the delta added in fp32 and rounded once
        dt = adapter_dtype(w.dtype, autocast_adapter_dtype) if not packed_weight(base_layer) else torch.float32
        dev = _execution_device(base_layer)
        starts = (0,) + self.boundaries[:-1]
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.empty(e - s, in_f, dtype=dt, device=dev)) for s, e in zip(starts, self.boundaries))
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.empty(out_f, e - s, dtype=dt, device=dev)) for s, e in zip(starts, self.boundaries))
        self.merged_rank = 0  # rank currently folded into the base weight (0 = not merged)
        self.reset_parameters()
        # Every parameter of the base layer, not `.weight`/`.bias`: under a parametrization or torch's old
        # weight_norm/spectral_norm hooks `.weight` is computed from other parameters (a non-leaf, which
        # requires_grad_ refuses), and those parameters are what must stay frozen.
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.rank = 0
        self.set_rank(initial_rank if initial_rank is not None else levels[min(1, len(levels) - 1)])
        # The state dict holds the base weight unmerged, merged or not (see `_load_from_state_dict`).
        self._register_state_dict_hook(_unmerged_base_in_state_dict)  # (the public name came in torch 2.5)
        self.register_load_state_dict_post_hook(_merge_again_after_load)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every block (active and paused) as construction does: A drawn with kaiming_uniform(a=√5) over
        all max_rank rows in the base weight's dtype, then cast to the blocks' dtype; B = 0, so the delta is 0
        (PEFT's `reset_lora_parameters`). The base layer is left alone. A layer built on the meta device and then
        materialised with `to_empty` (its own or an enclosing module's) runs this by itself: `to_empty` leaves
        uninitialised memory, and a B of garbage would train from a random, possibly non-finite, delta."""
        if self.merged_rank:
            raise ValueError("reset_parameters: the layer is merged into its base weight; unmerge it first "
                             "(unmerge_adapters(model)), so that the base weight keeps no delta of the old blocks")
        A0, w = self.lora_A[0], self.base_layer.weight
        draw = w.dtype if w.dtype.is_floating_point and not packed_weight(self.base_layer) else A0.dtype
        A = torch.empty(self.max_rank, self.in_features, dtype=draw, device=A0.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as PEFT / loralib: delta starts at 0 via B = 0
        A = _as(A, A0.dtype)  # drawn in the base's dtype, then upcast, as PEFT's get_peft_model does
        starts = (0,) + self.boundaries[:-1]
        for a, b, s, e in zip(blocks_of(self.lora_A), blocks_of(self.lora_B), starts, self.boundaries):
            a.copy_(A[s:e])
            b.zero_()

    def _apply(self, fn, recurse=True):
        """`to_empty` from the meta device gives the blocks uninitialised memory: they are initialised again
        (`reset_parameters`). Moving a meta tensor any other way raises in torch, so this is the only way out."""
        was_meta = self.lora_A[0].is_meta
        out = super()._apply(fn, recurse)
        if was_meta and not self.lora_A[0].is_meta and not self.lora_B[0].is_meta:
            self.merged_rank = 0  # (a merged meta layer has no delta anywhere either)
            self.reset_parameters()
        return out

    # The base layer's weight and bias, as PEFT's LoRA layers give them: model code reads them off the module it
    # calls (T5's feed-forward casts its input to `self.wo.weight.dtype`, GPT-Neo's attention reads
    # `self.q_proj.weight.dtype`), and a wrapped layer without them raised AttributeError in the forward. Code that
    # computes with the weight instead of calling the layer would leave the delta out: `model.watch_direct_weight_use`
    # makes that an error.
    @property
    def weight(self) -> torch.Tensor:
        watch = self.__dict__.get("_weight_watch")  # [reads, calls] inside a parent forward that may bypass this layer
        if watch is not None:
            watch[0] += 1
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __setattr__(self, name, value) -> None:
        # ... and set them there: transformers' `tie_weights` ties a targeted `lm_head` by `lm_head.weight = <the
        # embedding>`, which nn.Module would refuse beside the property ("attribute 'weight' already exists")
        if name in ("weight", "bias") and "base_layer" in self._modules:
            setattr(self._modules["base_layer"], name, value)
        else:
            super().__setattr__(name, value)

    @torch.no_grad()
    def _resize_out(self, base_layer: nn.Module) -> None:
        """Put `base_layer` (this layer's base, resized to another number of outputs: transformers'
        `resize_token_embeddings` of a targeted output layer, `model._resize_token_embeddings_of_wrapped_head`) in
        place and give every B block (the task adapters' too) as many rows: the kept rows keep their values, new
        rows are 0, so the outputs of the kept rows are unchanged and the new ones start with no delta. A is left as
        it is. Each block stays the same Parameter (its values replaced), so an optimizer that holds it still does;
        its moments, if it has stepped, have the old shape, so the optimizer is to be built again."""
        self._modules["base_layer"] = base_layer
        w = base_layer.weight
        out = w.shape[1] if self.fan_in_fan_out else w.shape[0]
        if out == self.out_features:
            return
        for name, p in self.named_parameters():
            if name.startswith("base_layer.") or ".lora_B." not in "." + name:
                continue
            grown = p.new_zeros(out, p.shape[1])
            keep = min(out, p.shape[0])
            grown[:keep] = p[:keep]
            # a graph built before (the last step's loss, still referenced) keeps p's gradient accumulator alive,
            # with p's old shape: the next backward reused it and failed ("invalid gradient ... got [70, 4] but
            # expected shape compatible with [64, 4]"). torch drops it where `.data` changes dtype, not shape.
            p.data = grown.new_empty(0, dtype=torch.float64 if grown.dtype != torch.float64 else torch.float32)
            p.data = grown
            p.grad = None
        self.out_features = out

    # -- rank -----------------------------------------------------------------
    @property
    def n_active_blocks(self) -> int:
        return self.boundaries.index(self.rank) + 1

    @property
    def scaling(self) -> float:
        return scaling_for(self.rank, self.lora_alpha, self.max_rank, self.scaling_kind)

    def set_rank(self, rank: int) -> None:
        """Activate the prefix of size `rank`. Paused blocks get `.grad = None` so
        that the optimizer step that follows leaves them (and their moments) alone."""
        rank = self._level(rank)
        if rank == self.rank:
            return
        remerge = self.merged_rank
        if remerge:
            self.unmerge()
        self.rank = rank
        for i in range(self.n_active_blocks, len(self.boundaries)):
            self.lora_A[i].grad = None
            self.lora_B[i].grad = None
        if remerge:
            self.merge()

    def _level(self, rank) -> int:
        """`rank` as an int that is one of the block boundaries, else a ValueError (8.7 was truncated to 8, and
        delta_weight(rank=5) failed inside with "tuple.index(x): x not in tuple")."""
        try:
            r = operator.index(rank)  # int, numpy int, a 0-d integer tensor
        except TypeError:
            r = int(rank) if isinstance(rank, float) and rank.is_integer() else None
        if r is None or isinstance(rank, bool) or r not in self.boundaries:
            raise ValueError(f"rank: {rank!r} is not a nested level of this layer; choose one of {self.boundaries}")
        return r

    def active_A(self) -> torch.Tensor:
        k = self.n_active_blocks
        return self.lora_A[0] if k == 1 else torch.cat(blocks_of(self.lora_A)[:k], 0)

    def active_B(self) -> torch.Tensor:
        k = self.n_active_blocks
        return self.lora_B[0] if k == 1 else torch.cat(blocks_of(self.lora_B)[:k], 1)

    def full_A(self) -> torch.Tensor:
        return torch.cat(list(self.lora_A), 0)

    def full_B(self) -> torch.Tensor:
        return torch.cat(list(self.lora_B), 1)

    def first_block_grad(self) -> torch.Tensor | None:
        """The gradient of A's block 0, which is active at every rank (read without building a list)."""
        p = next(iter(self._modules["lora_A"]._parameters.values()), None)  # (no Module.__getattr__ on this path)
        return None if p is None else p.grad

    def active_parameters(self) -> list[nn.Parameter]:
        k = self.n_active_blocks
        return blocks_of(self.lora_A)[:k] + blocks_of(self.lora_B)[:k]

    def lora_parameters(self) -> list[nn.Parameter]:
        return list(self.lora_A) + list(self.lora_B)

    @torch.no_grad()
    def load_full(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy a (r × in) A and (out × r) B into the first r dims (r a boundary);
        dims above r are zeroed in B so the delta is exactly B[:, :r] A[:r]."""
        r = A.shape[0]
        if r not in self.boundaries or B.shape != (self.out_features, r) or A.shape[1] != self.in_features:
            raise ValueError(
                f"load_full: got A {tuple(A.shape)}, B {tuple(B.shape)}; need A (r × {self.in_features}), "
                f"B ({self.out_features} × r) with r in {self.boundaries}"
            )
        starts = (0,) + self.boundaries[:-1]
        for i, (s, e) in enumerate(zip(starts, self.boundaries)):
            if e <= r:
                self.lora_A[i].copy_(A[s:e])
                self.lora_B[i].copy_(B[:, s:e])
            else:
                self.lora_B[i].zero_()

    # -- forward / merge ------------------------------------------------------
    def delta_weight(self, rank: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """scaling · B[:, :r] A[:r], shaped like a Linear weight (out × in); computed in `dtype` (default: the
        blocks' own)."""
        old = self.rank
        if rank is not None:
            self.rank = self._level(rank)  # (the scaling follows the rank)
        try:
            B, A = self.active_B(), self.active_A()
            if dtype is not None:
                B, A = _as(B, dtype), _as(A, dtype)
            return self.scaling * (B @ A)
        finally:
            self.rank = old

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Submodules read from _modules: each `self.lora_A`-style read goes through nn.Module.__getattr__ (~0.8 µs
        # a read, four a call), which counts where a layer's time is host time (benchmarks/perf/layer.py's tiny row).
        mods = self._modules
        if _is_compiling():
            pass  # dynamo cannot trace the graph-task query inside a model's frame: one graph break per layer
        elif torch._C._current_graph_task_id() == -1:  # not inside a backward: the rank a recompute must replay
            self.__dict__["_forward_rank"] = self.rank
        elif self.rank != self.__dict__.get("_forward_rank", self.rank):
            raise RuntimeError(_RECOMPUTED_AT_ANOTHER_RANK.format(self.__dict__["_forward_rank"], self.rank))
        result = mods["base_layer"](x, *args, **kwargs)
        if self.merged_rank:
            return result
        k = self.n_active_blocks
        A, B = blocks_of(mods["lora_A"]), blocks_of(mods["lora_B"])
        if A[0].is_meta and not x.is_meta:
            raise RuntimeError(_ON_META)
        h, drop = _as(x, A[0].dtype), mods["lora_dropout"]
        if type(drop) is not nn.Identity:  # no module call for no dropout (host time, as above)
            h = drop(h)
        if k > 1:
            # kernel="cpp" runs the C++ Function except where it cannot be traced (torch.compile, functorch): there
            # the Python Function, bit-identical to it, stands in, so a compiled model has no graph break here.
            if self.kernel == "cpp" and not _traced():
                return _fused.layer_kernels().nested_path(result, h, self.scaling, k, A[:k] + B[:k])
            return _apply_nested_path(result, h, self.scaling, k, *A[:k], *B[:k])
        # One active block (the lowest level): plain ops, so autograd runs in C++ with no Python
        # Function; it saves h and u as the custom path does, and what PEFT saves.
        out2 = result.reshape(-1, result.shape[-1])
        u = h.reshape(-1, h.shape[-1]) @ A[0].T
        if out2.dtype == u.dtype:
            return torch.addmm(out2, u, B[0].T, alpha=self.scaling).view(result.shape)
        return _add_delta(out2, u, B[0].T, self.scaling).view(result.shape)

    def _folded(self, w: torch.Tensor, rank: int, sign: int) -> torch.Tensor:
        """w ± the delta at `rank` (w shaped like the base weight), summed in fp32 (fp64 for an fp64 weight) and
        rounded once to w's dtype: a delta formed and added in bf16 would be rounded three times. Autocast is off:
        under it the fp32 matmul would run in bf16, and a merge under autocast would fold a rounded delta that an
        unmerge outside it does not take away exactly."""
        acc = torch.promote_types(w.dtype, torch.float32)
        dev = w.device.type
        off = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
        with torch.autocast(dev, enabled=False) if off else contextlib.nullcontext():
            d = NestedLoRALayer.delta_weight(self, rank, acc)  # the shared blocks' delta (a task layer's too)
        d = d.T if self.fan_in_fan_out else d
        return (w.to(acc) + d if sign > 0 else w.to(acc) - d).to(w.dtype)

    def check_mergeable(self) -> None:
        """Raise a ValueError if the delta cannot be folded into the base weight: a weight computed at each forward
        (a parametrization, torch's old weight_norm/spectral_norm), where the fold would be recomputed away and the
        merged layer would silently run without its delta; a quantized weight (`packed_weight`: bitsandbytes 4-bit
        or 8-bit), whose packed integers `_folded` cannot add to; or a weight that accelerate offloaded (on meta,
        its values brought in by a hook for each forward only) while the blocks hold values."""
        computed = _computed_weight(self.base_layer)
        if computed:
            raise ValueError(
                f"merge: this layer's base weight is computed at each forward by {computed}, so a delta folded into "
                "it would be recomputed away and the merged layer would run without it. Run the model unmerged "
                "(each forward adds the delta), or make the weight a plain one first "
                "(torch.nn.utils.parametrize.remove_parametrizations(layer.base_layer, 'weight'), "
                "torch.nn.utils.remove_weight_norm or remove_spectral_norm) and then merge")
        packed = packed_weight(self.base_layer)
        if packed:
            raise ValueError(
                f"merge: this layer's base weight is quantized ({packed}), so a delta cannot be folded into it: it "
                "would be dequantized, summed and quantized again, which rounds every weight of the layer, not only "
                "the delta. " + _MERGE_IN_FULL_PRECISION)
        if getattr(getattr(self.base_layer, "state", None), "has_fp16_weights", False) \
                and hasattr(self.base_layer, "init_8bit_state"):
            # bitsandbytes' Linear8bitLt with llm_int8_has_fp16_weight=True: a float weight, but the forward runs on
            # an int8 copy (state.CB) that eval mode keeps from its first forward: a merged model then ran without
            # its deltas, silently (its outputs were the base model's)
            raise ValueError(
                "merge: this layer's base weight is quantized to int8 for its forward (bitsandbytes Linear8bitLt "
                "with has_fp16_weights=True, llm_int8_has_fp16_weight=True), from a copy that eval mode keeps from "
                "its first forward, so a delta folded into the weight would not reach the outputs. "
                + _MERGE_IN_FULL_PRECISION)
        if self.base_layer.weight.is_meta and not self.lora_A[0].is_meta:
            raise ValueError(
                "merge: this layer's base weight is on the meta device while its LoRA blocks hold values: accelerate "
                "offloaded it (a device_map entry of \"cpu\" or \"disk\"), and brings its values in for each forward "
                "only, so the delta cannot be folded into it. Run the model unmerged (each forward adds the delta), "
                "or load the base model without offloading, move the adapters there (export_peft_adapter / "
                "import_peft_adapter) and merge that model")

    @torch.no_grad()
    def merge(self, keep_base: bool = True) -> None:
        """Fold the active delta into the base weight (for inference), in place: a base weight tied to another
        module's parameter changes there too (`merge_adapters` refuses that; `merge_and_unload` unties it).

        A base weight narrower than fp32 (bf16, fp16) is kept as it was (one copy of it; `keep_base=False` keeps
        none), so that `unmerge` puts it back bit for bit: subtracting the delta again would round it off (in bf16
        about one element in ten moves by an ulp per merge and unmerge, and a re-rank while merged repeats it)."""
        if self.merged_rank:
            return
        self.check_mergeable()
        w = self.base_layer.weight
        keep = keep_base and w.is_floating_point() and torch.finfo(w.dtype).bits < 32
        self._premerge = w.detach().clone() if keep else None
        w.data.copy_(self._folded(w.detach(), self.rank, +1))
        self.merged_rank = self.rank

    @torch.no_grad()
    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight without the merged delta (a new tensor; the layer is unchanged): the weight kept by
        `merge`, in the base weight's dtype and on its device, when the base weight is still exactly what merging
        it gave, cast and moved as the base weight was since (`model.float()`, `.half()`, `.to(device)` after a
        merge; the blocks unchanged), else by subtraction (which, after such a cast, used to leave the bf16
        rounding of the merge in the base weight and in the saved state dict)."""
        w, kept = self.base_layer.weight.detach(), self._premerge
        if kept is not None and kept.shape == w.shape:
            kept = kept.to(w.device)
            if torch.equal(w, self._folded(kept, self.merged_rank, +1).to(w.dtype)):
                return kept.to(w.dtype, copy=True)
        return self._folded(w, self.merged_rank, -1)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged delta out of the base weight (see `_unmerged_weight`)."""
        if not self.merged_rank:
            return
        self.base_layer.weight.data.copy_(self._unmerged_weight())
        self._premerge = None
        self.merged_rank = 0

    def get_extra_state(self) -> torch.Tensor:
        """The active rank, saved in the state dict beside the blocks (`<layer>._extra_state`, a 0-d int64 tensor,
        which safetensors and `save_pretrained` store as they store the weights): without it, a model saved at rank
        4 with trained blocks 5..16 reloaded into a freshly wrapped model at its initial rank and gave other outputs,
        silently."""
        return torch.tensor(self.rank)

    def set_extra_state(self, state) -> None:
        self.set_rank(int(state))

    def _saved_rank(self, state: torch.Tensor):
        """The rank an `_extra_state` tensor holds; a ValueError saying why if this layer cannot read it."""
        if state.ndim != 0:
            raise ValueError("saved by a multi-task layer (its rank and task router); load it into a model built with "
                             "inject_multitask_lora / setup_multitask_lora")
        return state.item()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A merged layer unmerges before its weights load, and merges the loaded delta again after (a post hook):
        the state dict holds the base weight unmerged, whether the layer was merged when it was saved or not, so
        it loads as it is into a fresh layer; and loaded A/B blocks never meet a base weight that holds the old
        delta, which the next unmerge would leave behind (taking away the new delta instead). The saved rank
        (`get_extra_state`) is set after the blocks load; a state dict saved before the rank was kept in it (or one
        of lora_A/lora_B keys only) loads with `strict=True` and leaves the rank as it is. So does one that
        `torch.distributed.checkpoint`'s `set_model_state_dict` fills in: for a key its state dict lacks (accelerate's
        `load_checkpoint_in_model` of a sharded `save_model` folder loads one shard at a time, each without the
        other shards' ranks) it passes a placeholder object, whose `int()` raised a TypeError."""
        key = prefix + torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
        saved, unusable = state_dict.get(key), False
        if torch.is_tensor(saved):  # a rank this layer has no level for is an error of the load, listed with the
            # other mismatches (set_rank raised it from inside the load, naming no key)
            try:
                r = self._saved_rank(saved)
                if r not in self.boundaries:
                    raise ValueError(f"saved at rank {r:g}, which is not a nested level of this layer "
                                     f"{self.boundaries}; build the model with the rank_levels and max_rank it was "
                                     "saved with")
            except ValueError as e:
                error_msgs.append(f"{key}: {e}")
                unusable = True
        if unusable or (key in state_dict and _dcp_placeholder(saved)):  # (a placeholder: no rank, left as it is)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        if self.merged_rank and any(k.startswith(prefix) for k in state_dict):
            self._merge_after_load = self.merged_rank
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, levels={self.boundaries}, "
            f"scaling={self.scaling_kind}({self.scaling:g}), merged={bool(self.merged_rank)}"
            + (f", kernel={self.kernel}" if self.kernel != "python" else "")
        )


def _unmerged_base_in_state_dict(layer: NestedLoRALayer, state_dict, prefix, local_metadata) -> None:
    """state_dict post hook: a merged layer's base weight is saved without its delta (what `unmerge` gives), as
    the A/B blocks are saved beside it; a fresh layer would otherwise add the delta a second time. A Parameter
    (`keep_vars=True`, which asks for the live variables) is left as it is."""
    key = prefix + "base_layer.weight"
    w = state_dict.get(key)
    if layer.merged_rank and w is not None and not isinstance(w, nn.Parameter):
        state_dict[key] = layer._unmerged_weight()


def _merge_again_after_load(layer: NestedLoRALayer, incompatible_keys) -> None:
    """load_state_dict post hook: fold the loaded delta into a layer that was merged before the load."""
    if layer.__dict__.pop("_merge_after_load", 0):
        layer.merge()
