/* genserve's row-by-row linear kernel: y = x W^T for the few rows of a decode step.
 *
 * Why it exists: a decode step reads every weight once per token, so its linears should run
 * at the memory's read bandwidth. On the 2-core AMX Xeon this project is measured on, torch's
 * own kernels did not: aten._weight_int8pack_mm read int8 weights at 7-10 GB/s, oneDNN and
 * F.linear read bf16 weights at 6-12 GB/s, where one pass summing a large buffer ran at
 * 14-16 GB/s. This file streams each weight row once, four rows at a time, with the block
 * two ahead prefetched into L2, and sums in float32. Which kernel runs for which row count is
 * still measured at start-up (hardware.py): a candidate, kept only where it is faster.
 *
 * A row's result never depends on the other rows of the call (each row is summed alone, in
 * the same order), so the kernel is batch-invariant by construction.
 *
 * Built on the machine that runs it (gemv.py: cc -O3 -march=native -fopenmp), so the
 * AVX-512 paths are compiled only where the CPU has them; elsewhere the plain loops are
 * vectorised by the compiler for what the CPU has. OpenMP is the runtime torch already
 * loaded (same soname), so this shares torch's threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GEMV_AVX512 1
#endif

#define BLOCK 4 /* weight rows per pass: four independent streams and accumulators */
#define AHEAD 2 /* the block read ahead (PREFETCH, AVX-512 only; GEMV_BODY names it anyway) */

#include "bf16.h"

/* x's rows in float32: a copy when they are bf16 (the caller frees it), else x itself. */
static const float *rows_f32(const void *x, int x_bf16, size_t count, float **owned) {
    *owned = NULL;
    if (!x_bf16) return (const float *)x;
    float *out = (float *)malloc(count * sizeof(float));
    if (out == NULL) return NULL;
    for (size_t i = 0; i < count; i++) out[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    *owned = out;
    return out;
}

/* ---- one weight row: the tail of a block, and the path without AVX-512 ---- */

static float dot_i8(const float *x, const int8_t *w, int K) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int k = 0; k < K; k++) acc += x[k] * (float)w[k];
    return acc;
}

static float dot_bf16(const float *x, const uint16_t *w, int K) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int k = 0; k < K; k++) acc += x[k] * bf16_to_f32(w[k]);
    return acc;
}

static float dot_f32(const float *x, const float *w, int K) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int k = 0; k < K; k++) acc += x[k] * w[k];
    return acc;
}

/* ---- four weight rows (w, w + K, w + 2K, w + 3K) against one row of x ---- */

#ifdef GEMV_AVX512
/* 16 weights widened to float32 */
static inline __m512 load16_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline __m512 load16_bf16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }

/* One pass of k reads 16 weights of each of the 4 rows, 64 * sizeof(T) bytes: as many cache
 * lines of `next` (the block AHEAD blocks after this one, as far into it as this one is read)
 * are prefetched, so later rows stream in while this one is summed. Into L2, not L1: a
 * prefetch into L1 holds one of the core's few line-fill buffers until its line arrives,
 * which capped a weight set larger than the caches at 20 GB/s (bf16, one row, 2-core AMX
 * Xeon whose plain sum read 31 GB/s); into L2, two blocks ahead, it read 26.5 GB/s, and
 * int8 weights 22.8 against 17.1 (bench: 640 MB of SmolLM2-shaped weights, one call each). */
#define PREFETCH(T, next, k)                                                                 \
    for (int l = 0; l < (int)sizeof(T); l++)                                                 \
        _mm_prefetch((const char *)((next) + 4 * (size_t)(k) + l * (64 / sizeof(T))), _MM_HINT_T1);

/* The tail (K not a multiple of 16) is called only where there is one: an empty `omp simd`
 * reduction still combines its private partial sums in a serial chain of 32 scalar adds,
 * which cost an int8 row as much as its 36 passes of k (perf annotate on the AMX Xeon); the
 * result is the same bits, the sum plus 0.
 *
 * dot4: four weight rows against one row of x. dot4x4: against four rows of x, each weight
 * vector loaded and widened once for the four (a few decodes in one step). Both add the same
 * products in the same order for a row, so a row's result is the same bits either way. */
#define DEFINE_DOTS(T, SUFFIX)                                                               \
    static void dot4_##SUFFIX(const float *x, const T *w, const T *next, int K,             \
                              float out[BLOCK]) {                                            \
        __m512 a[BLOCK];                                                                     \
        for (int r = 0; r < BLOCK; r++) a[r] = _mm512_setzero_ps();                          \
        int k = 0;                                                                           \
        for (; k + 16 <= K; k += 16) {                                                       \
            PREFETCH(T, next, k)                                                             \
            __m512 xv = _mm512_loadu_ps(x + k);                                              \
            for (int r = 0; r < BLOCK; r++)                                                  \
                a[r] = _mm512_fmadd_ps(xv, load16_##SUFFIX(w + (size_t)r * K + k), a[r]);   \
        }                                                                                    \
        for (int r = 0; r < BLOCK; r++)                                                      \
            out[r] = _mm512_reduce_add_ps(a[r]) +                                            \
                     (k < K ? dot_##SUFFIX(x + k, w + (size_t)r * K + k, K - k) : 0.f);      \
    }                                                                                        \
    static void dot4x4_##SUFFIX(const float *const x[4], const T *w, const T *next, int K,  \
                                float out[4][BLOCK]) {                                       \
        __m512 a[4][BLOCK];                                                                  \
        for (int m = 0; m < 4; m++)                                                          \
            for (int r = 0; r < BLOCK; r++) a[m][r] = _mm512_setzero_ps();                   \
        int k = 0;                                                                           \
        for (; k + 16 <= K; k += 16) {                                                       \
            PREFETCH(T, next, k)                                                             \
            for (int r = 0; r < BLOCK; r++) {                                                \
                __m512 wv = load16_##SUFFIX(w + (size_t)r * K + k);                          \
                for (int m = 0; m < 4; m++)                                                  \
                    a[m][r] = _mm512_fmadd_ps(_mm512_loadu_ps(x[m] + k), wv, a[m][r]);       \
            }                                                                                \
        }                                                                                    \
        for (int m = 0; m < 4; m++)                                                          \
            for (int r = 0; r < BLOCK; r++)                                                  \
                out[m][r] = _mm512_reduce_add_ps(a[m][r]) +                                  \
                            (k < K ? dot_##SUFFIX(x[m] + k, w + (size_t)r * K + k, K - k) : 0.f); \
    }

DEFINE_DOTS(int8_t, i8)
DEFINE_DOTS(uint16_t, bf16)
DEFINE_DOTS(float, f32)
#else
/* Without AVX-512: the plain loops, vectorised by the compiler for this CPU. */
#define DEFINE_DOTS(T, SUFFIX)                                                               \
    static void dot4_##SUFFIX(const float *x, const T *w, const T *next, int K,             \
                              float out[BLOCK]) {                                            \
        (void)next;                                                                          \
        for (int r = 0; r < BLOCK; r++) out[r] = dot_##SUFFIX(x, w + (size_t)r * K, K);      \
    }                                                                                        \
    static void dot4x4_##SUFFIX(const float *const x[4], const T *w, const T *next, int K,  \
                                float out[4][BLOCK]) {                                       \
        for (int m = 0; m < 4; m++) dot4_##SUFFIX(x[m], w, next, K, out[m]);                 \
    }

DEFINE_DOTS(int8_t, i8)
DEFINE_DOTS(uint16_t, bf16)
DEFINE_DOTS(float, f32)
#endif

/* One kernel per weight format. x: [M, K] (bf16 when x_bf16, else float32), w: [N, K]
 * row-major, y: [M, N] (bf16 when y_bf16). Returns 0, or -1 when memory ran out. */
#define GEMV_BODY(SUFFIX, SCALE)                                                             \
    float *owned;                                                                            \
    const float *xf = rows_f32(x, x_bf16, (size_t)M * K, &owned);                            \
    if (xf == NULL) return -1;                                                               \
    int blocks = (N + BLOCK - 1) / BLOCK;                                                    \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                        \
    for (int b = 0; b < blocks; b++) {                                                       \
        int n0 = b * BLOCK, rows = N - n0 < BLOCK ? N - n0 : BLOCK;                          \
        size_t at = (size_t)n0 * K;                                                          \
        size_t after = (b + AHEAD < blocks) ? at + (size_t)AHEAD * BLOCK * K : at;            \
        for (int m = 0; m < M;) {                                                            \
            float acc[4][BLOCK];                                                             \
            int take = M - m >= 2 ? (M - m < 4 ? M - m : 4) : 1;                             \
            if (rows < BLOCK) { /* the last, partial block: row by row */                    \
                for (int i = 0; i < take; i++)                                               \
                    for (int r = 0; r < rows; r++)                                           \
                        acc[i][r] = dot_##SUFFIX(xf + (size_t)(m + i) * K,                   \
                                                 w + at + (size_t)r * K, K);                 \
            } else if (take == 1) {                                                          \
                dot4_##SUFFIX(xf + (size_t)m * K, w + at, w + after, K, acc[0]);             \
            } else { /* 2-4 rows of x; a short group repeats its last row */                 \
                const float *xs[4];                                                          \
                for (int i = 0; i < 4; i++)                                                  \
                    xs[i] = xf + (size_t)(m + (i < take ? i : take - 1)) * K;                \
                dot4x4_##SUFFIX(xs, w + at, w + after, K, acc);                              \
            }                                                                                \
            for (int i = 0; i < take; i++)                                                   \
                for (int r = 0; r < rows; r++)                                               \
                    elem_put(y, y_bf16, (size_t)(m + i) * N + n0 + r, acc[i][r] * (SCALE));     \
            m += take;                                                                       \
        }                                                                                    \
    }                                                                                        \
    free(owned);                                                                             \
    return 0;

int gemv_i8(const void *x, int x_bf16, const int8_t *w, const float *scales, void *y,
            int y_bf16, int M, int N, int K, int threads) {
    GEMV_BODY(i8, scales[n0 + r])
}

int gemv_bf16(const void *x, int x_bf16, const uint16_t *w, void *y, int y_bf16, int M, int N,
              int K, int threads) {
    GEMV_BODY(bf16, 1.0f)
}

int gemv_f32(const void *x, int x_bf16, const float *w, void *y, int y_bf16, int M, int N,
             int K, int threads) {
    GEMV_BODY(f32, 1.0f)
}
