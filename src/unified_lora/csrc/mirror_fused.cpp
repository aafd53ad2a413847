// Fused Mirror kernels for the CPU: MirrorConfig(kernel="fused") (unified_lora/_fused.py builds this file with
// torch's load_inline at first use; benchmarks/perf/mirror_cost.py --with-cpp times it).
//
// The eager cycle copies W into a scratch buffer before it can subtract W_snap. These kernels read W and W_snap
// in place, with no scratch and no launch per tensor.
//
// drift_sq(w, s) -> float64 [2, n]: per tensor, the sums Σ (w − s)² and Σ s², one pass over both, nothing written.
// copy_all(dst, src): every tensor copied with memcpy; each dst's version counter is bumped, as an in-place op's
// is, so autograd still catches a restore into a tensor that a pending backward has saved.
// Both split the tensors into chunks of at most 64 Ki elements and share the chunks among torch's intra-op
// threads in one parallel region. Each chunk is summed in fp32 (vectorised by `omp simd`, no -ffast-math) and
// the chunks are added in fp64 in a fixed order, so the result does not depend on the thread count. They need
// contiguous CPU tensors, pairwise of one dtype and size (checked), and take fp32, bf16 or fp16. Built
// without -march=native, so the cached build runs on any x86-64 (or other) host that shares the cache.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>

namespace {

constexpr int64_t kChunk = 1 << 16;

struct Chunk {
  int64_t tensor, begin, len;
};

std::vector<Chunk> chunks_of(const std::vector<torch::Tensor>& ts) {
  std::vector<Chunk> out;
  for (int64_t t = 0; t < static_cast<int64_t>(ts.size()); ++t) {
    const int64_t n = ts[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) out.push_back({t, b, std::min(kChunk, n - b)});
  }
  return out;
}

template <typename T>
void sq2(const T* __restrict w, const T* __restrict s, int64_t n, double* dd, double* ss) {
  // fp32 partial sums over at most one chunk; `omp simd` lets the compiler split them over vector lanes.
  float a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < n; ++i) {
    const float x = static_cast<float>(s[i]);
    const float d = static_cast<float>(w[i]) - x;
    a += d * d;
    b += x * x;
  }
  *dd = a;
  *ss = b;
}

void check_pairs(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b, const char* what) {
  TORCH_CHECK(a.size() == b.size(), what, ": ", a.size(), " tensors against ", b.size());
  for (size_t t = 0; t < a.size(); ++t) {
    TORCH_CHECK(a[t].device().is_cpu() && b[t].device().is_cpu(), what, ": tensor ", t, " is not on the CPU");
    TORCH_CHECK(a[t].is_contiguous() && b[t].is_contiguous(), what, ": tensor ", t, " is not contiguous");
    TORCH_CHECK(a[t].scalar_type() == b[t].scalar_type() && a[t].numel() == b[t].numel(), what, ": tensor ", t,
                " differs in dtype or size");
  }
}

}  // namespace

torch::Tensor drift_sq(const std::vector<torch::Tensor>& w, const std::vector<torch::Tensor>& s) {
  check_pairs(w, s, "drift_sq");
  const int64_t n = static_cast<int64_t>(w.size());
  const auto chunks = chunks_of(w);
  const int64_t m = static_cast<int64_t>(chunks.size());
  std::vector<double> part(2 * m);
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& k = chunks[c];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w[k.tensor].scalar_type(), "drift_sq", [&] {
        sq2<scalar_t>(w[k.tensor].data_ptr<scalar_t>() + k.begin, s[k.tensor].data_ptr<scalar_t>() + k.begin,
                      k.len, &part[2 * c], &part[2 * c + 1]);
      });
    }
  });
  auto out = torch::zeros({2, n}, torch::kFloat64);
  double* o = out.data_ptr<double>();
  for (int64_t c = 0; c < m; ++c) {  // chunks in order: the sums do not depend on the thread count
    o[chunks[c].tensor] += part[2 * c];
    o[n + chunks[c].tensor] += part[2 * c + 1];
  }
  return out;
}

void copy_all(const std::vector<torch::Tensor>& dst, const std::vector<torch::Tensor>& src) {
  check_pairs(dst, src, "copy_all");
  const auto chunks = chunks_of(dst);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& k = chunks[c];
      const int64_t es = dst[k.tensor].element_size();
      std::memcpy(static_cast<char*>(dst[k.tensor].data_ptr()) + k.begin * es,
                  static_cast<const char*>(src[k.tensor].data_ptr()) + k.begin * es, k.len * es);
    }
  });
  for (const auto& t : dst) t.unsafeGetTensorImpl()->bump_version();
}
