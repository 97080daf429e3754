/* genserve's row-by-row linear kernel: y = x W^T for the few rows of a decode step.
 *
 * Why it exists: a decode step reads every weight once per token, so its linears should run
 * at the memory's read bandwidth. On the 2-core AMX Xeon this project is measured on, torch's
 * own kernels did not: aten._weight_int8pack_mm read int8 weights at 7-10 GB/s, oneDNN and
 * F.linear read bf16 weights at 6-12 GB/s, where one pass summing a large buffer ran at
 * 14-16 GB/s. This file streams each weight row once, four rows at a time, with the next
 * four prefetched, and sums in float32. Which kernel runs for which row count is still
 * measured at start-up (hardware.py): this one is a candidate, kept only where it is faster.
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

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void store(void *y, int y_bf16, size_t i, float v) {
    if (y_bf16)
        ((uint16_t *)y)[i] = f32_to_bf16(v);
    else
        ((float *)y)[i] = v;
}

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
/* `next`: the block after this one, prefetched a line per 64 bytes read here */
static void dot4_i8(const float *x, const int8_t *w, const int8_t *next, int K, float out[BLOCK]) {
    __m512 a[BLOCK];
    for (int r = 0; r < BLOCK; r++) a[r] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) { /* 4 rows x 16 bytes = one cache line */
        _mm_prefetch((const char *)(next + 4 * (size_t)k), _MM_HINT_T0);
        __m512 xv = _mm512_loadu_ps(x + k);
        for (int r = 0; r < BLOCK; r++) {
            __m128i b = _mm_loadu_si128((const __m128i *)(w + (size_t)r * K + k));
            a[r] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), a[r]);
        }
    }
    for (int r = 0; r < BLOCK; r++)
        out[r] = _mm512_reduce_add_ps(a[r]) + dot_i8(x + k, w + (size_t)r * K + k, K - k);
}

static void dot4_f32(const float *x, const float *w, const float *next, int K, float out[BLOCK]) {
    __m512 a[BLOCK];
    for (int r = 0; r < BLOCK; r++) a[r] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) { /* 4 rows x 64 bytes: four lines */
        for (int l = 0; l < BLOCK; l++)
            _mm_prefetch((const char *)(next + 4 * (size_t)k + 16 * l), _MM_HINT_T0);
        __m512 xv = _mm512_loadu_ps(x + k);
        for (int r = 0; r < BLOCK; r++)
            a[r] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + (size_t)r * K + k), a[r]);
    }
    for (int r = 0; r < BLOCK; r++)
        out[r] = _mm512_reduce_add_ps(a[r]) + dot_f32(x + k, w + (size_t)r * K + k, K - k);
}

/* bf16 weights against float32 x: each 16 weights widened to float32 by a shift */
static void dot4_bf16(const float *x, const uint16_t *w, const uint16_t *next, int K,
                      float out[BLOCK]) {
    __m512 a[BLOCK];
    for (int r = 0; r < BLOCK; r++) a[r] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) { /* 4 rows x 32 bytes: two lines */
        _mm_prefetch((const char *)(next + 4 * (size_t)k), _MM_HINT_T0);
        _mm_prefetch((const char *)(next + 4 * (size_t)k + 32), _MM_HINT_T0);
        __m512 xv = _mm512_loadu_ps(x + k);
        for (int r = 0; r < BLOCK; r++) {
            __m256i h = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * K + k));
            __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            a[r] = _mm512_fmadd_ps(xv, wf, a[r]);
        }
    }
    for (int r = 0; r < BLOCK; r++)
        out[r] = _mm512_reduce_add_ps(a[r]) + dot_bf16(x + k, w + (size_t)r * K + k, K - k);
}
#else
static void dot4_i8(const float *x, const int8_t *w, const int8_t *next, int K, float out[BLOCK]) {
    (void)next;
    for (int r = 0; r < BLOCK; r++) out[r] = dot_i8(x, w + (size_t)r * K, K);
}

static void dot4_f32(const float *x, const float *w, const float *next, int K, float out[BLOCK]) {
    (void)next;
    for (int r = 0; r < BLOCK; r++) out[r] = dot_f32(x, w + (size_t)r * K, K);
}

static void dot4_bf16(const float *x, const uint16_t *w, const uint16_t *next, int K,
                      float out[BLOCK]) {
    (void)next;
    for (int r = 0; r < BLOCK; r++) out[r] = dot_bf16(x, w + (size_t)r * K, K);
}
#endif

/* One kernel per weight format. x: [M, K] (bf16 when x_bf16, else float32), w: [N, K]
 * row-major, y: [M, N] (bf16 when y_bf16). Returns 0, or -1 when memory ran out. */
#define GEMV_BODY(DOT4, DOT1, SCALE)                                                         \
    float *owned;                                                                            \
    const float *xf = rows_f32(x, x_bf16, (size_t)M * K, &owned);                            \
    if (xf == NULL) return -1;                                                               \
    int blocks = (N + BLOCK - 1) / BLOCK;                                                    \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                        \
    for (int b = 0; b < blocks; b++) {                                                       \
        int n0 = b * BLOCK;                                                                  \
        size_t row = (size_t)n0 * K;                                                         \
        size_t after = (b + 1 < blocks) ? row + (size_t)BLOCK * K : row;                      \
        for (int m = 0; m < M; m++) {                                                        \
            const float *xr = xf + (size_t)m * K;                                            \
            float acc[BLOCK];                                                                \
            int full = n0 + BLOCK <= N;                                                      \
            if (full) DOT4(xr, w + row, w + after, K, acc);                                  \
            for (int r = 0; r < BLOCK && n0 + r < N; r++) {                                  \
                float v = full ? acc[r] : DOT1(xr, w + row + (size_t)r * K, K);              \
                store(y, y_bf16, (size_t)m * N + n0 + r, v * (SCALE));                       \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    free(owned);                                                                             \
    return 0;

int gemv_i8(const void *x, int x_bf16, const int8_t *w, const float *scales, void *y,
            int y_bf16, int M, int N, int K, int threads) {
    GEMV_BODY(dot4_i8, dot_i8, scales[n0 + r])
}

int gemv_bf16(const void *x, int x_bf16, const uint16_t *w, void *y, int y_bf16, int M, int N,
              int K, int threads) {
    GEMV_BODY(dot4_bf16, dot_bf16, 1.0f)
}

int gemv_f32(const void *x, int x_bf16, const float *w, void *y, int y_bf16, int M, int N,
             int K, int threads) {
    GEMV_BODY(dot4_f32, dot_f32, 1.0f)
}
