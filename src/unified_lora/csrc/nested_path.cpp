// The nested LoRA path as a C++ autograd Function: NestedLoRALayer(kernel="cpp") (unified_lora/_fused.py builds this
// file with torch's load_inline at first use; benchmarks/perf/layer.py --with-cpp times it).
//
// It computes what layer.py's `_NestedLoRAPath` computes, op for op:
//
//     out = base_out + scaling · (h A_catᵀ) B_catᵀ      A_cat = cat(A blocks, 0), B_cat = cat(B blocks, 1)
//
// saving only h and u = h A_catᵀ (plus the blocks themselves, which are parameters), so autograd keeps what PEFT's
// LoRA keeps. The difference is where the host time goes: the Python Function's forward and backward run as Python
// code on every call, which on a GPU (where these GEMMs take microseconds) is most of a layer's time. Here both run
// in C++, as a built-in op's autograd node does.
//
// Under autocast the path computes in the autocast dtype with autocast itself switched off inside (as F.linear
// would compute); a base output of another dtype gets the delta added in the wider dtype and rounded once. Gradients come back in each
// block's own dtype, and the engine casts h's gradient to h's dtype. Saved tensors go through save_for_backward,
// so an in-place change to a block between forward and backward is caught by the version check.
#include <torch/extension.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor as_dtype(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

Tensor cat_as(at::TensorList ts, int64_t dim, at::ScalarType dt) {
  return as_dtype(ts.size() == 1 ? ts[0] : at::cat(ts, dim), dt);
}

Tensor rows(const Tensor& t) { return t.reshape({-1, t.size(-1)}); }

struct NestedPath : public torch::autograd::Function<NestedPath> {
  static Tensor forward(AutogradContext* ctx, Tensor base_out, Tensor h, double scaling, int64_t k,
                        at::TensorList blocks) {
    TORCH_CHECK(k >= 1 && static_cast<int64_t>(blocks.size()) == 2 * k,
                "nested_path: expected k A blocks then k B blocks, got k=", k, " and ", blocks.size(), " blocks");
    const auto dev = h.device().type();
    // Autocast leaves fp64 alone (F.linear on fp64 inputs computes in fp64), and so do fp64 blocks here.
    const auto dt = at::autocast::is_autocast_enabled(dev) && blocks[0].scalar_type() != at::kDouble
                        ? at::autocast::get_autocast_dtype(dev)
                        : blocks[0].scalar_type();
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto A = cat_as(blocks.slice(0, k), 0, dt), B = cat_as(blocks.slice(k, k), 1, dt);
    const auto hd = as_dtype(h, dt);
    const auto u = at::matmul(hd, A.t());
    const auto base2 = rows(base_out);
    // A base output of another dtype: summed in the wider of the two, rounded once (layer.py's `_add_delta`).
    const auto bt = base_out.scalar_type();
    const auto out = bt == dt                             ? at::addmm(base2, rows(u), B.t(), 1, scaling)
                     : at::promote_types(bt, dt) == dt ? at::addmm(base2.to(dt), rows(u), B.t(), 1, scaling).to(bt)
                                                         : base2 + (at::mm(rows(u), B.t()) * scaling).to(bt);
    variable_list to_save{hd, u};
    to_save.insert(to_save.end(), blocks.begin(), blocks.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["k"] = k;
    ctx->saved_data["dt"] = static_cast<int64_t>(dt);
    if (h.requires_grad() && !hd.is_same(h)) ctx->saved_data["h_cast"] = true;  // saved a copy: see backward
    // Not a view (out is an intermediate nothing else holds, as at::matmul returns its result): autograd marks a view
    // returned by a custom Function, and an in-place op on it (`y += residual`, ReLU(inplace=True)) would raise.
    return at::_unsafe_view(out, base_out.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const double s = ctx->saved_data["scaling"].toDouble();
    const int64_t k = ctx->saved_data["k"].toInt();
    const auto dt = static_cast<at::ScalarType>(ctx->saved_data["dt"].toInt());
    // Edges count tensor inputs only: base_out is 0, h is 1.
    const bool need_base = ctx->needs_input_grad(0), need_h = ctx->needs_input_grad(1);
    const Tensor& h = saved[0];
    const at::TensorList Ab(saved.data() + 2, k), Bb(saved.data() + 2 + k, k);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto A = cat_as(Ab, 0, dt), B = cat_as(Bb, 1, dt);
    // A double backward (create_graph=True) differentiates these gradients. The saved u has no graph (forward ran
    // without grad), so it is recomputed from h and A with one; an h cast in forward (autocast, blocks of another
    // dtype) was saved as a copy with no graph to the input, so its second-order terms cannot be formed: an error,
    // not a wrong gradient (layer.py's `_double_backward_u`).
    const bool differentiable = at::GradMode::is_enabled();
    TORCH_CHECK(!differentiable || ctx->saved_data.count("h_cast") == 0,
                "NestedLoRALayer: a double backward (create_graph=True) through two or more active blocks needs the "
                "input in the adapters' dtype without autocast; this input was cast inside the layer (autocast, or "
                "blocks of another dtype), so its second-order terms are not available. Run that backward without "
                "autocast, or at the lowest rank (one block runs as plain torch ops)");
    const Tensor u = differentiable ? at::matmul(h, A.t()) : saved[1];
    const auto& gy = grads[0];
    const auto g2 = as_dtype(rows(gy), dt);
    const auto u2 = rows(u), h2 = rows(h);
    const auto gu = at::mm(g2, B).mul_(s);        // tokens × r
    const auto gA = at::mm(gu.t(), h2);           // r × in
    const auto gB = at::mm(g2.t(), u2).mul_(s);   // out × r
    variable_list out;
    out.reserve(4 + 2 * k);
    out.push_back(need_base ? gy : Tensor());
    out.push_back(need_h ? at::mm(gu, A).reshape(h.sizes()) : Tensor());
    out.push_back(Tensor());  // scaling
    out.push_back(Tensor());  // k
    std::vector<int64_t> sizes;
    sizes.reserve(k);
    for (const auto& a : Ab) sizes.push_back(a.size(0));
    const auto gAs = gA.split_with_sizes(sizes, 0);
    const auto gBs = gB.split_with_sizes(sizes, 1);
    for (int64_t i = 0; i < k; ++i) out.push_back(as_dtype(gAs[i], Ab[i].scalar_type()));
    for (int64_t i = 0; i < k; ++i) out.push_back(as_dtype(gBs[i], Bb[i].scalar_type()));
    return out;
  }
};

}  // namespace

// blocks: the k active A blocks, then the k active B blocks (k >= 1).
Tensor nested_path(Tensor base_out, Tensor h, double scaling, int64_t k, std::vector<Tensor> blocks) {
  return NestedPath::apply(base_out, h, scaling, k, at::TensorList(blocks));
}
