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

/* ---- int8 weights through AVX512-VNNI: activations as int16, exact integer sums ----
 *
 * Why: the float path above widens every int8 weight twice (to int32, then to float32)
 * before its FMA, three instructions per 16 weights; where a core cannot issue them as fast
 * as its memory delivers the weights, int8 rows read slower than bf16 ones (the 2-core AMX
 * Xeon: 22.8 against 26.5 GB/s). Here each row of x is quantized once per call to int16
 * (one step per row: max |x| maps to 32767), each 32 weights are widened once to int16, and
 * VPDPWSSD adds their products in int32: two instructions per 32 weights (cache-resident, one
 * Zen 5 core: 123 against 58 G weights/s). Whether it runs is measured like every kernel
 * (kernels.py's `vnni`).
 *
 * The sums are exact integers: a lane's int32 holds at most VNNI_SPAN / 16 products of
 * |x| <= 32767 and |w| <= 127 (< 2^31), each span's lanes are added in int64, and the total is
 * scaled once. So a row's result depends only on its own values, never on how the sums were
 * split or grouped (batch-invariant, and the one-row and four-row paths agree bit for bit).
 * What differs from the float path is x's rounding to 16 bits of its row's largest value, a
 * 256th of the int8 weights' own rounding. A row that is not finite (NaN, inf) has no step:
 * it takes the float path, which gives what torch gives it. */
int gemv_vnni_available(void) {
#if defined(GEMV_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return 1;
#else
    return 0;
#endif
}

#if defined(GEMV_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI_SPAN 4096 /* k per int32 run: a lane then sums at most 256 products */
#define Q16 32767.0f

/* Row m of x (K floats) as int16 into q (kp >= K entries, zero past K); returns the float
 * one unit of q stands for (0 for a row of zeros), or -1 where the row is not finite. */
static double quantize_row(const float *x, int K, int16_t *q, int kp) {
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    const __m512 big = _mm512_set1_ps(3.402823466e38f);
    int k = 0;
    for (; k < K; k += 16) {
        __mmask16 in = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(in, x + k));
        bad |= _mm512_mask_cmp_ps_mask(in, a, big, _CMP_NLE_UQ); /* NaN or inf */
        amax = _mm512_max_ps(amax, a);
    }
    if (bad) return -1.0;
    float top = _mm512_reduce_max_ps(amax);
    memset(q, 0, (size_t)kp * sizeof(int16_t));
    if (top == 0.f) return 0.0;
    __m512 inv = _mm512_set1_ps(Q16 / top);
    for (k = 0; k < K; k += 16) {
        __mmask16 in = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, x + k), inv));
        _mm256_mask_storeu_epi16(q + k, in, _mm512_cvtsepi32_epi16(v));
    }
    return (double)top / (double)Q16;
}

static inline __m512i w32_i16(const int8_t *p, __mmask32 in) { /* 32 weights (or fewer) */
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(in, p));
}

static inline int64_t sum64(__m512i v) { /* 16 int32 lanes added without overflow */
    __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v));
    __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1));
    return _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi));
}

/* `wrows` (1-4) weight rows (w, w + K, ...) against `rows` (1-4) quantized rows of x (xs,
 * zero past K): out[m][r], the exact sum. `next`: the block to prefetch (see PREFETCH).
 * Always inlined where rows and wrows are constants (vnni_block), so that the accumulators
 * stay in registers: one row of x takes two per weight row (the odd and even 32 k), so that
 * eight independent VPDPWSSD chains hide its latency; more rows have enough with one. */
static inline __attribute__((always_inline)) void vnni4(
    const int16_t *const xs[4], const int rows, const int8_t *w, const int wrows,
    const int8_t *next, int K, int64_t out[4][BLOCK]) {
    const int two = rows == 1; /* a second accumulator per weight row */
    for (int m = 0; m < rows; m++)
        for (int r = 0; r < wrows; r++) out[m][r] = 0;
    for (int k0 = 0; k0 < K; k0 += VNNI_SPAN) {
        int end = K - k0 < VNNI_SPAN ? K : k0 + VNNI_SPAN;
        __m512i a[4][BLOCK], c[BLOCK];
        for (int m = 0; m < rows; m++)
            for (int r = 0; r < wrows; r++) a[m][r] = _mm512_setzero_si512();
        for (int r = 0; r < wrows; r++) c[r] = _mm512_setzero_si512();
        int k = k0;
        for (; two && k + 64 <= end; k += 64) {
            _mm_prefetch((const char *)(next + 4 * (size_t)k), _MM_HINT_T1);
            _mm_prefetch((const char *)(next + 4 * (size_t)k + 64), _MM_HINT_T1);
            _mm_prefetch((const char *)(next + 4 * (size_t)k + 128), _MM_HINT_T1);
            _mm_prefetch((const char *)(next + 4 * (size_t)k + 192), _MM_HINT_T1);
            __m512i x0 = _mm512_loadu_si512(xs[0] + k), x1 = _mm512_loadu_si512(xs[0] + k + 32);
            for (int r = 0; r < wrows; r++) {
                const int8_t *p = w + (size_t)r * K + k;
                a[0][r] = _mm512_dpwssd_epi32(a[0][r], x0, w32_i16(p, 0xFFFFFFFFu));
                c[r] = _mm512_dpwssd_epi32(c[r], x1, w32_i16(p + 32, 0xFFFFFFFFu));
            }
        }
        for (; k < end; k += 32) {
            __mmask32 in = end - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (end - k)) - 1);
            _mm_prefetch((const char *)(next + 4 * (size_t)k), _MM_HINT_T1);
            _mm_prefetch((const char *)(next + 4 * (size_t)k + 64), _MM_HINT_T1);
            __m512i xv[4];
            for (int m = 0; m < rows; m++) xv[m] = _mm512_loadu_si512(xs[m] + k);
            for (int r = 0; r < wrows; r++) {
                __m512i wv = w32_i16(w + (size_t)r * K + k, in);
                for (int m = 0; m < rows; m++) a[m][r] = _mm512_dpwssd_epi32(a[m][r], xv[m], wv);
            }
        }
        for (int r = 0; r < wrows; r++) a[0][r] = _mm512_add_epi32(a[0][r], c[r]);
        for (int m = 0; m < rows; m++)
            for (int r = 0; r < wrows; r++) out[m][r] += sum64(a[m][r]);
    }
}

/* vnni4 with its row counts as constants (each case compiled on its own). */
static void vnni_block(const int16_t *const xs[4], int rows, const int8_t *w, int wrows,
                       const int8_t *next, int K, int64_t out[4][BLOCK]) {
    if (wrows == BLOCK) {
        switch (rows) {
        case 1: vnni4(xs, 1, w, BLOCK, next, K, out); return;
        case 2: vnni4(xs, 2, w, BLOCK, next, K, out); return;
        case 3: vnni4(xs, 3, w, BLOCK, next, K, out); return;
        default: vnni4(xs, 4, w, BLOCK, next, K, out); return;
        }
    }
    for (int r = 0; r < wrows; r++) { /* the last, partial block: row by row */
        int64_t one[4][BLOCK];
        switch (rows) {
        case 1: vnni4(xs, 1, w + (size_t)r * K, 1, next, K, one); break;
        case 2: vnni4(xs, 2, w + (size_t)r * K, 1, next, K, one); break;
        case 3: vnni4(xs, 3, w + (size_t)r * K, 1, next, K, one); break;
        default: vnni4(xs, 4, w + (size_t)r * K, 1, next, K, one); break;
        }
        for (int m = 0; m < rows; m++) out[m][r] = one[m][0];
    }
}

int gemv_i8_vnni(const void *x, int x_bf16, const int8_t *w, const float *scales, void *y,
                 int y_bf16, int M, int N, int K, int threads) {
    if (M <= 0) return 0;
    float *owned;
    const float *xf = rows_f32(x, x_bf16, (size_t)M * K, &owned);
    if (xf == NULL) return -1;
    int kp = (K + 31) / 32 * 32; /* whole vectors of x: zeros past K */
    int16_t *xq = (int16_t *)aligned_alloc(64, ((size_t)M * kp * sizeof(int16_t) + 63) / 64 * 64);
    double *step = (double *)malloc((size_t)M * sizeof(double));
    int *exact = (int *)malloc((size_t)M * sizeof(int));
    int *rest = (int *)malloc((size_t)M * sizeof(int));
    if (xq == NULL || step == NULL || exact == NULL || rest == NULL) {
        free(owned), free(xq), free(step), free(exact), free(rest);
        return -1;
    }
    int n_exact = 0, n_rest = 0; /* rows quantized, rows on the float path */
    for (int m = 0; m < M; m++) {
        step[m] = quantize_row(xf + (size_t)m * K, K, xq + (size_t)m * kp, kp);
        if (step[m] < 0)
            rest[n_rest++] = m;
        else
            exact[n_exact++] = m;
    }
    int blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        int n0 = b * BLOCK, nr = N - n0 < BLOCK ? N - n0 : BLOCK;
        size_t at = (size_t)n0 * K;
        size_t after = (b + AHEAD < blocks) ? at + (size_t)AHEAD * BLOCK * K : at;
        for (int i = 0; i < n_exact; i += 4) {
            int take = n_exact - i < 4 ? n_exact - i : 4;
            const int16_t *xs[4];
            int64_t acc[4][BLOCK];
            for (int j = 0; j < 4; j++) xs[j] = xq + (size_t)exact[i + (j < take ? j : 0)] * kp;
            vnni_block(xs, take, w + at, nr, w + after, K, acc);
            for (int j = 0; j < take; j++) {
                int m = exact[i + j];
                for (int r = 0; r < nr; r++)
                    elem_put(y, y_bf16, (size_t)m * N + n0 + r,
                             (float)((double)acc[j][r] * step[m] * (double)scales[n0 + r]));
            }
        }
        for (int i = 0; i < n_rest; i++) { /* not finite: the float path's sums */
            int m = rest[i];
            for (int r = 0; r < nr; r++)
                elem_put(y, y_bf16, (size_t)m * N + n0 + r,
                         dot_i8(xf + (size_t)m * K, w + at + (size_t)r * K, K) * scales[n0 + r]);
        }
    }
    free(owned), free(xq), free(step), free(exact), free(rest);
    return 0;
}
#else
int gemv_i8_vnni(const void *x, int x_bf16, const int8_t *w, const float *scales, void *y,
                 int y_bf16, int M, int N, int K, int threads) {
    return gemv_i8(x, x_bf16, w, scales, y, y_bf16, M, N, K, threads);
}
#endif
