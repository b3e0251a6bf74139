/* The machine's float32 FMA peak: every core runs independent AVX-512 FMA chains and nothing
 * else, so GFLOP/s here is the ceiling for any matrix product on these cores.
 *
 *   gcc -O2 -mavx512f -fopenmp tools/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *
 * Prints the best of five runs (OMP_NUM_THREADS sets the cores; default: all).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

int main(void) {
  const long steps = 100000000;  /* FMA rounds per run, shared by the threads */
  double best = 0;
  for (int run = 0; run < 5; ++run) {
    float sink = 0;
    const double start = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
    {
      /* 12 chains: enough to cover the FMA latency on both pipes. */
      __m512 acc[12];
      const __m512 scale = _mm512_set1_ps(0.999999f), shift = _mm512_set1_ps(1e-7f);
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps((float)i);
      const long mine = steps / omp_get_num_threads();
      for (long s = 0; s < mine; ++s) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], scale, shift);
      }
      __m512 total = acc[0];
      for (int i = 1; i < 12; ++i) total = _mm512_add_ps(total, acc[i]);
      sink += _mm512_reduce_add_ps(total);
    }
    const double seconds = omp_get_wtime() - start;
    const double flops = (double)steps * 12 * 16 * 2;
    if (flops / seconds > best) best = flops / seconds;
    if (sink == 12345.0f) printf(" ");  /* keep the chains alive */
  }
  printf("%d threads: %.0f GFLOP/s float32 FMA peak\n", omp_get_max_threads(), best / 1e9);
  return 0;
}
