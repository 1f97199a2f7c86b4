// workbench::skinny_linear(x, w) = x w^T for a few rows of x (decoding), fp32, on a CPU.
// workbench::int8_linear(x, w, s) = (x w^T) * s for int8 w (weight-only quantization, one fp32 scale per
// output row: workbench/inference/quant.py), the same loop over a quarter of the bytes, 4 rows of x at a time.
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
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

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

// One int8 weight row against M (1..4) fp32 input rows: out[m] = sum_k w[k] x[m][k]. The row is read
// once; each 8 bytes are widened to 8 int32 and converted to 8 floats in registers (exact: |w| <= 127), then
// multiplied into all M inputs, so the conversion is paid once per weight byte whatever M is.
// U 8-wide groups per step: 8 for one input row (independent sums hide the multiply-add latency),
// 6 / 4 / 3 for two / three / four (M * U accumulators stay within the 16 vector registers). Measured on
// the 2-core development machine: 4 groups for one row reached 13.5 GB/s of weights, 8 groups 19-21 GB/s.
template <int M, int U>
inline void int8_dots(const int8_t* __restrict w, const float* __restrict x, int64_t K, float* out) {
  int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k + 8 * u));  // 8 int8
      const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));                       // 8 floats
      for (int m = 0; m < M; ++m) acc[m][u] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[m][u]);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m256 a = acc[m][0];
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[m][u]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    out[m] = _mm_cvtss_f32(h);
  }
#else
  for (int m = 0; m < M; ++m) out[m] = 0.f;
#endif
  for (; k < K; ++k)  // the tail (or everything, without AVX2): plain C++
    for (int m = 0; m < M; ++m) out[m] += static_cast<float>(w[k]) * x[m * K + k];
}

template <int M, int U>
void int8_rows(const int8_t* wp, const float* xp, const float* sp, float* yp, int64_t N, int64_t K) {
  // grain: at least 256 output rows per task, as skinny_linear
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    float out[M];
    for (int64_t n = begin; n < end; ++n) {
      int8_dots<M, U>(wp + n * K, xp, K, out);
      for (int m = 0; m < M; ++m) yp[m * N + n] = out[m] * sp[n];  // y = (x Wq^T) * s, per output row
    }
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && scale.dim() == 1,
              "int8_linear: x (M, K), w (N, K) and scale (N,) expected");
  TORCH_CHECK(x.size(1) == w.size(1), "int8_linear: x has ", x.size(1), " columns, w has ", w.size(1));
  TORCH_CHECK(scale.size(0) == w.size(0), "int8_linear: scale has ", scale.size(0), " entries, w ", w.size(0), " rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "int8_linear: x fp32, w int8 and scale fp32 expected");
  TORCH_CHECK(x.size(0) >= 1, "int8_linear: at least one row of x");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(), "int8_linear: CPU tensors only");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), sc = scale.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  const float* xp = xc.const_data_ptr<float>();
  const int8_t* wp = wc.const_data_ptr<int8_t>();
  const float* sp = sc.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  // more than 4 rows: blocks of 4, each streaming the weight once more (the caller keeps M small)
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* xb = xp + m0 * K;
    float* yb = yp + m0 * N;
    switch (std::min<int64_t>(M - m0, 4)) {
      case 1: int8_rows<1, 8>(wp, xb, sp, yb, N, K); break;
      case 2: int8_rows<2, 6>(wp, xb, sp, yb, N, K); break;
      case 3: int8_rows<3, 4>(wp, xb, sp, yb, N, K); break;
      default: int8_rows<4, 3>(wp, xb, sp, yb, N, K); break;
    }
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(workbench, m) {
  m.def("skinny_linear(Tensor x, Tensor w) -> Tensor", &skinny_linear);
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor", &int8_linear);
}
