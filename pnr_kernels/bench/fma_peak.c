// The CPU's vector multiply-add throughput, built and run by `pnr-bench` (pnr_kernels/bench/limits.py)
// to get the FLOP limit its percent-of-limit divides by:
//
//     fma_peak THREADS STEPS    ->  {"isa": "avx512", "threads": T, "float32": GFLOP/s, ...}
//
// T threads start together at a barrier; each runs STEPS iterations of CHAINS independent
// multiply-add chains (enough to cover the instruction's latency on every FMA port, so the loop
// measures throughput), and the rate is all threads' FLOPs over the slowest thread's time, the
// best of 3 rounds. A multiply-add counts 2 FLOPs. Instructions: vfmadd231ps/pd (float32/64, 16/8
// lanes with AVX-512, 8/4 with AVX2+FMA) and vdpbf16ps (AVX512-BF16: 32 bf16 products summed in
// pairs into 16 float32 accumulators, 64 FLOPs). benchmarks/cpu_fma_throughput.c is the
// single-core version of the same loops, with fp16. Prints {} on a CPU without these instructions.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static long steps = 1000000L;

#if defined(__x86_64__)
#include <immintrin.h>

// The empty asm makes x and y opaque, so that no iteration can be folded away; the volatile sink
// keeps the accumulators alive.
#define RUN(CHAINS, TYPE, INIT, STEP, REDUCE)                                  \
  TYPE acc[CHAINS];                                                            \
  for (int c = 0; c < CHAINS; ++c) acc[c] = INIT(c);                           \
  for (long i = 0; i < steps; ++i) {                                           \
    __asm__ volatile("" : "+v"(x), "+v"(y));                                   \
    _Pragma("GCC unroll 20") for (int c = 0; c < CHAINS; ++c) acc[c] = STEP;   \
  }                                                                            \
  volatile double sink = 0;                                                    \
  for (int c = 0; c < CHAINS; ++c) sink += REDUCE(acc[c]);                     \
  (void)sink;

#define SET512_PS(c) _mm512_set1_ps((float)(c))
#define SET512_PD(c) _mm512_set1_pd((double)(c))
#define SET256_PS(c) _mm256_set1_ps((float)(c))
#define SET256_PD(c) _mm256_set1_pd((double)(c))
__attribute__((target("avx2,fma"))) static inline float first256_ps(__m256 v) { return _mm256_cvtss_f32(v); }
__attribute__((target("avx2,fma"))) static inline double first256_pd(__m256d v) { return _mm256_cvtsd_f64(v); }

__attribute__((target("avx512f"))) static void fp32_avx512(void) {
  __m512 x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(1e-9f);
  RUN(20, __m512, SET512_PS, _mm512_fmadd_ps(x, y, acc[c]), _mm512_reduce_add_ps)
}
__attribute__((target("avx512f"))) static void fp64_avx512(void) {
  __m512d x = _mm512_set1_pd(1.0), y = _mm512_set1_pd(1e-9);
  RUN(20, __m512d, SET512_PD, _mm512_fmadd_pd(x, y, acc[c]), _mm512_reduce_add_pd)
}
__attribute__((target("avx512f,avx512bf16"))) static void bf16_avx512(void) {
  __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3000);
  RUN(20, __m512, SET512_PS, _mm512_dpbf16_ps(acc[c], x, y), _mm512_reduce_add_ps)
}
__attribute__((target("avx2,fma"))) static void fp32_avx2(void) {
  __m256 x = _mm256_set1_ps(1.0f), y = _mm256_set1_ps(1e-9f);
  RUN(10, __m256, SET256_PS, _mm256_fmadd_ps(x, y, acc[c]), first256_ps)
}
__attribute__((target("avx2,fma"))) static void fp64_avx2(void) {
  __m256d x = _mm256_set1_pd(1.0), y = _mm256_set1_pd(1e-9);
  RUN(10, __m256d, SET256_PD, _mm256_fmadd_pd(x, y, acc[c]), first256_pd)
}
#endif

typedef struct {
  void (*loop)(void);
  pthread_barrier_t* barrier;
  double seconds;
} Job;

static void* worker(void* arg) {
  Job* job = (Job*)arg;
  pthread_barrier_wait(job->barrier);
  double start = now();
  job->loop();
  job->seconds = now() - start;
  return NULL;
}

// GFLOP/s of `loop` (flops_per_step FLOPs an iteration) on `threads` threads, best of 3 rounds.
static double measure(void (*loop)(void), double flops_per_step, int threads) {
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, (unsigned)threads);
    pthread_t* ids = malloc(sizeof(pthread_t) * threads);
    Job* jobs = malloc(sizeof(Job) * threads);
    for (int t = 0; t < threads; ++t) {
      jobs[t] = (Job){loop, &barrier, 0};
      pthread_create(&ids[t], NULL, worker, &jobs[t]);
    }
    double slowest = 0;
    for (int t = 0; t < threads; ++t) {
      pthread_join(ids[t], NULL);
      if (jobs[t].seconds > slowest) slowest = jobs[t].seconds;
    }
    pthread_barrier_destroy(&barrier);
    free(ids);
    free(jobs);
    double rate = threads * steps * flops_per_step / slowest / 1e9;
    if (rate > best) best = rate;
  }
  return best;
}

int main(int argc, char** argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  if (argc > 2) steps = atol(argv[2]);
  if (threads < 1 || steps < 1) {
    fprintf(stderr, "usage: fma_peak THREADS STEPS (both at least 1)\n");
    return 2;
  }
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    printf("{\"isa\": \"avx512\", \"threads\": %d, \"float32\": %.3f, \"float64\": %.3f", threads,
           measure(fp32_avx512, 20 * 32, threads), measure(fp64_avx512, 20 * 16, threads));
    if (__builtin_cpu_supports("avx512bf16")) printf(", \"bfloat16\": %.3f", measure(bf16_avx512, 20 * 64, threads));
    printf("}\n");
    return 0;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    printf("{\"isa\": \"avx2\", \"threads\": %d, \"float32\": %.3f, \"float64\": %.3f}\n", threads,
           measure(fp32_avx2, 10 * 16, threads), measure(fp64_avx2, 10 * 8, threads));
    return 0;
  }
#endif
  printf("{}\n");
  return 0;
}
