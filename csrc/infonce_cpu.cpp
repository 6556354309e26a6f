// CPU kernels of the fused InfoNCE op (contract: infonce_cpu.h, pnr_kernels/ops/infonce.py).
//
// Work is split into units of one row tile of one row set; at::parallel_for hands contiguous
// ranges of units to the threads, and each thread allocates its tile buffers once. A unit walks
// every key tile of every key block with the online log-sum-exp: each (row tile x key tile) block
// of logits is one BLAS product into the thread's buffer, so nothing of size rows x keys is ever
// allocated. Backward recomputes each logits tile once (or takes it from the forward's stash, see
// "The logits stash" below) and turns it into the softmax weights P = exp(logit - lse) (masked
// entries 0, every entry in [0, 1]), then
//   d rows tile += P @ keys tile                 (the unit owns its rows: no race; multiplied by
//                                                 scale * g row by row at the end)
//   d keys tile += P^T @ (scale * g * rows tile) (into the calling thread's own accumulator:
//                                                 thread 0's is the result, the others are
//                                                 allocated when first used and added at the end)
// except for a key block that is its row set itself (z against z), whose symmetric logits are
// visited only from each unit's own rows on (see is_symmetric_block).
// The element-wise passes (tile max, sum of exponentials, the weights) are fused loops over the
// tile, AVX-512 or AVX2 where the CPU has it (chosen at run time: the build flags have no -march).
// The products call the BLAS of the torch library directly (sgemm_/dgemm_), without ATen's
// per-call overhead, which matters at small sizes.
//
// Precision and product dtype:
// * float64 is computed in float64, float32 in float32.
// * bfloat16 / float16 inputs: the logits, running maxima, sums and the LSE are float32 always.
//   The products run either in float32 on converted inputs (O((rows + keys) x D) copies), or, on
//   CPUs whose bf16 / fp16 matrix products beat float32 (AMX), as bf16 x bf16 -> fp32 (fp16 x
//   fp16 -> fp32) MKL products (cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32, looked up at run
//   time in the loaded torch library, float32 accumulation): the logits from the inputs as given
//   (the scale is the product's alpha, so nothing is rounded before the product), the weights P
//   rounded to the input dtype for the gradient products (P is in [0, 1]: fp16 loses only
//   weights under 6e-8, whose sum is negligible), and scale * g * rows / max|g| rounded to the
//   input dtype for the key gradient (rescaled by max|g| afterwards, so that fp16 keeps the
//   precision of small upstream gradients). PNR_KERNELS_CPU_PRODUCTS=half forces the half
//   products where the MKL entry points exist, =float forces float32; unset (auto) picks half
//   products only on CPUs with AMX-BF16 (bf16) / AMX-FP16 (fp16). Without AMX they do not pay:
//   on an Emerald Rapids VM that hides AMX (AVX512-BF16 and AVX512-FP16 only), single-thread
//   (1024 x 128) x (128 x 1024) products ran at 83 GFLOP/s in bf16 (MKL and oneDNN alike) and
//   156 in fp16 against 164 in float32, and SimCLR-PNR at B = 2048 took 1.7x (bf16) and 1.06x
//   (fp16) the time of the float32 products. That the half products pay on AMX hosts rests on
//   the bf16 products measured there (290-860 GFLOP/s against 110-200 in float32, torch.mm), not
//   on a measurement of these kernels.
#include "infonce_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/zeros.h>

#include <dlfcn.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>

#include "common.h"

namespace pnr_kernels {
namespace {

constexpr int64_t kRowTile = 256;
constexpr int64_t kMinRowTile = 16;
constexpr int64_t kKeyTile = 512;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// BLAS: row-major C (m x n, ldc) = alpha op(A) op(B) + beta C, called from inside the parallel
// region (single-threaded BLAS). Fortran sgemm_/dgemm_ and MKL's half-input cblas entry points
// are looked up once in the loaded torch library; without them the float/double products fall
// back to ATen, and half products are not offered.
// ---------------------------------------------------------------------------------------------

using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const void*,
                             const void*, const int*, const void*, const int*, const void*, void*, const int*);
using HalfGemm = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int, float, float*,
                          int);

struct Blas {
  FortranGemm sgemm = nullptr, dgemm = nullptr;
  HalfGemm bf16 = nullptr, fp16 = nullptr;
};

const Blas& blas() {
  static const Blas table = [] {
    Blas t;
    void* handle = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (handle == nullptr) handle = RTLD_DEFAULT;
    t.sgemm = reinterpret_cast<FortranGemm>(dlsym(handle, "sgemm_"));
    t.dgemm = reinterpret_cast<FortranGemm>(dlsym(handle, "dgemm_"));
    t.bf16 = reinterpret_cast<HalfGemm>(dlsym(handle, "cblas_gemm_bf16bf16f32"));
    t.fp16 = reinterpret_cast<HalfGemm>(dlsym(handle, "cblas_gemm_f16f16f32"));
    if (std::getenv("PNR_KERNELS_CPU_ATEN_BLAS") != nullptr) t.sgemm = t.dgemm = nullptr;  // to test the fallback
    return t;
  }();
  return table;
}

template <typename T>
at::Tensor matrix_view(const T* data, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor m = at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, options);
  return transposed ? m.t() : m;
}

template <typename acc_t>
void gemm_full(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a, int64_t lda,
               const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  const FortranGemm fn = std::is_same_v<acc_t, float> ? blas().sgemm : blas().dgemm;
  if (fn != nullptr) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    // BLAS refuses leading dimensions under 1 (D = 0 gives lda = 0).
    const int mi = m, ni = n, ki = k, la = std::max<int64_t>(lda, 1), lb = std::max<int64_t>(ldb, 1),
              lc = std::max<int64_t>(ldc, 1);
    fn(trans_b ? "T" : "N", trans_a ? "T" : "N", &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
    return;
  }
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  at::Tensor am = trans_a ? matrix_view(a, k, m, lda, true) : matrix_view(a, m, k, lda, false);
  at::Tensor bm = trans_b ? matrix_view(b, n, k, ldb, true) : matrix_view(b, k, n, ldb, false);
  if (beta == 0) {
    at::mm_out(out, am, bm);
    if (alpha != 1) out.mul_(alpha);
  } else {
    out.mul_(beta).addmm_(am, bm, 1, alpha);
  }
}

template <typename half_t>
void gemm_half(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const half_t* a, int64_t lda,
               const half_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const HalfGemm fn = std::is_same_v<half_t, at::BFloat16> ? blas().bf16 : blas().fp16;
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  fn(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, alpha, a,
     std::max<int64_t>(lda, 1), b, std::max<int64_t>(ldb, 1), beta, c, std::max<int64_t>(ldc, 1));
}

template <typename acc_t, typename in_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha, const in_t* a, int64_t lda,
          const in_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  if constexpr (std::is_same_v<acc_t, in_t>) {
    gemm_full<acc_t>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    gemm_half<in_t>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

// ---------------------------------------------------------------------------------------------
// CPU features and the product dtype.
// ---------------------------------------------------------------------------------------------

bool cpu_has_avx512() {
#if defined(__x86_64__)
  // PNR_KERNELS_CPU_NO_AVX512 (read once) takes the generic loops, to test them on any machine.
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          std::getenv("PNR_KERNELS_CPU_NO_AVX512") == nullptr;
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__)
  // PNR_KERNELS_CPU_NO_AVX2 (read once) takes the scalar loops, to test them on any machine.
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && std::getenv("PNR_KERNELS_CPU_NO_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__)
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// AMX-BF16 (CPUID.(7,0):EDX[22]) and AMX-FP16 (CPUID.(7,1):EAX[21]), as the CPU reports them.
bool cpu_has_amx(at::ScalarType dtype) {
#if defined(__x86_64__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (dtype == at::kBFloat16) {
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    return (edx >> 22) & 1;
  }
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
  return (eax >> 21) & 1;
#else
  return false;
#endif
}

// Whether bf16 / fp16 inputs take the half-precision products (see the header comment).
bool use_half_products(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  const bool available = (dtype == at::kBFloat16 ? blas().bf16 : blas().fp16) != nullptr;
  const char* env = std::getenv("PNR_KERNELS_CPU_PRODUCTS");
  const std::string choice = env == nullptr ? "auto" : env;
  if (choice == "float") return false;
  if (choice == "half") return available;
  TORCH_CHECK(choice == "auto" || choice.empty(), "PNR_KERNELS_CPU_PRODUCTS must be auto, half or float, got ",
              choice);
  return available && cpu_has_amx(dtype);
}

// ---------------------------------------------------------------------------------------------
// Column statistics of a (rows x n) logits tile with leading dimension ld, for the symmetric
// blocks' forward (see forward_kernel): merges, for each column j, the max over the tile's rows
// and the sum of exp(x - max) into the running run_max[j], run_sum[j] (the online log-sum-exp,
// along columns; a NaN reaches the sum). Generic loops here, AVX-512 and AVX2 versions below.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
void column_stats_scalar(const acc_t* x, int64_t rows, int64_t n, int64_t ld, acc_t* run_max, acc_t* run_sum) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> shift(run_max, run_max + n), sum(n);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < n; ++j) shift[j] = std::max(shift[j], x[i * ld + j]);
  }
  for (int64_t j = 0; j < n; ++j) {
    const acc_t new_max = shift[j];
    shift[j] = new_max == neg_inf ? acc_t(0) : new_max;  // -inf - -inf would make a NaN
    sum[j] = run_sum[j] * std::exp(run_max[j] - shift[j]);
    run_max[j] = new_max;
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < n; ++j) sum[j] += std::exp(x[i * ld + j] - shift[j]);
  }
  std::copy(sum.begin(), sum.end(), run_sum);
}

// ---------------------------------------------------------------------------------------------
// Element-wise row passes: max, sum of exp(x - shift), exp(x - shift) stored in the product type
// (returning their sum before rounding). Generic loops, and AVX-512 and AVX2 versions for float32.
// ---------------------------------------------------------------------------------------------

#if defined(__x86_64__)
// The vector exp's constants, shared by the AVX-512 and AVX2 versions (Cephes expf): log2(e), ln 2
// split into a high part exact in float and a low correction, and the polynomial of exp(r) - 1 - r
// on [-ln2/2, ln2/2] divided by r^2, highest degree first.
constexpr float kExpLog2e = 1.44269504088896341f;
constexpr float kExpLn2High = 0.693359375f;
constexpr float kExpLn2Low = -2.12194440e-4f;
constexpr int kExpPolynomialTerms = 6;
constexpr float kExpPolynomial[kExpPolynomialTerms] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                                       4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#define PNR_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))

// exp(x) to about 1 ulp (Cephes polynomial on [-ln2/2, ln2/2], scaled by 2^n with vscalefps, so
// that overflow gives +inf and underflow 0); -inf gives 0 and NaN stays NaN.
PNR_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 clamped = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(kExpLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2High), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2Low), r);
  __m512 p = _mm512_set1_ps(kExpPolynomial[0]);
  for (int i = 1; i < kExpPolynomialTerms; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPolynomial[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 result = _mm512_scalef_ps(p, n);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), result, x);  // NaN in, NaN out
}

PNR_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

PNR_AVX512 float row_max_avx512(const float* x, int64_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = neg_inf, m1 = neg_inf;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + j));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + j + 16));
  }
  for (; j < n; j += 16) m0 = _mm512_max_ps(m0, _mm512_mask_loadu_ps(neg_inf, tail_mask(n - j), x + j));
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

PNR_AVX512 float sum_exp_avx512(const float* x, int64_t n, float shift) {
  const __m512 s = _mm512_set1_ps(shift);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    a0 = _mm512_add_ps(a0, exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j), s)));
    a1 = _mm512_add_ps(a1, exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), s)));
  }
  for (; j < n; j += 16) {
    const __mmask16 mask = tail_mask(n - j);
    a0 = _mm512_mask_add_ps(a0, mask, a0, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + j), s)));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

// exp(x - shift) stored by store(j, mask, e) for each 16-lane chunk, summed in the order of
// sum_exp_avx512 (so that the forward's LSE does not depend on whether the weights are kept).
template <typename Store>
PNR_AVX512 inline float exp_shift_sum_avx512(const float* x, int64_t n, float shift, const Store& store) {
  const __m512 s = _mm512_set1_ps(shift);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j), s));
    const __m512 e1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), s));
    a0 = _mm512_add_ps(a0, e0);
    a1 = _mm512_add_ps(a1, e1);
    store(j, static_cast<__mmask16>(0xFFFF), e0);
    store(j + 16, static_cast<__mmask16>(0xFFFF), e1);
  }
  for (; j < n; j += 16) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + j), s));
    a0 = _mm512_mask_add_ps(a0, mask, a0, e);
    store(j, mask, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

PNR_AVX512 float exp_shift_avx512(const float* x, int64_t n, float shift, float* y) {
  return exp_shift_sum_avx512(x, n, shift, [&](int64_t j, __mmask16 mask, __m512 e) PNR_AVX512 {
    _mm512_mask_storeu_ps(y + j, mask, e);
  });
}

PNR_AVX512 float exp_shift_avx512(const float* x, int64_t n, float shift, at::Half* y) {
  return exp_shift_sum_avx512(x, n, shift, [&](int64_t j, __mmask16 mask, __m512 e) PNR_AVX512 {
    const __m256i h = _mm512_cvtps_ph(e, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(y + j), mask, h);
  });
}

#define PNR_AVX512_BF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16")))

PNR_AVX512_BF16 float exp_shift_avx512(const float* x, int64_t n, float shift, at::BFloat16* y) {
  return exp_shift_sum_avx512(x, n, shift, [&](int64_t j, __mmask16 mask, __m512 e) PNR_AVX512_BF16 {
    const __m256bh h = _mm512_cvtneps_pbh(e);
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(y + j), mask, reinterpret_cast<const __m256i&>(h));
  });
}

PNR_AVX512 void symmetric_weights_avx512(const float* x, int64_t n, float shift, float g, const float* shifts,
                                         const float* gs, float* w) {
  const __m512 s = _mm512_set1_ps(shift), gv = _mm512_set1_ps(g);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + j);
    const __m512 own = exp512(_mm512_sub_ps(v, s));
    const __m512 other = exp512(_mm512_sub_ps(v, _mm512_maskz_loadu_ps(mask, shifts + j)));
    const __m512 key_g = _mm512_maskz_loadu_ps(mask, gs + j);
    _mm512_mask_storeu_ps(w + j, mask, _mm512_fmadd_ps(key_g, other, _mm512_mul_ps(gv, own)));
  }
}

PNR_AVX512 void column_stats_avx512(const float* x, int64_t rows, int64_t n, float* run_max, float* run_sum) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = tail_mask(n - j);
    __m512 m = neg_inf;
    for (int64_t i = 0; i < rows; ++i) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(neg_inf, mask, x + i * n + j));
    const __m512 old_max = _mm512_mask_loadu_ps(neg_inf, mask, run_max + j);
    const __m512 new_max = _mm512_max_ps(old_max, m);
    // Shift by 0 where every logit so far is -inf, so that -inf - -inf never makes a NaN.
    const __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(new_max, neg_inf, _CMP_EQ_OQ), new_max,
                                              _mm512_setzero_ps());
    __m512 sum = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, run_sum + j), exp512(_mm512_sub_ps(old_max, shift)));
    for (int64_t i = 0; i < rows; ++i) {
      sum = _mm512_add_ps(sum, exp512(_mm512_sub_ps(_mm512_mask_loadu_ps(neg_inf, mask, x + i * n + j), shift)));
    }
    _mm512_mask_storeu_ps(run_max + j, mask, new_max);
    _mm512_mask_storeu_ps(run_sum + j, mask, sum);
  }
}
#endif

#if defined(__x86_64__)
#define PNR_AVX2 __attribute__((target("avx2,fma,f16c")))

// exp(x) as exp512 for 8 lanes, with 2^n built in the exponent field: x is clamped to [-87, 88]
// (n in [-126, 127]); below -87 the result is 0 (exp(-87) = 1.6e-38, the float32 normal minimum),
// above 88 +inf, and NaN stays NaN. The kernels only take exp of values <= 0 (plus rounding).
PNR_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.0f), high = _mm256_set1_ps(88.0f);
  const __m256 clamped = _mm256_min_ps(_mm256_max_ps(x, low), high);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(kExpLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExpLn2High), clamped);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExpLn2Low), r);
  __m256 p = _mm256_set1_ps(kExpPolynomial[0]);
  for (int i = 1; i < kExpPolynomialTerms; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPolynomial[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  result = _mm256_blendv_ps(result, _mm256_setzero_ps(), _mm256_cmp_ps(x, low, _CMP_LT_OQ));
  result = _mm256_blendv_ps(result, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                            _mm256_cmp_ps(x, high, _CMP_GT_OQ));
  return _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN in, NaN out
}

PNR_AVX2 inline float reduce_max256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

PNR_AVX2 inline float reduce_add256(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

PNR_AVX2 float row_max_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  float result = reduce_max256(m);
  for (; j < n; ++j) result = std::max(result, x[j]);
  return result;
}

PNR_AVX2 float sum_exp_avx2(const float* x, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_add_ps(a0, exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), s)));
    a1 = _mm256_add_ps(a1, exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), s)));
  }
  for (; j + 8 <= n; j += 8) a0 = _mm256_add_ps(a0, exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), s)));
  float result = reduce_add256(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) result += std::exp(x[j] - shift);
  return result;
}

// exp(x - shift) stored as out_t, summed in the order of sum_exp_avx2 (see exp_shift_sum_avx512).
template <typename out_t>
PNR_AVX2 inline void store_avx2(out_t* y, __m256 e) {
  if constexpr (std::is_same_v<out_t, float>) {
    _mm256_storeu_ps(y, e);
  } else if constexpr (std::is_same_v<out_t, at::Half>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_cvtps_ph(e, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, e);
    for (int l = 0; l < 8; ++l) y[l] = static_cast<out_t>(tmp[l]);
  }
}

template <typename out_t>
PNR_AVX2 float exp_shift_avx2(const float* x, int64_t n, float shift, out_t* y) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 e0 = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
    const __m256 e1 = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), s));
    a0 = _mm256_add_ps(a0, e0);
    a1 = _mm256_add_ps(a1, e1);
    store_avx2(y + j, e0);
    store_avx2(y + j + 8, e1);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
    a0 = _mm256_add_ps(a0, e);
    store_avx2(y + j, e);
  }
  float sum = reduce_add256(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) {
    const float e = std::exp(x[j] - shift);
    sum += e;
    y[j] = static_cast<out_t>(e);
  }
  return sum;
}

PNR_AVX2 void symmetric_weights_avx2(const float* x, int64_t n, float shift, float g, const float* shifts,
                                     const float* gs, float* w) {
  const __m256 s = _mm256_set1_ps(shift), gv = _mm256_set1_ps(g);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256 own = exp256(_mm256_sub_ps(v, s));
    const __m256 other = exp256(_mm256_sub_ps(v, _mm256_loadu_ps(shifts + j)));
    _mm256_storeu_ps(w + j, _mm256_fmadd_ps(_mm256_loadu_ps(gs + j), other, _mm256_mul_ps(gv, own)));
  }
  for (; j < n; ++j) w[j] = g * std::exp(x[j] - shift) + gs[j] * std::exp(x[j] - shifts[j]);
}

PNR_AVX2 void column_stats_avx2(const float* x, int64_t rows, int64_t n, float* run_max, float* run_sum) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 m = neg_inf;
    for (int64_t i = 0; i < rows; ++i) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i * n + j));
    const __m256 old_max = _mm256_loadu_ps(run_max + j);
    const __m256 new_max = _mm256_max_ps(old_max, m);
    const __m256 shift = _mm256_blendv_ps(new_max, _mm256_setzero_ps(), _mm256_cmp_ps(new_max, neg_inf, _CMP_EQ_OQ));
    __m256 sum = _mm256_mul_ps(_mm256_loadu_ps(run_sum + j), exp256(_mm256_sub_ps(old_max, shift)));
    for (int64_t i = 0; i < rows; ++i) sum = _mm256_add_ps(sum, exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i * n + j), shift)));
    _mm256_storeu_ps(run_max + j, new_max);
    _mm256_storeu_ps(run_sum + j, sum);
  }
  if (j < n) column_stats_scalar(x + j, rows, n - j, n, run_max + j, run_sum + j);
}
#endif

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return row_max_avx512(x, n);
    if (cpu_has_avx2()) return row_max_avx2(x, n);
  }
#endif
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);  // a NaN reaches the LSE through the sum
  return m;
}

template <typename acc_t>
acc_t sum_exp(const acc_t* x, int64_t n, acc_t shift) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return sum_exp_avx512(x, n, shift);
    if (cpu_has_avx2()) return sum_exp_avx2(x, n, shift);
  }
#endif
  acc_t s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(x[j] - shift);
  return s;
}

template <typename acc_t, typename out_t>
acc_t exp_shift(const acc_t* x, int64_t n, acc_t shift, out_t* y) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<acc_t, float>) {
    const bool vector = std::is_same_v<out_t, at::BFloat16> ? cpu_has_avx512_bf16() : cpu_has_avx512();
    if (vector) return exp_shift_avx512(x, n, shift, y);
    if (cpu_has_avx2()) return exp_shift_avx2<out_t>(x, n, shift, y);
  }
#endif
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t e = std::exp(x[j] - shift);
    sum += e;
    y[j] = static_cast<out_t>(e);
  }
  return sum;
}

template <typename acc_t>
void column_stats(const acc_t* x, int64_t rows, int64_t n, acc_t* run_max, acc_t* run_sum) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return column_stats_avx512(x, rows, n, run_max, run_sum);
    if (cpu_has_avx2()) return column_stats_avx2(x, rows, n, run_max, run_sum);
  }
#endif
  column_stats_scalar(x, rows, n, n, run_max, run_sum);
}

// The weights of a symmetric block (see backward_kernel): w[j] = g exp(x[j] - shift) +
// gs[j] exp(x[j] - shifts[j]); w may be x.
template <typename acc_t>
void symmetric_weights(const acc_t* x, int64_t n, acc_t shift, acc_t g, const acc_t* shifts, const acc_t* gs,
                       acc_t* w) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx512()) return symmetric_weights_avx512(x, n, shift, g, shifts, gs, w);
    if (cpu_has_avx2()) return symmetric_weights_avx2(x, n, shift, g, shifts, gs, w);
  }
#endif
  for (int64_t j = 0; j < n; ++j) w[j] = g * std::exp(x[j] - shift) + gs[j] * std::exp(x[j] - shifts[j]);
}

// ---------------------------------------------------------------------------------------------
// Units and threads.
// ---------------------------------------------------------------------------------------------

// Rows per unit: kRowTile, halved (down to kMinRowTile) until every thread gets two units, four
// where a key block is symmetric. Units of a general block carry equal work, and a smaller tile
// only streams the keys more often (MoCo-PNR at B = 256 against 16384-key queues: 188 ms a step
// with four, 134 with two, interleaved runs of the same day); a symmetric block's units shrink
// with their position, and with two per thread
// (SimCLR-PNR at B = 256: 2 x 256-row tiles per row set) one thread gets a 256 x 256 square of
// logits more than the other, which four units in the first/last order of for_each_row_tile even
// out (7.3 -> 7.0 ms a step, median of 8 alternating runs of 600 steps; both on the 2-core AMD VM).
int64_t row_tile(int64_t num_row_sets, int64_t num_rows, bool any_symmetric) {
  const int64_t units_per_thread = any_symmetric ? 4 : 2;
  int64_t tile = kRowTile;
  while (tile > kMinRowTile && num_row_sets * ceil_div(num_rows, tile) < units_per_thread * at::get_num_threads()) {
    tile /= 2;
  }
  return tile;
}

bool any_of(const std::vector<std::vector<bool>>& flags) {
  for (const auto& row : flags) {
    for (bool f : row) {
      if (f) return true;
    }
  }
  return false;
}

// Calls body(scratch, r, i0, tm) for row set r, rows i0 .. i0 + tm, for every unit, in parallel;
// `make_scratch()` is called once per thread chunk. Units alternate between the row sets, and the
// row tiles of a row set come first, last, second, second to last, ..., so that the contiguous
// ranges of units the threads get carry about equal work where a unit's work depends on its row
// set and shrinks with its position (symmetric blocks).
template <typename MakeScratch, typename F>
void for_each_row_tile(int64_t num_row_sets, int64_t num_rows, int64_t tile, const MakeScratch& make_scratch,
                       const F& body) {
  const int64_t tiles = ceil_div(num_rows, tile);
  at::parallel_for(0, num_row_sets * tiles, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch state is per thread
    auto scratch = make_scratch(tile);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t r = unit % num_row_sets, order = unit / num_row_sets;
      const int64_t i0 = (order % 2 == 0 ? order / 2 : tiles - 1 - order / 2) * tile;
      body(scratch, r, i0, std::min(tile, num_rows - i0));
    }
  });
}

// The calling thread's index into per-thread accumulators made for num_threads threads.
int64_t accumulator_index(int64_t num_threads) {
  const int64_t thread = at::get_thread_num();
  TORCH_CHECK(thread < num_threads, "thread ", thread, " outside the ", num_threads, " accumulators");
  return thread;
}

// A key block that is its row set itself (NT-Xent's and SimCLR-PNR's z against z, outside data
// parallelism) has symmetric logits, S[i, j] = S[j, i]. Forward and backward then visit only the
// keys from the unit's first row on (the upper triangle, by row tiles): the square of the unit's
// own rows and the keys after it.
//   forward:  the keys after the square also give the column statistics of those keys (max and
//             sum of exp over the unit's rows), merged per thread; a row's LSE is its own
//             statistics merged with every thread's column statistics (which hold its keys before
//             its unit). Half the logits products.
//   backward: W[i, j] = scale (g[i] p[i, j] + g[j] p[j, i]), p[j, i] = exp(S[i, j] - lse[j]), is
//             symmetric and dz = W z: the square gives d rows += W z (row side only), a tile after
//             it both d rows += W z_J and, into the key accumulator, d z_J += W^T z_I. Half the
//             logits recomputation and half the exps of a full-square pass.
// Only for float32 / float64 products (the half products keep the general form and its rescaling
// of g), and only where the row set and the key block need a gradient alike, so that forward and
// backward agree on the stash layout.
bool is_symmetric_block(const at::Tensor& rows, const at::Tensor& keys, bool rows_need_grad, bool keys_need_grad) {
  return rows.const_data_ptr() == keys.const_data_ptr() && rows.sizes() == keys.sizes() &&
         rows.strides() == keys.strides() && rows.scalar_type() == keys.scalar_type() &&
         rows_need_grad == keys_need_grad;
}

std::vector<std::vector<bool>> symmetric_blocks(const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& keys,
                                                const std::vector<bool>& rows_need_grad,
                                                const std::vector<bool>& keys_need_grad, bool half_products) {
  std::vector<std::vector<bool>> symmetric(rows.size(), std::vector<bool>(keys.size(), false));
  for (size_t r = 0; r < rows.size() && !half_products; ++r) {
    for (size_t k = 0; k < keys.size(); ++k) {
      symmetric[r][k] = is_symmetric_block(rows[r], keys[k], rows_need_grad[r], keys_need_grad[k]);
    }
  }
  return symmetric;
}

// A block whose row set needs a gradient and whose keys need none (MoCo's queues, the frozen
// blocks of SimCLR-PNR and CaSSLe) is "folded" into forward: forward also accumulates, with the
// online log-sum-exp's rescaling, the row side of its gradient, sum_j exp(logit - lse) key_j
// (R x M x D, all such blocks of a row set together, kept with the logits stash below), so that
// backward adds scale * g times it and never visits the block (one product and one exp pass per
// logit for both directions instead of two products and two exp passes, and no logits kept).
// PNR_KERNELS_CPU_FOLD=0 turns this off (backward then recomputes those blocks, or reads them
// from the stash).
bool fold_enabled() {
  const char* env = std::getenv("PNR_KERNELS_CPU_FOLD");
  return env == nullptr || std::string(env) != "0";
}

std::vector<std::vector<bool>> folded_blocks(const std::vector<std::vector<bool>>& symmetric,
                                             const std::vector<bool>& rows_need_grad,
                                             const std::vector<bool>& keys_need_grad) {
  const bool enabled = fold_enabled();
  std::vector<std::vector<bool>> folded(symmetric.size(), std::vector<bool>(keys_need_grad.size(), false));
  for (size_t r = 0; r < symmetric.size() && enabled; ++r) {
    for (size_t k = 0; k < keys_need_grad.size(); ++k) {
      folded[r][k] = rows_need_grad[r] && !keys_need_grad[k] && !symmetric[r][k];
    }
  }
  return folded;
}

// Where each (row set, key block) keeps its logits in the stash: a general block (M x M_k) as
// (row tile x key tile) blocks, each contiguous (tm x tn), unit after unit; a symmetric block
// only each unit's square and the keys after it, tm x (M - i0) per unit (about half of M x M); a
// folded block nothing (backward does not visit it).
struct StashLayout {
  int64_t tile, num_rows;
  std::vector<std::vector<bool>> symmetric, folded;
  std::vector<std::vector<int64_t>> start;  // first element of block (r, k)
  int64_t total = 0;

  StashLayout(const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& keys,
              std::vector<std::vector<bool>> symmetric_, const std::vector<bool>& rows_need_grad,
              const std::vector<bool>& keys_need_grad)
      : tile(row_tile(rows.size(), rows[0].size(0), any_of(symmetric_))),
        num_rows(rows[0].size(0)),
        symmetric(std::move(symmetric_)),
        folded(folded_blocks(symmetric, rows_need_grad, keys_need_grad)) {
    for (size_t r = 0; r < rows.size(); ++r) {
      start.emplace_back();
      for (size_t k = 0; k < keys.size(); ++k) {
        start[r].push_back(total);
        if (folded[r][k]) continue;
        total += symmetric[r][k] ? unit_start(ceil_div(num_rows, tile)) : num_rows * keys[k].size(0);
      }
    }
  }
  bool any_folded() const { return any_of(folded); }
  bool folded_set(size_t r) const {
    for (bool f : folded[r]) {
      if (f) return true;
    }
    return false;
  }
  // Elements of a symmetric block before unit u: sum over earlier units of tile x (M - i0).
  int64_t unit_start(int64_t u) const { return tile * (u * num_rows - tile * u * (u - 1) / 2); }
  // The (tm x tn) tile of keys j0 .. j0 + tn of the unit of rows i0 .. i0 + tm in block (r, k).
  int64_t offset(int64_t r, int64_t k, int64_t i0, int64_t j0, int64_t tm, int64_t num_keys) const {
    if (!symmetric[r][k]) return start[r][k] + i0 * num_keys + j0 * tm;
    return start[r][k] + unit_start(i0 / tile) + (j0 - i0) * tm;
  }
};

// The operands as the products read them: contiguous, in the product dtype.
struct Operands {
  std::vector<at::Tensor> rows, keys;
};

Operands operands(const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& keys, bool half_products) {
  Operands o;
  auto prepare = [&](const at::Tensor& t) {
    return half_products ? t : t.to(compute_dtype(t.scalar_type()));
  };
  for (const auto& t : rows) o.rows.push_back(prepare(t).contiguous());
  // Keys stored row-major or column-major (a queue slice of a (D, K) buffer) are read in place.
  for (const auto& t : keys) {
    at::Tensor key = prepare(t);
    const bool readable = (key.stride(1) == 1 && key.stride(0) >= std::max<int64_t>(1, key.size(1))) ||
                          (key.stride(0) == 1 && key.stride(1) >= std::max<int64_t>(1, key.size(0)));
    o.keys.push_back(readable ? key : key.contiguous());
  }
  return o;
}

// A tile of keys j0 .. j0 + tn as a BLAS operand: its data and leading dimension, and whether the
// (tn x D) tile is stored transposed (column-major).
template <typename in_t>
struct KeyTile {
  const in_t* data;
  int64_t ld;
  bool column_major;
};

template <typename in_t>
KeyTile<in_t> key_tile(const at::Tensor& keys, int64_t j0) {
  const bool column_major = !(keys.stride(1) == 1 && keys.stride(0) >= std::max<int64_t>(1, keys.size(1)));
  const int64_t ld = column_major ? keys.stride(1) : keys.stride(0);
  return {static_cast<const in_t*>(keys.const_data_ptr()) + j0 * keys.stride(0), std::max<int64_t>(ld, 1),
          column_major};
}

// ---------------------------------------------------------------------------------------------
// The logits stash: forward keeps its logits (R x M x total keys, in the accumulation dtype, about
// half of that for a symmetric block: see StashLayout) for
// backward when they fit PNR_KERNELS_CPU_LOGITS_BUDGET_MB (default 16 MiB, all stashes together;
// 0 turns it off) and some input requires a gradient; backward then skips recomputing them (SimCLR-
// PNR: 20 instead of 28 N^2 D FLOPs). Beyond the budget the kernels recompute, so the extra memory
// stays O((rows + keys) x D) at large sizes. The budget is small on purpose: measured on a 2-core
// Emerald Rapids VM, a stash that stays in cache (B = 256: 1-8 MiB) saves 2-20% of a step, one of
// 64 MiB (SimCLR-PNR at B = 1024, NT-Xent at B = 2048, D = 128) costs 10-15% more than the
// recomputation (page faults and DRAM traffic of writing and reading it back). Each (row tile x key
// tile) block of the stash is contiguous, so that the products write it with a short leading
// dimension (rows 16 KiB apart thrash the cache sets). A stash belongs to the lse tensor that
// forward returned (autograd saves it for backward): it is found by lse's storage, the row tile
// and the identity and version of every input, taken by the first backward (a second one
// recomputes), and dropped as soon as its lse has been freed without a backward.
// ---------------------------------------------------------------------------------------------

struct StashKey {
  int64_t row_tile;  // the layout (StashLayout): the row tile and which blocks are symmetric, folded
  std::vector<std::vector<bool>> symmetric, folded;
  std::vector<const void*> data;
  std::vector<int64_t> versions;
  std::vector<bool> exclude_diagonal;
  std::vector<double> scales;
  bool operator==(const StashKey&) const = default;
};

struct Stash {
  c10::weak_intrusive_ptr<c10::StorageImpl> lse;
  StashKey key;
  at::Tensor logits;  // undefined where they did not fit the budget
  at::Tensor folded;  // the folded blocks' row gradients (R x M x D) without scale * g, or undefined
};

std::mutex stash_mutex;
std::vector<Stash>& stashes() {
  static std::vector<Stash> all;
  return all;
}

int64_t stash_budget_bytes() {
  const char* env = std::getenv("PNR_KERNELS_CPU_LOGITS_BUDGET_MB");
  const double mib = env == nullptr ? 16.0 : std::atof(env);
  return static_cast<int64_t>(std::max(0.0, mib) * 1024 * 1024);
}

// The key of the inputs, or nullopt where they cannot be told apart later (inference tensors).
std::optional<StashKey> stash_key(const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& keys,
                                  const std::vector<bool>& exclude_diagonal, const std::vector<double>& scales,
                                  const StashLayout& layout) {
  StashKey key{layout.tile, layout.symmetric, layout.folded, {}, {}, exclude_diagonal, scales};
  for (const auto* list : {&rows, &keys}) {
    for (const auto& t : *list) {
      if (t.is_inference()) return std::nullopt;
      key.data.push_back(t.const_data_ptr());
      key.versions.push_back(t._version());
    }
  }
  return key;
}

// Drops the stashes whose lse is gone; returns the bytes the others hold. Holds stash_mutex.
int64_t prune_stashes() {
  auto& all = stashes();
  all.erase(std::remove_if(all.begin(), all.end(), [](const Stash& s) { return s.lse.expired(); }), all.end());
  int64_t bytes = 0;
  for (const auto& s : all) bytes += s.logits.defined() ? s.logits.nbytes() : 0;
  return bytes;
}

// A logits buffer of numel elements for forward, or an undefined tensor where no input requires a
// gradient or it would not fit the budget.
at::Tensor new_stash(bool any_grad, int64_t numel, at::ScalarType dtype) {
  if (!any_grad) return {};
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t budget = stash_budget_bytes();
  if (numel == 0 || bytes > budget) return {};
  const std::lock_guard<std::mutex> lock(stash_mutex);
  if (prune_stashes() + bytes > budget) return {};
  return at::empty({numel}, at::TensorOptions().dtype(dtype));
}

void keep_stash(const at::Tensor& lse, StashKey key, at::Tensor logits, at::Tensor folded) {
  const std::lock_guard<std::mutex> lock(stash_mutex);
  stashes().push_back(Stash{lse.storage().getWeakStorageImpl(), std::move(key), std::move(logits), std::move(folded)});
}

// Takes the stash of `lse` and these inputs out of the registry: (logits, folded row gradients),
// each undefined where there is none.
std::pair<at::Tensor, at::Tensor> take_stash(const at::Tensor& lse, const std::optional<StashKey>& key) {
  const std::lock_guard<std::mutex> lock(stash_mutex);
  prune_stashes();
  if (!key.has_value()) return {};
  auto& all = stashes();
  for (auto it = all.begin(); it != all.end(); ++it) {
    const auto owner = it->lse.lock();
    if (owner.get() == lse.storage().unsafeGetStorageImpl() && it->key == *key) {
      std::pair<at::Tensor, at::Tensor> taken{std::move(it->logits), std::move(it->folded)};
      all.erase(it);
      return taken;
    }
  }
  return {};
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

// Merges the log-sum-exp statistics (max_b, sum_b) into (max_a, sum_a).
template <typename acc_t>
void merge_stats(acc_t& max_a, acc_t& sum_a, acc_t max_b, acc_t sum_b) {
  const acc_t new_max = std::max(max_a, max_b);
  const acc_t shift = new_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : new_max;
  sum_a = sum_a * std::exp(max_a - shift) + sum_b * std::exp(max_b - shift);
  max_a = new_max;
}

// The key tiles a unit (rows i0 .. i0 + tm) visits in a key block of num_keys keys: every tile of
// kKeyTile keys, or in a symmetric block the square [i0, i0 + tm) and then the tiles after it.
// Calls f(j0, tn) for each.
template <typename F>
void for_each_key_tile(bool symmetric, int64_t i0, int64_t tm, int64_t num_keys, const F& f) {
  int64_t j0 = 0;
  if (symmetric) {
    f(i0, tm);
    j0 = i0 + tm;
  }
  for (; j0 < num_keys; j0 += kKeyTile) f(j0, std::min(kKeyTile, num_keys - j0));
}

// in_t: the product operand type (acc_t itself, or at::BFloat16 / at::Half with acc_t = float).
template <typename acc_t, typename in_t>
void forward_kernel(const Operands& ops, const std::vector<bool>& exclude_diagonal, const std::vector<double>& scales,
                    const StashLayout& layout, at::Tensor& lse, acc_t* stash, acc_t* folded) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t dim = ops.rows[0].size(1), num_rows = ops.rows[0].size(0);
  const int64_t num_sets = ops.rows.size(), num_threads = at::get_num_threads();
  bool any_symmetric = false;
  for (const auto& row : layout.symmetric) {
    for (bool b : row) any_symmetric = any_symmetric || b;
  }
  // Each row's own statistics (max, sum of exp(logit - max)); with symmetric blocks also every
  // thread's column statistics of the keys after its units' squares. Merged into lse at the end.
  std::vector<acc_t> own_max(num_sets * num_rows), own_sum(num_sets * num_rows);
  const int64_t columns = any_symmetric ? num_threads * num_sets * num_rows : 0;
  std::vector<acc_t> column_max(columns, neg_inf), column_sum(columns, acc_t(0));
  struct Scratch {
    std::vector<acc_t> logits, maxima, sums;
    std::vector<in_t> weights;  // the folded blocks' exp(logit - running max)
  };
  auto make_scratch = [&](int64_t tile) {
    const bool own_logits = stash == nullptr || folded != nullptr;
    return Scratch{std::vector<acc_t>(own_logits ? tile * kKeyTile : 0), std::vector<acc_t>(tile),
                   std::vector<acc_t>(tile), std::vector<in_t>(folded != nullptr ? tile * kKeyTile : 0)};
  };
  for_each_row_tile(ops.rows.size(), num_rows, layout.tile, make_scratch,
                    [&](Scratch& s, int64_t r, int64_t i0, int64_t tm) {
    const int64_t thread = accumulator_index(num_threads);
    acc_t* maxima = s.maxima.data();
    acc_t* sums = s.sums.data();
    std::fill(maxima, maxima + tm, neg_inf);
    std::fill(sums, sums + tm, acc_t(0));
    const in_t* a = ptr<in_t>(ops.rows[r]) + i0 * dim;
    const acc_t scale = static_cast<acc_t>(scales[r]);
    // The folded blocks' row gradient of these rows, relative to the running max until the end.
    acc_t* fold = folded != nullptr && layout.folded_set(r) ? folded + (r * num_rows + i0) * dim : nullptr;
    if (fold != nullptr) std::fill(fold, fold + tm * dim, acc_t(0));
    for (size_t k = 0; k < ops.keys.size(); ++k) {
      const int64_t num_keys = ops.keys[k].size(0);
      const bool symmetric = layout.symmetric[r][k];
      const bool fold_block = fold != nullptr && layout.folded[r][k];
      for_each_key_tile(symmetric, i0, tm, num_keys, [&](int64_t j0, int64_t tn) {
        const KeyTile<in_t> kt = key_tile<in_t>(ops.keys[k], j0);
        // Into the stash (kept for backward) when there is one, else into the thread's buffer.
        acc_t* logits = stash == nullptr || fold_block ? s.logits.data()
                                                       : stash + layout.offset(r, k, i0, j0, tm, num_keys);
        const int64_t ld = tn;
        gemm<acc_t, in_t>(false, !kt.column_major, tm, tn, dim, scale, a, dim, kt.data, kt.ld, acc_t(0), logits, ld);
        if (exclude_diagonal[k]) {
          const int64_t first = std::max<int64_t>(0, j0 - i0), last = std::min(tm, j0 + tn - i0);
          for (int64_t i = first; i < last; ++i) logits[i * ld + (i0 + i - j0)] = neg_inf;
        }
        for (int64_t i = 0; i < tm; ++i) {
          const acc_t* x = logits + i * ld;
          const acc_t new_max = std::max(maxima[i], row_max(x, tn));
          // Shift by 0 where every logit so far is -inf, so that -inf - -inf never makes a NaN.
          const acc_t shift = new_max == neg_inf ? acc_t(0) : new_max;
          const acc_t rescale = std::exp(maxima[i] - shift);
          // A folded block keeps the weights exp(logit - shift) for the row gradient (masked
          // logits are -inf: their weights are 0).
          sums[i] = sums[i] * rescale +
                    (fold_block ? exp_shift(x, tn, shift, s.weights.data() + i * tn) : sum_exp(x, tn, shift));
          if (fold != nullptr && rescale != acc_t(1)) {  // the earlier tiles' part, moved to the new shift
            for (int64_t d = 0; d < dim; ++d) fold[i * dim + d] *= rescale;
          }
          maxima[i] = new_max;
        }
        if (fold_block) {
          gemm<acc_t, in_t>(false, kt.column_major, tm, dim, tn, acc_t(1), s.weights.data(), tn, kt.data, kt.ld,
                            acc_t(1), fold, dim);
        }
        if (symmetric && j0 > i0) {
          const int64_t at = (thread * num_sets + r) * num_rows + j0;
          column_stats(logits, tm, tn, column_max.data() + at, column_sum.data() + at);
        }
      });
    }
    std::copy(maxima, maxima + tm, own_max.begin() + r * num_rows + i0);
    std::copy(sums, sums + tm, own_sum.begin() + r * num_rows + i0);
  });
  acc_t* lse_data = lse.data_ptr<acc_t>();
  at::parallel_for(0, num_sets * num_rows, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t m = own_max[i], total = own_sum[i];
      for (int64_t t = 0; t < num_threads && columns > 0; ++t) {
        merge_stats(m, total, column_max[t * num_sets * num_rows + i], column_sum[t * num_sets * num_rows + i]);
      }
      lse_data[i] = m + std::log(total);
      // The folded row gradient was accumulated relative to the row's own shift: weights
      // exp(logit - lse) from here (a row with no key at all, lse = -inf, has none).
      if (folded != nullptr && layout.folded_set(i / num_rows)) {
        const acc_t own = own_max[i] == neg_inf ? acc_t(0) : own_max[i];
        const acc_t factor = lse_data[i] == neg_inf ? acc_t(0) : std::exp(own - lse_data[i]);
        acc_t* row = folded + i * dim;
        for (int64_t d = 0; d < dim; ++d) row[d] *= factor;
      }
    }
  });
}

template <typename acc_t, typename in_t>
void backward_kernel(const at::Tensor& grad_lse, const at::Tensor& lse, const Operands& ops,
                     const std::vector<bool>& exclude_diagonal, const std::vector<double>& scales,
                     const std::vector<bool>& rows_need_grad, const std::vector<bool>& keys_need_grad,
                     const StashLayout& layout, std::vector<at::Tensor>& rows_grad,
                     std::vector<std::vector<at::Tensor>>& keys_grad_per_thread, acc_t grad_scale, acc_t* stash,
                     const acc_t* folded) {
  const auto& symmetric = layout.symmetric;
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const int64_t dim = ops.rows[0].size(1), num_rows = ops.rows[0].size(0);
  const int64_t num_threads = at::get_num_threads();
  const acc_t* lse_data = lse.const_data_ptr<acc_t>();
  const acc_t* g_data = grad_lse.const_data_ptr<acc_t>();
  const auto acc_options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // Per row: the exp shift (lse, or +inf for a row with no key at all, whose weights are then 0)
  // and scale * g, read along the keys of symmetric blocks.
  std::vector<acc_t> shifts(lse.numel()), scaled_g(lse.numel());
  for (int64_t r = 0; r < lse.size(0); ++r) {
    for (int64_t i = 0; i < num_rows; ++i) {
      const acc_t l = lse_data[r * num_rows + i];
      shifts[r * num_rows + i] = l == -inf ? inf : l;
      scaled_g[r * num_rows + i] = static_cast<acc_t>(scales[r]) * g_data[r * num_rows + i];
    }
  }
  struct Scratch {
    std::vector<acc_t> logits;
    std::vector<in_t> weights, scaled_rows;  // weights: only for half products
  };
  auto make_scratch = [&](int64_t tile) {
    Scratch s;
    if (stash == nullptr) s.logits.resize(tile * kKeyTile);
    if constexpr (!std::is_same_v<acc_t, in_t>) s.weights.resize(tile * kKeyTile);
    s.scaled_rows.resize(tile * dim);
    return s;
  };
  for_each_row_tile(ops.rows.size(), num_rows, layout.tile, make_scratch,
                    [&](Scratch& s, int64_t r, int64_t i0, int64_t tm) {
    const int64_t thread = accumulator_index(num_threads);
    const in_t* a = ptr<in_t>(ops.rows[r]) + i0 * dim;
    const acc_t scale = static_cast<acc_t>(scales[r]);
    const acc_t* g = g_data + r * num_rows + i0;
    const acc_t* row_shift = shifts.data() + r * num_rows + i0;
    bool any_key_grad = false;
    for (size_t k = 0; k < ops.keys.size(); ++k) {
      any_key_grad = any_key_grad || (keys_need_grad[k] && !symmetric[r][k]);  // symmetric: no key product
    }
    if (any_key_grad) {  // scale * g * rows / grad_scale, the right operand of the key gradient
      for (int64_t i = 0; i < tm; ++i) {
        const acc_t factor = scale * g[i] / grad_scale;
        for (int64_t d = 0; d < dim; ++d) {
          s.scaled_rows[i * dim + d] = static_cast<in_t>(static_cast<acc_t>(a[i * dim + d]) * factor);
        }
      }
    }
    // The folded blocks (forward accumulated their row side, see folded_blocks) are skipped.
    const bool use_folded = folded != nullptr && layout.folded_set(r);
    acc_t* row_grad = nullptr;
    if (rows_need_grad[r]) {
      row_grad = rows_grad[r].data_ptr<acc_t>() + i0 * dim;
      if (use_folded) {
        const acc_t* from = folded + (r * num_rows + i0) * dim;
        std::copy(from, from + tm * dim, row_grad);
      } else {
        std::fill(row_grad, row_grad + tm * dim, acc_t(0));
      }
    }
    // Key block k's tiles: the ordinary blocks, whose row gradient is scaled by scale * g[i] once
    // they are all in, then the symmetric ones, whose weights carry that factor.
    auto block = [&](size_t k) {
      const bool sym = symmetric[r][k];
      const int64_t num_keys = ops.keys[k].size(0);
      for_each_key_tile(sym, i0, tm, num_keys, [&](int64_t j0, int64_t tn) {
        const KeyTile<in_t> kt = key_tile<in_t>(ops.keys[k], j0);
        // The forward's logits from the stash, else recomputed into the thread's buffer.
        acc_t* logits = stash == nullptr ? s.logits.data() : stash + layout.offset(r, k, i0, j0, tm, num_keys);
        const int64_t ld = tn;
        if (stash == nullptr) {
          gemm<acc_t, in_t>(false, !kt.column_major, tm, tn, dim, scale, a, dim, kt.data, kt.ld, acc_t(0), logits, ld);
        }
        in_t* weights;
        int64_t ldw;
        if constexpr (std::is_same_v<acc_t, in_t>) {
          weights = logits;  // in place
          ldw = ld;
        } else {
          weights = s.weights.data();
          ldw = tn;
        }
        for (int64_t i = 0; i < tm; ++i) {
          if constexpr (std::is_same_v<acc_t, in_t>) {
            if (sym) {
              const acc_t* key_shift = shifts.data() + r * num_rows + j0;
              const acc_t* key_g = scaled_g.data() + r * num_rows + j0;
              symmetric_weights(logits + i * ld, tn, row_shift[i], scale * g[i], key_shift, key_g, weights + i * ldw);
              continue;
            }
          }
          exp_shift(logits + i * ld, tn, row_shift[i], weights + i * ldw);
        }
        if (exclude_diagonal[k]) {
          const int64_t first = std::max<int64_t>(0, j0 - i0), last = std::min(tm, j0 + tn - i0);
          for (int64_t i = first; i < last; ++i) weights[i * ldw + (i0 + i - j0)] = in_t(0);
        }
        if (rows_need_grad[r]) {
          gemm<acc_t, in_t>(false, kt.column_major, tm, dim, tn, acc_t(1), weights, ldw, kt.data, kt.ld, acc_t(1), row_grad,
                            dim);
        }
        // The key side: scale * g * rows for an ordinary block; in a symmetric block the weights
        // carry g, and the square's key side is its row side.
        if (keys_need_grad[k] && !(sym && j0 == i0)) {
          at::Tensor& accumulator = keys_grad_per_thread[k][thread];
          if (!accumulator.defined()) accumulator = at::zeros(ops.keys[k].sizes(), acc_options);
          gemm<acc_t, in_t>(true, false, tn, dim, tm, acc_t(1), weights, ldw, sym ? a : s.scaled_rows.data(), dim,
                            acc_t(1), accumulator.data_ptr<acc_t>() + j0 * dim, dim);
        }
      });
    };
    for (size_t k = 0; k < ops.keys.size(); ++k) {
      if ((rows_need_grad[r] || keys_need_grad[k]) && !symmetric[r][k] && !(use_folded && layout.folded[r][k])) {
        block(k);
      }
    }
    if (row_grad != nullptr) {
      for (int64_t i = 0; i < tm; ++i) {
        const acc_t factor = scale * g[i];
        for (int64_t d = 0; d < dim; ++d) row_grad[i * dim + d] *= factor;
      }
    }
    for (size_t k = 0; k < ops.keys.size(); ++k) {
      if (symmetric[r][k] && rows_need_grad[r]) block(k);
    }
  });
}

// Calls f(acc_t{}, in_t{}) with the accumulation and product types of the inputs.
template <typename F>
void dispatch_types(at::ScalarType input, bool half_products, const F& f) {
  if (input == at::kDouble) return f(double{}, double{});
  if (half_products && input == at::kBFloat16) return f(float{}, at::BFloat16{});
  if (half_products && input == at::kHalf) return f(float{}, at::Half{});
  return f(float{}, float{});
}

// ---------------------------------------------------------------------------------------------
// The cross pair (CaSSLe's two directions, docs/losses.md section 5). With S = scale a b^T
// (M x M'), both directions' log-sum-exps come from one pass over S,
//   lse[i]     = LSE_j S[i, j]    (a's rows against b's keys)
//   lse[M + j] = LSE_i S[i, j]    (b's rows against a's keys: the same logits, transposed)
// and, with g the gradient of lse, both directions' softmax weights add up in one matrix,
//   W[i, j] = g[i] exp(S[i, j] - lse[i]) + g[M + j] exp(S[i, j] - lse[M + j]),
//   d a = scale W b,   d b = scale W^T a,
// so a step costs two products of M M' D multiply-adds (the op called once per direction costs
// four: S twice, and a's gradient in two products). The units are a's row tiles; each unit keeps
// its rows' statistics (the online log-sum-exp) and merges its tiles' column statistics into its
// thread's (as a symmetric block's forward does), merged over the threads at the end. Products
// in float32 (half inputs are converted, O((M + M') D)) or float64. The logits are stashed for
// backward under the op's budget, in the general layout (each unit's tiles contiguous, tm x tn),
// keyed with empty block flags (no multi-key call has those).
// ---------------------------------------------------------------------------------------------

std::optional<StashKey> cross_stash_key(const at::Tensor& a, const at::Tensor& b, double scale, int64_t tile) {
  if (a.is_inference() || b.is_inference()) return std::nullopt;
  return StashKey{tile, {}, {}, {a.const_data_ptr(), b.const_data_ptr()}, {a._version(), b._version()}, {}, {scale}};
}

template <typename acc_t>
void cross_forward_kernel(const at::Tensor& a, const at::Tensor& b, acc_t scale, int64_t tile, acc_t* lse,
                          acc_t* stash) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t dim = a.size(1), num_rows = a.size(0), num_keys = b.size(0), num_threads = at::get_num_threads();
  std::vector<acc_t> column_max(num_threads * num_keys, neg_inf), column_sum(num_threads * num_keys, acc_t(0));
  struct Scratch {
    std::vector<acc_t> logits, maxima, sums;
  };
  auto make_scratch = [&](int64_t tile) {
    return Scratch{std::vector<acc_t>(stash == nullptr ? tile * kKeyTile : 0), std::vector<acc_t>(tile),
                   std::vector<acc_t>(tile)};
  };
  for_each_row_tile(1, num_rows, tile, make_scratch, [&](Scratch& s, int64_t, int64_t i0, int64_t tm) {
    const int64_t thread = accumulator_index(num_threads);
    acc_t* maxima = s.maxima.data();
    acc_t* sums = s.sums.data();
    std::fill(maxima, maxima + tm, neg_inf);
    std::fill(sums, sums + tm, acc_t(0));
    for (int64_t j0 = 0; j0 < num_keys; j0 += kKeyTile) {
      const int64_t tn = std::min(kKeyTile, num_keys - j0);
      acc_t* logits = stash == nullptr ? s.logits.data() : stash + i0 * num_keys + j0 * tm;
      gemm<acc_t, acc_t>(false, true, tm, tn, dim, scale, ptr<acc_t>(a) + i0 * dim, dim, ptr<acc_t>(b) + j0 * dim,
                         dim, acc_t(0), logits, tn);
      for (int64_t i = 0; i < tm; ++i) {
        const acc_t* x = logits + i * tn;
        const acc_t new_max = std::max(maxima[i], row_max(x, tn));
        const acc_t shift = new_max == neg_inf ? acc_t(0) : new_max;  // -inf - -inf would make a NaN
        sums[i] = sums[i] * std::exp(maxima[i] - shift) + sum_exp(x, tn, shift);
        maxima[i] = new_max;
      }
      column_stats(logits, tm, tn, column_max.data() + thread * num_keys + j0,
                   column_sum.data() + thread * num_keys + j0);
    }
    for (int64_t i = 0; i < tm; ++i) lse[i0 + i] = maxima[i] + std::log(sums[i]);
  });
  at::parallel_for(0, num_keys, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t m = column_max[j], total = column_sum[j];
      for (int64_t t = 1; t < num_threads; ++t) merge_stats(m, total, column_max[t * num_keys + j], column_sum[t * num_keys + j]);
      lse[num_rows + j] = m + std::log(total);
    }
  });
}

// d a (M x D) and d b's per-thread parts, without the factor scale; `stash` (the forward's logits
// or nullptr) is overwritten with the weights.
template <typename acc_t>
void cross_backward_kernel(const acc_t* g, const acc_t* lse, const at::Tensor& a, const at::Tensor& b, acc_t scale,
                           int64_t tile, acc_t* stash, acc_t* a_grad, std::vector<at::Tensor>* b_grad_per_thread) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const int64_t dim = a.size(1), num_rows = a.size(0), num_keys = b.size(0), num_threads = at::get_num_threads();
  // The exp shifts: lse, or +inf for a row or key with nothing to sum (lse = -inf: weights 0).
  std::vector<acc_t> shifts(lse, lse + num_rows + num_keys);
  for (acc_t& s : shifts) s = s == -inf ? inf : s;
  const acc_t* key_shift = shifts.data() + num_rows;
  const acc_t* key_g = g + num_rows;
  auto make_scratch = [&](int64_t tile) { return std::vector<acc_t>(stash == nullptr ? tile * kKeyTile : 0); };
  for_each_row_tile(1, num_rows, tile, make_scratch,
                    [&](std::vector<acc_t>& buffer, int64_t, int64_t i0, int64_t tm) {
    const int64_t thread = accumulator_index(num_threads);
    const acc_t* rows = ptr<acc_t>(a) + i0 * dim;
    acc_t* row_grad = a_grad == nullptr ? nullptr : a_grad + i0 * dim;
    if (row_grad != nullptr) std::fill(row_grad, row_grad + tm * dim, acc_t(0));
    for (int64_t j0 = 0; j0 < num_keys; j0 += kKeyTile) {
      const int64_t tn = std::min(kKeyTile, num_keys - j0);
      const acc_t* keys = ptr<acc_t>(b) + j0 * dim;
      acc_t* w = stash == nullptr ? buffer.data() : stash + i0 * num_keys + j0 * tm;
      if (stash == nullptr) gemm<acc_t, acc_t>(false, true, tm, tn, dim, scale, rows, dim, keys, dim, acc_t(0), w, tn);
      for (int64_t i = 0; i < tm; ++i) {
        symmetric_weights(w + i * tn, tn, shifts[i0 + i], g[i0 + i], key_shift + j0, key_g + j0, w + i * tn);
      }
      if (row_grad != nullptr) gemm<acc_t, acc_t>(false, false, tm, dim, tn, acc_t(1), w, tn, keys, dim, acc_t(1), row_grad, dim);
      if (b_grad_per_thread != nullptr) {
        at::Tensor& accumulator = (*b_grad_per_thread)[thread];
        if (!accumulator.defined()) accumulator = at::zeros(b.sizes(), b.options());
        gemm<acc_t, acc_t>(true, false, tn, dim, tm, acc_t(1), w, tn, rows, dim, acc_t(1),
                           accumulator.data_ptr<acc_t>() + j0 * dim, dim);
      }
    }
  });
}

}  // namespace

at::Tensor infonce_forward_cpu(const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& keys,
                               const std::vector<bool>& exclude_diagonal, const std::vector<double>& scales,
                               const std::vector<bool>& rows_grad, const std::vector<bool>& keys_grad) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType input = rows[0].scalar_type();
  const bool half_products = use_half_products(input);
  const Operands ops = operands(rows, keys, half_products);
  at::Tensor lse = at::empty({static_cast<int64_t>(rows.size()), rows[0].size(0)},
                             rows[0].options().dtype(compute_dtype(input)));
  const StashLayout layout(rows, keys, symmetric_blocks(rows, keys, rows_grad, keys_grad, half_products), rows_grad,
                           keys_grad);
  const std::optional<StashKey> key = stash_key(rows, keys, exclude_diagonal, scales, layout);
  bool any_grad = false;
  for (const auto* flags : {&rows_grad, &keys_grad}) {
    for (bool need : *flags) any_grad = any_grad || need;
  }
  at::Tensor stash = key.has_value() ? new_stash(any_grad, layout.total, lse.scalar_type()) : at::Tensor();
  // Without a key (inference tensors) backward could not find the folded gradients: none then.
  // (R x M x D, at least one element so that its pointer is never null: the kernels and the
  // stash layout must agree on whether it exists.)
  at::Tensor folded =
      key.has_value() && layout.any_folded()
          ? at::empty({std::max<int64_t>(1, static_cast<int64_t>(rows.size()) * rows[0].size(0) * rows[0].size(1))},
                      lse.options())
          : at::Tensor();
  dispatch_types(input, half_products, [&](auto acc, auto in) {
    using acc_t = decltype(acc);
    forward_kernel<acc_t, decltype(in)>(ops, exclude_diagonal, scales, layout, lse,
                                        stash.defined() ? stash.data_ptr<acc_t>() : nullptr,
                                        folded.defined() ? folded.data_ptr<acc_t>() : nullptr);
  });
  if (stash.defined() || folded.defined()) keep_stash(lse, *key, std::move(stash), std::move(folded));
  return lse;
}

std::vector<at::Tensor> infonce_backward_cpu(const at::Tensor& grad_lse, const at::Tensor& lse,
                                             const std::vector<at::Tensor>& rows,
                                             const std::vector<at::Tensor>& keys,
                                             const std::vector<bool>& exclude_diagonal,
                                             const std::vector<double>& scales,
                                             const std::vector<bool>& rows_need_grad,
                                             const std::vector<bool>& keys_need_grad) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType input = rows[0].scalar_type();
  const bool half_products = use_half_products(input);
  // Forward chose the same layout from the same need flags.
  const StashLayout layout(rows, keys, symmetric_blocks(rows, keys, rows_need_grad, keys_need_grad, half_products),
                           rows_need_grad, keys_need_grad);
  auto [stash, folded] = take_stash(lse, stash_key(rows, keys, exclude_diagonal, scales, layout));
  const Operands ops = operands(rows, keys, half_products);
  const auto options = rows[0].options().dtype(compute_dtype(input));
  const at::Tensor grad_c = grad_lse.to(options.dtype()).contiguous(), lse_c = lse.to(options.dtype()).contiguous();
  std::vector<at::Tensor> rows_grad(rows.size());
  std::vector<std::vector<at::Tensor>> keys_grad_per_thread(keys.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    if (rows_need_grad[r]) rows_grad[r] = at::empty(rows[r].sizes(), options);
  }
  for (size_t k = 0; k < keys.size(); ++k) {
    if (keys_need_grad[k]) {
      keys_grad_per_thread[k].resize(at::get_num_threads());
      keys_grad_per_thread[k][0] = at::zeros(keys[k].sizes(), options);
    }
  }
  // Half products round scale * g * rows: divide by the largest finite |g| first (1 otherwise).
  double grad_scale = 1;
  if (half_products) {
    const at::Tensor finite = grad_c.abs().nan_to_num(0, 0, 0);
    const double largest = finite.numel() > 0 ? finite.max().item<double>() : 0;
    if (largest > 0) grad_scale = largest;
  }
  dispatch_types(input, half_products, [&](auto acc, auto in) {
    using acc_t = decltype(acc);
    backward_kernel<acc_t, decltype(in)>(grad_c, lse_c, ops, exclude_diagonal, scales, rows_need_grad,
                                         keys_need_grad, layout, rows_grad, keys_grad_per_thread,
                                         static_cast<acc_t>(grad_scale),
                                         stash.defined() ? stash.data_ptr<acc_t>() : nullptr,
                                         folded.defined() ? folded.const_data_ptr<acc_t>() : nullptr);
  });
  std::vector<at::Tensor> grads;
  for (size_t r = 0; r < rows.size(); ++r) {
    if (rows_need_grad[r]) grads.push_back(rows_grad[r].to(rows[r].scalar_type()));
  }
  for (size_t k = 0; k < keys.size(); ++k) {
    if (!keys_need_grad[k]) continue;
    at::Tensor& total = keys_grad_per_thread[k][0];
    for (size_t thread = 1; thread < keys_grad_per_thread[k].size(); ++thread) {
      if (keys_grad_per_thread[k][thread].defined()) total.add_(keys_grad_per_thread[k][thread]);
    }
    if (grad_scale != 1) total.mul_(grad_scale);
    grads.push_back(total.to(keys[k].scalar_type()));
  }
  return grads;
}

at::Tensor infonce_cross_forward_cpu(const at::Tensor& a, const at::Tensor& b, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = compute_dtype(a.scalar_type());
  const at::Tensor a_c = a.to(acc).contiguous(), b_c = b.to(acc).contiguous();
  at::Tensor lse = at::empty({a.size(0) + b.size(0)}, a.options().dtype(acc));
  const int64_t tile = row_tile(1, a.size(0), false);
  const std::optional<StashKey> key = cross_stash_key(a, b, scale, tile);
  at::Tensor stash = key.has_value() ? new_stash(a.requires_grad() || b.requires_grad(), a.size(0) * b.size(0), acc)
                                     : at::Tensor();
  dispatch_types(a.scalar_type(), false, [&](auto acc_value, auto) {
    using acc_t = decltype(acc_value);
    cross_forward_kernel<acc_t>(a_c, b_c, static_cast<acc_t>(scale), tile, lse.data_ptr<acc_t>(),
                                stash.defined() ? stash.data_ptr<acc_t>() : nullptr);
  });
  if (stash.defined()) keep_stash(lse, *key, std::move(stash), at::Tensor());
  return lse;
}

std::vector<at::Tensor> infonce_cross_backward_cpu(const at::Tensor& grad_lse, const at::Tensor& lse,
                                                   const at::Tensor& a, const at::Tensor& b, double scale,
                                                   bool a_needs_grad, bool b_needs_grad) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = compute_dtype(a.scalar_type());
  const int64_t tile = row_tile(1, a.size(0), false);  // the forward's, which laid out the stash
  at::Tensor stash = take_stash(lse, cross_stash_key(a, b, scale, tile)).first;
  const at::Tensor a_c = a.to(acc).contiguous(), b_c = b.to(acc).contiguous();
  const at::Tensor g = grad_lse.to(acc).contiguous(), lse_c = lse.to(acc).contiguous();
  at::Tensor a_grad = a_needs_grad ? at::empty(a_c.sizes(), a_c.options()) : at::Tensor();
  std::vector<at::Tensor> b_grad_per_thread(b_needs_grad ? at::get_num_threads() : 0);
  if (b_needs_grad) b_grad_per_thread[0] = at::zeros(b_c.sizes(), b_c.options());
  dispatch_types(a.scalar_type(), false, [&](auto acc_value, auto) {
    using acc_t = decltype(acc_value);
    cross_backward_kernel<acc_t>(g.const_data_ptr<acc_t>(), lse_c.const_data_ptr<acc_t>(), a_c, b_c,
                                 static_cast<acc_t>(scale), tile, stash.defined() ? stash.data_ptr<acc_t>() : nullptr,
                                 a_needs_grad ? a_grad.data_ptr<acc_t>() : nullptr,
                                 b_needs_grad ? &b_grad_per_thread : nullptr);
  });
  std::vector<at::Tensor> grads;
  if (a_needs_grad) grads.push_back(a_grad.mul_(scale).to(a.scalar_type()));
  if (b_needs_grad) {
    at::Tensor& total = b_grad_per_thread[0];
    for (size_t t = 1; t < b_grad_per_thread.size(); ++t) {
      if (b_grad_per_thread[t].defined()) total.add_(b_grad_per_thread[t]);
    }
    grads.push_back(total.mul_(scale).to(b.scalar_type()));
  }
  return grads;
}

}  // namespace pnr_kernels
