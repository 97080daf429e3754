/* Every decoder layer of a decode step in one call: RMSNorm, q/k/v, rotary, the cache write,
 * attention, o, RMSNorm, gate/up, SiLU and down, for the few rows of a step of decodes.
 *
 * Why it exists: at one row the weights' reads are only part of a step. On the 2-core AMX
 * Xeon this project is measured on, a bf16 one-row step of a SmolLM2-135M-shaped Llama took
 * 26.8 ms with gemv.c's linears, of which about 11 ms were torch's small ops between them
 * (two RMSNorms a layer at 60 us each, rotary, SiLU, the cache writes, SDPA over one
 * sequence at 66 us): each costs microseconds of dispatch for a few hundred numbers.
 * torch.compile of the step removed part of it (24 ms against 34 ms eager then). Here the
 * glue between the linears is a few plain loops, and the linears and attention are gemv.c's
 * and attend.c's kernels, so a step is one call from Python.
 *
 * The numbers follow the eager path's (runner.py): every value torch would round to the
 * model's dtype is rounded here at the same point, the linears are the same kernels and the
 * attention is attend_lanes. Only the norms' sums run in another order, so a row's result
 * is close to the eager path's, not the same bits: the runner sends free decodes only
 * (never a seeded or --deterministic row, whose bits must not depend on the path).
 *
 * The stages between the linears are exported too (glue_*): for a step of more decodes
 * than gemv serves well (9-64 rows), the runner calls torch's linears (oneDNN's AMX
 * kernels there) and these stages between them, one call each instead of a dozen ops; for
 * any other free step (prompt chunks), the row-wise ones around torch's linears and SDPA.
 * Those run on every thread where the rows are many, each row whole on one thread.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "vexp.h"

int gemv_i8(const void *x, int x_bf16, const int8_t *w, const float *scales, void *y,
            int y_bf16, int M, int N, int K, int threads);
int gemv_i8_vnni(const void *x, int x_bf16, const int8_t *w, const float *scales, void *y,
                 int y_bf16, int M, int N, int K, int threads);
int gemv_bf16(const void *x, int x_bf16, const uint16_t *w, void *y, int y_bf16, int M, int N,
              int K, int threads);
int gemv_f32(const void *x, int x_bf16, const float *w, void *y, int y_bf16, int M, int N,
             int K, int threads);
int amx_linear_bf16(const uint16_t *x, const uint16_t *w, void *y, int y_bf16, int M, int N,
                    int K, int threads);
int dp_linear_bf16(const uint16_t *x, const uint16_t *w, void *y, int y_bf16, int M, int N,
                   int K, int threads);
int amx_glu_bf16(const uint16_t *x, const uint16_t *w, void *y, int M, int I, int K,
                 int threads, int silu);
int attend_lanes(const void *q, const void *k, const void *v, void *out, const int32_t *lanes,
                 const int32_t *lengths, int B, int heads, int kv_heads, int D, int64_t rows,
                 int64_t row0, int64_t lane_len, float scale, int bf16, int threads);

/* FORMAT_DP: w is dp.c's packed bf16 weight, for the rows below the tiles' (dp for a lone row
 * beside amx for more, where the policy measured it so: the AMX Xeon) */
enum { FORMAT_F32 = 0, FORMAT_BF16 = 1, FORMAT_I8 = 2, FORMAT_I8_VNNI = 3, FORMAT_DP = 4 };
#define MAX_HEAD_DIM 256
#define MAX_SILU_CHUNK 256 /* SiLU's elements per vectorised pass */

typedef struct { /* one linear: y = x W^T (* scales) (+ bias) */
    const void *w;       /* [n, k] row-major, in `format` */
    const float *scales; /* int8: one per output row; else NULL */
    const void *bias;    /* [n] in the activations' dtype, or NULL */
    int64_t format, n, k;
    const uint16_t *tiles; /* the weight in bf16 packed for amx.c or dp.c, or NULL */
    int64_t tiles_from;    /* steps of at least this many rows multiply through the tiles */
    int64_t glu;           /* the tiles hold [gate; up] interleaved (amx.c's amx_glu_bf16) */
    int64_t tiles_dp;      /* the tiles are dp.c's (AVX512-BF16 dot products), not AMX's */
    /* The loaded LoRA adapters' products for this projection, side by side (runner.py's
     * LoraSet fused stack), float32: a [rank, k], bt = B^T [rank, lora_n], owner [rank] (the
     * adapter each rank column belongs to); they add to y's columns lora_lo.. lora_lo +
     * lora_n. rank 0: none. */
    const float *lora_a, *lora_bt;
    const int32_t *lora_owner;
    int64_t lora_rank, lora_lo, lora_n;
} Lin;

typedef struct { /* one decoder layer's weights and cache (fixed while a runner lives) */
    const void *input_norm, *post_norm; /* [hidden] in the activations' dtype */
    Lin qkv, o, gate_up, down;
    void *k_cache, *v_cache; /* [kv_heads, cache_rows, dim] */
} Layer;

typedef struct { /* the model's shape and one step's rows */
    int64_t rows, hidden, heads, kv_heads, dim, inter, cache_rows, bf16, threads;
    double eps, scale;
    const float *cos, *sin;          /* [rows, dim]: transformers' tables at each row's position */
    const int64_t *write;            /* [rows]: cache row of each row's new key and value */
    const int32_t *starts, *lengths; /* [rows]: cache row of position 0, positions attended */
    const int32_t *owners;           /* [rows]: each row's adapter (-1: none), or NULL */
} Step;

/* y [M, n] (the model's dtype) = x [M, k] (the model's dtype) W^T (+ bias): the kernel's
 * output rounded, then the bias added and rounded again, as the eager path's gemv does. */
static int tiled(const Lin *L, const Step *s) { /* a batch: AMX's or dp.c's, as measured */
    return L->tiles != NULL && s->bf16 && s->rows >= L->tiles_from;
}

static int linear(const Lin *L, const void *x, void *y, const Step *s) {
    int n = (int)L->n, k = (int)L->k, t = (int)s->threads, M = (int)s->rows, rc;
    int bf16 = (int)s->bf16;
    if (tiled(L, s) && L->tiles_dp)
        rc = dp_linear_bf16((const uint16_t *)x, L->tiles, y, 1, M, n, k, t);
    else if (tiled(L, s) && L->glu)
        rc = amx_glu_bf16((const uint16_t *)x, L->tiles, y, M, n / 2, k, t, 0);
    else if (tiled(L, s))
        rc = amx_linear_bf16((const uint16_t *)x, L->tiles, y, 1, M, n, k, t);
    else if (L->format == FORMAT_DP && bf16)
        rc = dp_linear_bf16((const uint16_t *)x, (const uint16_t *)L->w, y, 1, M, n, k, t);
    else if (L->format == FORMAT_DP)
        return -2; /* dp.c multiplies bf16 rows only (native.py's checks keep this away) */
    else if (L->format == FORMAT_I8)
        rc = gemv_i8(x, bf16, (const int8_t *)L->w, L->scales, y, bf16, M, n, k, t);
    else if (L->format == FORMAT_I8_VNNI)
        rc = gemv_i8_vnni(x, bf16, (const int8_t *)L->w, L->scales, y, bf16, M, n, k, t);
    else if (L->format == FORMAT_BF16)
        rc = gemv_bf16(x, bf16, (const uint16_t *)L->w, y, bf16, M, n, k, t);
    else
        rc = gemv_f32(x, bf16, (const float *)L->w, y, bf16, M, n, k, t);
    if (rc || L->bias == NULL) return rc;
    for (size_t i = 0; i < (size_t)M * n; i++)
        elem_put(y, bf16, i, elem_get(y, bf16, i) + elem_get(L->bias, bf16, i % n));
    return 0;
}

static int has_lora(const Lin *L, const Step *s) { return L->lora_rank > 0 && s->owners; }

/* Rows of the model's dtype as float32 and back, and torch's rounding to it, in loops the
 * compiler vectorises (no per-element branch on the dtype). */
static void to_f32(const void *p, int bf16, size_t at, size_t n, float *out) {
    if (!bf16) {
        memcpy(out, (const float *)p + at, n * sizeof(float));
        return;
    }
    const uint16_t *h = (const uint16_t *)p + at;
#pragma omp simd
    for (size_t i = 0; i < n; i++) out[i] = bf16_to_f32(h[i]);
}

static void from_f32(void *p, int bf16, size_t at, size_t n, const float *in) {
    if (!bf16) {
        memcpy((float *)p + at, in, n * sizeof(float));
        return;
    }
    uint16_t *h = (uint16_t *)p + at;
    size_t i = 0;
#ifdef __AVX512BF16__
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(h + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in + i)));
#endif
#pragma omp simd
    for (size_t t = i; t < n; t++) h[t] = f32_to_bf16(in[t]);
}

/* Where the CPU has AVX512-BF16, its conversion rounds to nearest even as f32_to_bf16 does
 * (one instruction against about eight); it reads a subnormal float32 as zero, which only
 * values below 1e-38 meet. 512 prompt rows' residual and norm: 140 -> 103 us. */
static void round_all(float *v, size_t n, int bf16) {
    if (!bf16) return;
    size_t i = 0;
#ifdef __AVX512BF16__
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, round16(_mm512_loadu_ps(v + i)));
#endif
#pragma omp simd
    for (size_t t = i; t < n; t++) v[t] = bf16_to_f32(f32_to_bf16(v[t]));
}

/* Threads for a row-wise stage: one where the rows are too few to pay for waking the
 * others (a decode step's 1-8 rows). Each row is computed whole by one thread, in the same
 * order whatever the count, so a row's bits do not depend on it. */
#define PARALLEL_ROW_ELEMS 16384
static int row_threads(const Step *s) {
    size_t elems = (size_t)s->rows * (size_t)s->hidden;
    return elems >= PARALLEL_ROW_ELEMS && s->threads > 1 ? (int)s->threads : 1;
}

/* float32 scratch the row-wise stages need: three rows per thread */
static size_t tmp_floats(const Step *s) {
    return 3 * (size_t)s->hidden * (size_t)(s->threads > 1 ? s->threads : 1);
}

/* x[m] += y[m], in the model's dtype; leaves x[m] as float32 in xr. */
static void residual_row(int bf16, size_t H, void *x, const void *y, size_t m, float *xr,
                         float *yr) {
    to_f32(x, bf16, m * H, H, xr);
    to_f32(y, bf16, m * H, H, yr);
#pragma omp simd
    for (size_t i = 0; i < H; i++) xr[i] += yr[i];
    from_f32(x, bf16, m * H, H, xr);
    round_all(xr, H, bf16); /* what was stored: the norm reads x as rounded */
}

/* h[m] = transformers' LlamaRMSNorm of xr (row m of x as float32): normalised in float32,
 * rounded, then times wr (the weight as float32). Overwrites xr. */
static void norm_row(int bf16, size_t H, double eps, float *xr, const float *wr, void *h,
                     size_t m) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (size_t i = 0; i < H; i++) ss += xr[i] * xr[i];
    float r = 1.f / sqrtf(ss / (float)H + (float)eps);
#pragma omp simd
    for (size_t i = 0; i < H; i++) xr[i] *= r;
    round_all(xr, H, bf16);
#pragma omp simd
    for (size_t i = 0; i < H; i++) xr[i] *= wr[i];
    from_f32(h, bf16, m * H, H, xr);
}

#ifdef __AVX512BF16__
/* residual_row then norm_row for a bf16 row of whole vectors, the same operations in the same
 * order (the same bits), each pass 16 at a time with the conversions in registers: 512
 * prompt rows' residual and norm took 169 us through the general loops (2-core AMX Xeon). */
static void residual_norm_row16(size_t H, double eps, uint16_t *x, const uint16_t *y,
                                const float *wr, uint16_t *h, float *xr) {
    for (size_t i = 0; i < H; i += 16) {
        __m512 v = widen16(_mm256_loadu_si256((const __m256i *)(x + i)));
        if (y != NULL) { /* x += y, stored rounded; the norm reads x as stored */
            __m256i b = (__m256i)_mm512_cvtneps_pbh(
                _mm512_add_ps(v, widen16(_mm256_loadu_si256((const __m256i *)(y + i)))));
            _mm256_storeu_si256((__m256i *)(x + i), b);
            v = widen16(b);
        }
        _mm512_storeu_ps(xr + i, v);
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (size_t i = 0; i < H; i++) ss += xr[i] * xr[i];
    __m512 r = _mm512_set1_ps(1.f / sqrtf(ss / (float)H + (float)eps));
    for (size_t i = 0; i < H; i += 16) {
        __m512 v = widen16((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(xr + i), r)));
        v = _mm512_mul_ps(v, _mm512_loadu_ps(wr + i));
        _mm256_storeu_si256((__m256i *)(h + i), (__m256i)_mm512_cvtneps_pbh(v));
    }
}
#endif

/* With y: x += y first. Then h = RMSNorm(x) * w. `tmp`: tmp_floats(s). */
static void residual_norm_rows(const Step *s, void *x, const void *y, const void *w, void *h,
                               float *tmp) {
    int bf16 = (int)s->bf16, nt = row_threads(s);
    size_t H = (size_t)s->hidden, M = (size_t)s->rows;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *xr = tmp + (size_t)omp_get_thread_num() * 3 * H, *yr = xr + H, *wr = yr + H;
        to_f32(w, bf16, 0, H, wr);
#pragma omp for schedule(static)
        for (size_t m = 0; m < M; m++) {
#ifdef __AVX512BF16__
            if (bf16 && H % 16 == 0) {
                const uint16_t *ym = y != NULL ? (const uint16_t *)y + m * H : NULL;
                residual_norm_row16(H, s->eps, (uint16_t *)x + m * H, ym, wr,
                                    (uint16_t *)h + m * H, xr);
                continue;
            }
#endif
            if (y != NULL)
                residual_row(bf16, H, x, y, m, xr, yr);
            else
                to_f32(x, bf16, m * H, H, xr);
            norm_row(bf16, H, s->eps, xr, wr, h, m);
        }
    }
}

/* x += y, in the model's dtype. `tmp`: tmp_floats(s). */
static void residual(const Step *s, void *x, const void *y, float *tmp) {
    int bf16 = (int)s->bf16, nt = row_threads(s);
    size_t H = (size_t)s->hidden, M = (size_t)s->rows;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *xr = tmp + (size_t)omp_get_thread_num() * 3 * H;
#pragma omp for schedule(static)
        for (size_t m = 0; m < M; m++) residual_row(bf16, H, x, y, m, xr, xr + H);
    }
}

/* Rotate-half rotary on `count` heads of one row, in place: x*cos + rotate_half(x)*sin, each
 * product and the sum rounded as torch rounds them (llama_math.rope). */
#ifdef __AVX512BF16__
/* rotate's arithmetic for one bf16 head of whole vectors a half (D % 32 == 0), on registers:
 * 16 dims of each half at a time, both read before either is written. The same operations
 * in the same order as the general loop, so the same bits. 32 rows' rotary in a decode step
 * went through ~10 passes over scratch arrays a head. */
static void rotate_head16(uint16_t *x, int half, const float *cos, const float *sin) {
    for (int c = 0; c < half; c += 16) {
        __m512 lo = widen16(_mm256_loadu_si256((const __m256i *)(x + c)));
        __m512 hi = widen16(_mm256_loadu_si256((const __m256i *)(x + half + c)));
        __m512 neg_hi = _mm512_castsi512_ps( /* -x: the sign bit flipped, exact */
            _mm512_xor_si512(_mm512_castps_si512(hi), _mm512_set1_epi32((int)0x80000000)));
        __m512 first = _mm512_add_ps(round16(_mm512_mul_ps(lo, _mm512_loadu_ps(cos + c))),
                                     round16(_mm512_mul_ps(neg_hi, _mm512_loadu_ps(sin + c))));
        __m512 second =
            _mm512_add_ps(round16(_mm512_mul_ps(hi, _mm512_loadu_ps(cos + half + c))),
                          round16(_mm512_mul_ps(lo, _mm512_loadu_ps(sin + half + c))));
        _mm256_storeu_si256((__m256i *)(x + c), (__m256i)_mm512_cvtneps_pbh(first));
        _mm256_storeu_si256((__m256i *)(x + half + c), (__m256i)_mm512_cvtneps_pbh(second));
    }
}
#endif

static void rotate(void *row, int count, int D, const float *cos, const float *sin, int bf16) {
    int half = D / 2;
    float x[MAX_HEAD_DIM], other[MAX_HEAD_DIM], a[MAX_HEAD_DIM], b[MAX_HEAD_DIM];
#ifdef __AVX512BF16__
    if (bf16 && half % 16 == 0) {
        for (int h = 0; h < count; h++)
            rotate_head16((uint16_t *)row + (size_t)h * D, half, cos, sin);
        return;
    }
#endif
    for (int h = 0; h < count; h++) {
        size_t at = (size_t)h * D;
        to_f32(row, bf16, at, (size_t)D, x);
        for (int d = 0; d < half; d++) {
            other[d] = -x[d + half];
            other[d + half] = x[d];
        }
#pragma omp simd
        for (int d = 0; d < D; d++) {
            a[d] = x[d] * cos[d];
            b[d] = other[d] * sin[d];
        }
        round_all(a, (size_t)D, bf16);
        round_all(b, (size_t)D, bf16);
#pragma omp simd
        for (int d = 0; d < D; d++) a[d] += b[d];
        from_f32(row, bf16, at, (size_t)D, a);
    }
}

/* g[i] *= sigmoid(g[i]): sigmoid from e^-|g| (never overflows). */
static void silu(float *g, size_t n) {
    size_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(g + i, silu16(_mm512_loadu_ps(g + i)));
#endif
    for (; i < n; i++) {
        float e = exp_nonpositive(-fabsf(g[i])), r = 1.f / (1.f + e);
        g[i] *= g[i] >= 0.f ? r : e * r;
    }
}

/* From each row's q, k and v (qkv [rows, (heads + 2 kv) * dim]): q and k rotated in place,
 * k and v into the caches at the row's write row, and, where `q` is given, the rotated q
 * copied into it [rows, heads, dim]. */
static void rotate_write(const Step *s, void *k_cache, void *v_cache, void *qkv, void *q) {
    int bf16 = (int)s->bf16, D = (int)s->dim, heads = (int)s->heads, kv = (int)s->kv_heads;
    int nt = row_threads(s);
    size_t width = (size_t)(heads + 2 * kv) * D, qw = (size_t)heads * D;
    size_t esize = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (size_t m = 0; m < (size_t)s->rows; m++) {
        char *row = (char *)qkv + m * width * esize;
        rotate(row, heads + kv, D, s->cos + m * D, s->sin + m * D, bf16); /* q and k */
        if (q != NULL) memcpy((char *)q + m * qw * esize, row, qw * esize);
        for (int g = 0; g < kv; g++) {
            size_t at = ((size_t)g * s->cache_rows + (size_t)s->write[m]) * D * esize;
            memcpy((char *)k_cache + at, row + (qw + (size_t)g * D) * esize, D * esize);
            memcpy((char *)v_cache + at, row + (qw + (size_t)(kv + g) * D) * esize, D * esize);
        }
    }
}

/* rotate_write, then each row's attention over its positions into att [rows, heads * dim]. */
static int attend(const Step *s, void *k_cache, void *v_cache, void *qkv, void *q, void *att) {
    rotate_write(s, k_cache, v_cache, qkv, q);
    return attend_lanes(q, k_cache, v_cache, att, s->starts, s->lengths, (int)s->rows,
                        (int)s->heads, (int)s->kv_heads, (int)s->dim, s->cache_rows, 0, 1,
                        (float)s->scale, (int)s->bf16, (int)s->threads);
}

/* act = silu(gate) * up from gu [rows, 2 * inter] (gate, then up), each op rounded as torch
 * rounds it. */
static void silu_mul(const Step *s, const void *gu, void *act) {
    int bf16 = (int)s->bf16, nt = row_threads(s);
    size_t I = (size_t)s->inter;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (size_t m = 0; m < (size_t)s->rows; m++) {
        float g[MAX_SILU_CHUNK], u[MAX_SILU_CHUNK];
        for (size_t i0 = 0; i0 < I; i0 += MAX_SILU_CHUNK) {
            size_t n = I - i0 < MAX_SILU_CHUNK ? I - i0 : MAX_SILU_CHUNK;
            to_f32(gu, bf16, m * 2 * I + i0, n, g);
            to_f32(gu, bf16, m * 2 * I + I + i0, n, u);
            silu(g, n);
            round_all(g, n, bf16);
#pragma omp simd
            for (size_t i = 0; i < n; i++) g[i] *= u[i];
            from_f32(act, bf16, m * I + i0, n, g);
        }
    }
}

/* y[m, lo:lo + n] += B (A x[m]) over the rank columns of row m's own adapter (owners[m]),
 * as LoraSet.apply_fused computes it (runner.py): in float32, each row's sum added into y
 * rounding once, as torch adds a float32 product into a bf16 y. Two passes, each reading an
 * adapter's matrices once for every row of the step (they stay in cache across the rows):
 * the rank-r sums of each row (rows split over the threads), then B's products by blocks of
 * y's columns (the blocks split over the threads). A row's sums run in the same order
 * whatever the threads or the other rows, so its result does not depend on them. A step of
 * few rows runs on one thread: an adapter's rank columns then cost a row about as much as
 * its norms, less than waking the other threads. */
#define LORA_COLS 256       /* y's columns per block of the second pass */
#define LORA_PARALLEL 131072 /* multiply-adds from which a pass runs on every thread */
static int lora_add(const Lin *L, const void *x, void *y, const Step *s) {
    if (!has_lora(L, s)) return 0;
    int bf16 = (int)s->bf16;
    size_t M = (size_t)s->rows, K = (size_t)L->k, R = (size_t)L->lora_rank, W = (size_t)L->lora_n;
    float *xf = (float *)malloc(M * (K + R) * sizeof(float));
    if (xf == NULL) return -1;
    float *low = xf + M * K; /* [M][R]: row m's rank sums, 0 outside its adapter's columns */
    const int32_t *own = L->lora_owner;
    int t = M * R * (K + W) >= LORA_PARALLEL && s->threads > 1 ? (int)s->threads : 1;
#pragma omp parallel for num_threads(t) schedule(static)
    for (size_t m = 0; m < M; m++) {
        int32_t o = s->owners[m];
        float *lm = low + m * R, *xm = xf + m * K;
        memset(lm, 0, R * sizeof(float));
        if (o < 0) continue;
        to_f32(x, bf16, m * K, K, xm);
        for (size_t j = 0; j < R; j++) {
            if (own[j] != o) continue;
            const float *a = L->lora_a + j * K;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (size_t k = 0; k < K; k++) acc += a[k] * xm[k];
            lm[j] = acc;
        }
    }
    size_t blocks = (W + LORA_COLS - 1) / LORA_COLS;
#pragma omp parallel for num_threads(t) schedule(static)
    for (size_t cb = 0; cb < blocks; cb++) {
        size_t c0 = cb * LORA_COLS, n = W - c0 < LORA_COLS ? W - c0 : LORA_COLS;
        float d[LORA_COLS];
        for (size_t m = 0; m < M; m++) {
            int32_t o = s->owners[m];
            int any = 0;
            for (size_t j = 0; j < R && o >= 0; j++) any |= own[j] == o;
            if (!any) continue;
            memset(d, 0, n * sizeof(float));
            for (size_t j = 0; j < R; j++) {
                if (own[j] != o) continue;
                const float *bt = L->lora_bt + j * W + c0;
                float v = low[m * R + j];
#pragma omp simd
                for (size_t i = 0; i < n; i++) d[i] += bt[i] * v;
            }
            size_t at = m * (size_t)L->n + (size_t)L->lora_lo + c0;
            for (size_t i = 0; i < n; i++) elem_put(y, bf16, at + i, elem_get(y, bf16, at + i) + d[i]);
        }
    }
    free(xf);
    return 0;
}

/* y = x W^T (+ bias), then the rows' adapters' products */
static int project(const Lin *L, const void *x, void *y, const Step *s) {
    int rc = linear(L, x, y, s);
    return rc ? rc : lora_add(L, x, y, s);
}

typedef struct { /* one step's activations, in the model's dtype; tmp: tmp_floats */
    void *h, *qkv, *q, *att, *gu, *act, *y;
    float *tmp;
} Scratch;

/* One layer from b->h, its input norm of x (the previous layer's last stage computed it).
 * Ends with x += down(...) and, where `next_norm` is given, the next layer's input norm into
 * b->h in the same pass (residual_norm_rows: the same bits as the residual, then the norm of
 * x as stored, and one parallel region a layer fewer). */
static int layer(const Layer *L, const void *next_norm, void *x, Scratch *b, const Step *s) {
    int rc;
    if ((rc = project(&L->qkv, b->h, b->qkv, s))) return rc;
    if ((rc = attend(s, L->k_cache, L->v_cache, b->qkv, b->q, b->att))) return rc;
    if ((rc = project(&L->o, b->att, b->y, s))) return rc;
    residual_norm_rows(s, x, b->y, L->post_norm, b->h, b->tmp);
    const Lin *gu = &L->gate_up;
    if (tiled(gu, s) && gu->glu && gu->bias == NULL && !has_lora(gu, s)) {
        /* SiLU(gate) * up from the tiles (nothing adds to gate/up before the SiLU) */
        rc = amx_glu_bf16((const uint16_t *)b->h, gu->tiles, b->act, (int)s->rows,
                          (int)s->inter, (int)gu->k, (int)s->threads, 1);
        if (rc) return rc;
    } else {
        if ((rc = project(gu, b->h, b->gu, s))) return rc;
        silu_mul(s, b->gu, b->act);
    }
    if ((rc = project(&L->down, b->act, b->y, s))) return rc;
    if (next_norm != NULL)
        residual_norm_rows(s, x, b->y, next_norm, b->h, b->tmp);
    else
        residual(s, x, b->y, b->tmp);
    return 0;
}

static int shape_ok(const Step *s) { return s->dim <= MAX_HEAD_DIM && s->dim % 2 == 0; }

/* x [rows, hidden] in the model's dtype, updated in place through `count` layers. Returns 0,
 * -1 when memory ran out, -2 for a shape past the fixed buffers (or attend_lanes' codes). */
int decode_layers(const Layer *layers, int count, const Step *s, void *x) {
    size_t M = (size_t)s->rows, H = (size_t)s->hidden, I = (size_t)s->inter, D = (size_t)s->dim;
    size_t heads = (size_t)s->heads, width = (heads + 2 * (size_t)s->kv_heads) * D;
    if (!shape_ok(s)) return -2;
    size_t esize = s->bf16 ? 2 : 4;
    size_t bytes = M * (H + width + 2 * heads * D + 3 * I + H) * esize;
    char *all = (char *)malloc(bytes + tmp_floats(s) * sizeof(float));
    if (all == NULL) return -1;
    Scratch b = {.h = all, .tmp = (float *)(all + bytes)};
    b.qkv = (char *)b.h + M * H * esize;
    b.q = (char *)b.qkv + M * width * esize;
    b.att = (char *)b.q + M * heads * D * esize;
    b.gu = (char *)b.att + M * heads * D * esize;
    b.act = (char *)b.gu + M * 2 * I * esize;
    b.y = (char *)b.act + M * I * esize;
    int rc = 0;
    if (count > 0) residual_norm_rows(s, x, NULL, layers[0].input_norm, b.h, b.tmp);
    for (int i = 0; i < count && rc == 0; i++)
        rc = layer(&layers[i], i + 1 < count ? layers[i + 1].input_norm : NULL, x, &b, s);
    free(all);
    return rc;
}

/* ---- the stages alone, around torch's linears (runner.py, 9-64 decodes) ---- */

/* h = RMSNorm(x) * w */
int glue_norm(const Step *s, const void *x, const void *w, void *h) {
    float *tmp = (float *)malloc(tmp_floats(s) * sizeof(float));
    if (tmp == NULL) return -1;
    residual_norm_rows(s, (void *)x, NULL, w, h, tmp);
    free(tmp);
    return 0;
}

/* x += y; then h = RMSNorm(x) * w */
int glue_residual_norm(const Step *s, void *x, const void *y, const void *w, void *h) {
    float *tmp = (float *)malloc(tmp_floats(s) * sizeof(float));
    if (tmp == NULL) return -1;
    residual_norm_rows(s, x, y, w, h, tmp);
    free(tmp);
    return 0;
}

/* qkv (rotated in place) -> the caches and att; q: scratch [rows, heads, dim] */
int glue_attend(const Step *s, void *k_cache, void *v_cache, void *qkv, void *q, void *att) {
    return shape_ok(s) ? attend(s, k_cache, v_cache, qkv, q, att) : -2;
}

/* qkv's q and k rotated in place, its k and v into the caches (attention left to torch) */
int glue_rotate_write(const Step *s, void *k_cache, void *v_cache, void *qkv) {
    if (!shape_ok(s)) return -2;
    rotate_write(s, k_cache, v_cache, qkv, NULL);
    return 0;
}

/* act = silu(gate) * up */
int glue_silu_mul(const Step *s, const void *gu, void *act) {
    silu_mul(s, gu, act);
    return 0;
}
