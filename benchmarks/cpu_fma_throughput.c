// Peak single-core throughput of the CPU's vector multiply-add instructions, to tell whether
// half-precision products can beat float32 on this machine (docs/benchmarks.md, "CPU bfloat16 and
// float16"). Each loop keeps 20 independent accumulators busy, so it measures throughput, not
// latency; FLOPs count a multiply-add as 2.
//
//     gcc -O2 -o /tmp/cpu_fma_throughput benchmarks/cpu_fma_throughput.c && /tmp/cpu_fma_throughput
//
// vfmadd231ps: 16 float32 multiply-adds. vdpbf16ps (AVX512-BF16): 32 bf16 products summed in
// pairs into 16 float32 accumulators. vfmadd231ph (AVX512-FP16): 32 fp16 multiply-adds that also
// accumulate in fp16 (there is no fp16 -> fp32 dot-product instruction before AVX10.2).
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 20
#define STEPS 10000000L

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// The empty asm makes x and y opaque, so that no iteration can be folded away.
#define RUN(TYPE, INIT, STEP, FLOPS_PER_OP, REDUCE)                      \
  TYPE acc[CHAINS];                                                     \
  for (int c = 0; c < CHAINS; ++c) acc[c] = INIT(c);                    \
  double start = now();                                                 \
  for (long i = 0; i < STEPS; ++i) {                                    \
    __asm__ volatile("" : "+v"(x), "+v"(y));                            \
    _Pragma("GCC unroll 20") for (int c = 0; c < CHAINS; ++c) acc[c] = STEP; \
  }                                                                     \
  double seconds = now() - start;                                       \
  volatile float sink = 0;                                              \
  for (int c = 0; c < CHAINS; ++c) sink += REDUCE(acc[c]);              \
  (void)sink;                                                           \
  return STEPS * CHAINS * (double)(FLOPS_PER_OP) / seconds / 1e9;

#define SET_PS(c) _mm512_set1_ps((float)(c))
#define SET_PH(c) _mm512_set1_ph((_Float16)(c))
#define REDUCE_PH(v) (float)_mm512_reduce_add_ph(v)

__attribute__((target("avx512f"))) static double fp32_fma(void) {
  __m512 x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(1e-9f);
  RUN(__m512, SET_PS, _mm512_fmadd_ps(x, y, acc[c]), 32, _mm512_reduce_add_ps)
}

__attribute__((target("avx512f,avx512bf16"))) static double bf16_dot(void) {
  __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3000);
  RUN(__m512, SET_PS, _mm512_dpbf16_ps(acc[c], x, y), 64, _mm512_reduce_add_ps)
}

__attribute__((target("avx512f,avx512fp16"))) static double fp16_fma(void) {
  __m512h x = _mm512_set1_ph(1.0f), y = _mm512_set1_ph(1e-4f);
  RUN(__m512h, SET_PH, _mm512_fmadd_ph(x, y, acc[c]), 64, REDUCE_PH)
}

int main(void) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f")) {
    printf("no AVX-512F\n");
    return 0;
  }
  for (int round = 0; round < 3; ++round) {
    printf("single core GFLOP/s: float32 vfmadd231ps %.0f", fp32_fma());
    if (__builtin_cpu_supports("avx512bf16")) printf(" | bf16 vdpbf16ps %.0f", bf16_dot());
    if (__builtin_cpu_supports("avx512fp16")) printf(" | fp16 vfmadd231ph %.0f", fp16_fma());
    printf("\n");
  }
  return 0;
}
