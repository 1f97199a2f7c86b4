// workbench::skinny_linear(x, w) = x w^T for a few rows of x (decoding), fp32, on a CPU.
//
// Why this exists: batch-1 decoding multiplies one row per sequence by every weight matrix, so it is
// bound by how fast the weights stream from memory. BLAS answers a one-row product with a gemv that, on
// the 2-core development machine, runs on one core well below the bandwidth both cores can pull.
// Here each thread takes its own block of w's rows and streams it once, dotting every row of w with all
// M rows of x (which stay in L1). Nothing else: no tiling over K, no packing, no bias (the caller adds it).
//
// Loaded by workbench/nn/linear.py through torch.utils.cpp_extension, which compiles it on first use
// (cached afterwards) with -fopenmp: at::parallel_for is inline OpenMP code, so without the flag it runs
// on one thread. The threads are ATen's own pool, so torch.set_num_threads governs them too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

// sum_k w[k] x[k] with 16 independent partial sums: the compiler turns the inner loop into two 8-wide
// vector multiply-adds, and the separate sums hide the add latency.
inline float dot(const float* __restrict w, const float* __restrict x, int64_t K) {
  float acc[16] = {0.f};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int j = 0; j < 16; ++j) acc[j] += w[k + j] * x[k + j];
  float s = 0.f;
  for (; k < K; ++k) s += w[k] * x[k];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "skinny_linear: x (M, K) and w (N, K) must be 2-D");
  TORCH_CHECK(x.size(1) == w.size(1), "skinny_linear: x has ", x.size(1), " columns, w has ", w.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "skinny_linear: fp32 only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "skinny_linear: CPU tensors only");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* wp = wc.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  // grain: at least 256 output rows per task (on the small matrices one thread would do them all)
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot(wp + n * K, xp + m * K, K);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(workbench, m) {
  m.def("skinny_linear(Tensor x, Tensor w) -> Tensor", &skinny_linear);
}
