/* genserve's sampling pass in C: temperature, the softmax and the inverse-CDF draw of each row
 * of a step, and whether the token drawn is surely inside the row's top_p nucleus.
 *
 * Why it exists: sampler.py does the same in batched torch ops, some twenty per step, each a
 * pass over [rows, vocab] and a wake-up of torch's threads: one row of a 49k vocabulary took
 * 0.3-0.8 ms at top_p 0.95 (most of it dispatch and thread wake-ups after a decode step), 32
 * rows 4.6-4.9 ms, on a 2-core AMX Xeon VM. Here a row is three passes over its logits on one
 * thread (rows split between threads).
 *
 * What it computes is sampler.py's draw (sampler.draw_batch): weights e^{x t - max}, t = 1 /
 * temperature, summed in blocks of 64 ids, and the first id whose cumulative weight exceeds u
 * times the total, never one of weight 0. A top_p row's draw from the whole distribution
 * stands when it is inside the nucleus: surely (the weights at least its own, less its own,
 * below top_p of the total with a margin for rounding), else by the mass before it in the
 * nucleus's order (one more pass). A draw outside is drawn again inside the nucleus with the
 * row's second uniform (nucleus_rows; the caller draws it from the row's generator, as
 * sampler.py does): accepting a draw from the whole distribution when it falls inside, and
 * drawing again inside otherwise, is a draw from the nucleus. A row is computed alone, on one
 * thread, in one order: its token is the same whatever rows share the call (rule 4).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vexp.h"

#define BLOCK 64  /* ids per block sum */
#define MARGIN 1e-4 /* of the total: covers the float32 block sums' rounding, far less */

/* max of x, or NaN when one is NaN */
static float row_max(const float *x, int V) {
    float m = -INFINITY;
    int nan = 0, j = 0;
#ifdef __AVX512F__
    __m512 mv = _mm512_set1_ps(-INFINITY);
    __mmask16 bad = 0;
    for (; j + 16 <= V; j += 16) {
        __m512 v = _mm512_loadu_ps(x + j);
        bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        mv = _mm512_max_ps(mv, v);
    }
    m = _mm512_reduce_max_ps(mv);
    nan = bad != 0;
#endif
    for (; j < V; j++) {
        m = x[j] > m ? x[j] : m;
        nan |= x[j] != x[j];
    }
    return nan ? NAN : m;
}

/* The sum of w[j0, j1) that are at least `floor` (all of them for -1), in float32, in one
 * fixed order: 16 lanes, then the lanes added up, then the tail. */
static float block_sum(const float *w, int j0, int j1, float floor) {
    float s = 0.0f;
    int j = j0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps(), lo = _mm512_set1_ps(floor);
    for (; j + 16 <= j1; j += 16) {
        __m512 v = _mm512_loadu_ps(w + j);
        acc = _mm512_mask_add_ps(acc, _mm512_cmp_ps_mask(v, lo, _CMP_GE_OQ), acc, v);
    }
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; j < j1; j++) s += w[j] >= floor ? w[j] : 0.0f;
    return s;
}

/* w = e^{x t - m t} and each block's sum; returns the total */
static double weigh(const float *x, int V, float t, float m, float *w, float *sums) {
    double total = 0.0;
    float mt = m * t;
    for (int b = 0; b * BLOCK < V; b++) {
        int j0 = b * BLOCK, j1 = j0 + BLOCK < V ? j0 + BLOCK : V, j = j0;
#ifdef __AVX512F__
        __m512 tv = _mm512_set1_ps(t), mtv = _mm512_set1_ps(mt);
        for (; j + 16 <= j1; j += 16)
            _mm512_storeu_ps(w + j, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), tv, mtv)));
#endif
        for (; j < j1; j++) w[j] = exp_nonpositive(fmaf(x[j], t, -mt));
        sums[b] = block_sum(w, j0, j1, -1.0f);
        total += sums[b];
    }
    return total;
}

/* The first id whose cumulative weight exceeds target (never one of weight 0): the block by
 * the block sums, then the id within it; rounding past the last block's end: the last id of
 * positive weight. */
static int32_t inverse_cdf(const float *w, const float *sums, int V, double target) {
    int blocks = (V + BLOCK - 1) / BLOCK, b = 0;
    double before = 0.0;
    while (b < blocks - 1 && before + sums[b] <= target) before += sums[b++];
    int j0 = b * BLOCK, j1 = j0 + BLOCK < V ? j0 + BLOCK : V;
    double cum = before;
    int last = -1;
    for (int j = j0; j < j1; j++) {
        if (w[j] <= 0.0f) continue;
        cum += w[j];
        last = j;
        if (cum > target) return j;
    }
    if (last >= 0) return last;
    for (int j = V - 1; j >= 0; j--) /* the block was all zeros: the last positive id */
        if (w[j] > 0.0f) return j;
    return -1;
}

/* Whether `token` is surely in the top_p nucleus (see the header). */
static int surely_in_nucleus(const float *w, int V, int32_t token, double top_p, double total) {
    float wt = w[token];
    if (!(wt > 0.0f)) return 0;
    if (top_p >= 1.0) return 1;
    double upper = 0.0;
    for (int j0 = 0; j0 < V; j0 += BLOCK)
        upper += block_sum(w, j0, j0 + BLOCK < V ? j0 + BLOCK : V, wt);
    return upper - wt < (top_p - MARGIN) * total;
}

/* ---- the exact nucleus, as sampler.py defines it: the stable descending order of x t (ties:
 * the lower id first), each token kept while the mass strictly before it is below top_p of the
 * total, never one of weight 0. Its boundary is a value v of x t and the last id c among the
 * ties at v: kept are the tokens above v, and those at v up to c. */

/* The sum of w where xt > v, or where xt >= v when `ge` */
static double mass_from(const float *xt, const float *w, int V, float v, int ge) {
    double total = 0.0;
    for (int j0 = 0; j0 < V; j0 += BLOCK) {
        int j1 = j0 + BLOCK < V ? j0 + BLOCK : V, j = j0;
        float s = 0.0f;
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps(), vv = _mm512_set1_ps(v);
        for (; j + 16 <= j1; j += 16) {
            __m512 xv = _mm512_loadu_ps(xt + j);
            __mmask16 in = ge ? _mm512_cmp_ps_mask(xv, vv, _CMP_GE_OQ)
                              : _mm512_cmp_ps_mask(xv, vv, _CMP_GT_OQ);
            acc = _mm512_mask_add_ps(acc, in, acc, _mm512_loadu_ps(w + j));
        }
        s = _mm512_reduce_add_ps(acc);
#endif
        for (; j < j1; j++) s += (ge ? xt[j] >= v : xt[j] > v) ? w[j] : 0.0f;
        total += s;
    }
    return total;
}

/* floats in the order of their values, as integers (no NaN here) */
static inline int32_t ordered(float f) {
    int32_t b;
    memcpy(&b, &f, sizeof b);
    return b >= 0 ? b : (int32_t)(b ^ 0x7fffffff);
}
static inline float unordered(int32_t k) {
    int32_t b = k >= 0 ? k : (int32_t)(k ^ 0x7fffffff);
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

typedef struct {
    float v;     /* the boundary value of x t */
    int32_t c;   /* the last id kept among the ties at v */
    double kept; /* the nucleus's mass */
} nucleus;

/* The largest value v of x t whose tokens at or above it reach `limit` (bisection over the
 * floats' order: the mass at or above v only changes at a token's value), then the ties at v
 * in id order up to the one that crosses. */
static nucleus find_nucleus(const float *xt, const float *w, int V, float lo_v, float hi_v,
                            double limit) {
    int32_t lo = ordered(lo_v), hi = ordered(hi_v);
    while (lo < hi) {
        int32_t mid = lo + (int32_t)(((int64_t)hi - lo + 1) / 2);
        if (mass_from(xt, w, V, unordered(mid), 1) >= limit)
            lo = mid;
        else
            hi = mid - 1;
    }
    nucleus n = {unordered(lo), -1, mass_from(xt, w, V, unordered(lo), 0)};
    for (int j = 0; j < V; j++) {
        if (xt[j] != n.v || !(w[j] > 0.0f)) continue;
        n.c = j;
        int crossed = n.kept + w[j] >= limit;
        n.kept += w[j];
        if (crossed) break;
    }
    return n;
}

static inline int in_nucleus(const float *xt, const float *w, int j, nucleus n) {
    return w[j] > 0.0f && (xt[j] > n.v || (xt[j] == n.v && j <= n.c));
}

/* Whether `token` is in the nucleus: the mass before it in the stable order, below top_p of
 * the total (one pass; for the draws not surely inside). */
static int in_nucleus_exactly(const float *xt, const float *w, int V, int32_t token,
                              double limit) {
    double before = mass_from(xt, w, V, xt[token], 0);
    for (int j = 0; j < token; j++)
        if (xt[j] == xt[token]) before += w[j];
    return w[token] > 0.0f && before < limit;
}

/* One row: *status 1 where the token stands, 0 where it fell outside its nucleus (the caller
 * draws a second uniform, nucleus_rows), -1 where the row cannot draw (not finite). */
static void draw_one(const float *x, int V, float t, double u, double top_p, float *w,
                     float *xt, float *sums, int32_t *token, int8_t *status) {
    *token = -1;
    *status = -1;
    float m = row_max(x, V);
    if (!isfinite(m)) return; /* the caller's torch path reports the row */
    double total = weigh(x, V, t, m, w, sums);
    if (!(total > 0.0) || !isfinite(total)) return;
    *token = inverse_cdf(w, sums, V, u * total);
    if (*token < 0) return;
    if (surely_in_nucleus(w, V, *token, top_p, total)) {
        *status = 1;
        return;
    }
    for (int j = 0; j < V; j++) xt[j] = x[j] * t; /* the order sampler.py sorts by */
    *status = (int8_t)in_nucleus_exactly(xt, w, V, *token, top_p * total);
}

/* The draw inside the nucleus with a second uniform u2: the first kept id (in id order) whose
 * cumulative weight exceeds u2 times the nucleus's mass. */
static int32_t redraw_one(const float *x, int V, float t, double u2, double top_p, float *w,
                          float *xt, float *sums) {
    float m = row_max(x, V);
    if (!isfinite(m)) return -1;
    double total = weigh(x, V, t, m, w, sums);
    if (!(total > 0.0) || !isfinite(total)) return -1;
    float lo = INFINITY;
    for (int j = 0; j < V; j++) {
        xt[j] = x[j] * t;
        lo = xt[j] < lo && w[j] > 0.0f ? xt[j] : lo;
    }
    nucleus n = find_nucleus(xt, w, V, lo, m * t, top_p * total);
    double target = u2 * n.kept, cum = 0.0;
    int32_t last = -1;
    for (int j = 0; j < V; j++) {
        if (!in_nucleus(xt, w, j, n)) continue;
        cum += w[j];
        last = j;
        if (cum > target) return j;
    }
    return last;
}

/* Each thread's buffers: weights, x t, block sums. */
static float *scratch(int V) {
    return malloc(((size_t)2 * V + (V + BLOCK - 1) / BLOCK) * sizeof(float));
}

/* Rows of x [rows, V] float32 (row stride ld): t[i] = 1 / temperature, u[i] in [0, 1), top_p[i]
 * (1: none). tokens[i] gets the drawn id; status[i] 1 where it stands, 0 where the row draws
 * again inside its nucleus (nucleus_rows, with a second uniform), -1 where it cannot draw (the
 * caller reports it). Returns 0, -1 when memory ran out. */
int sample_rows(const float *x, int64_t ld, int rows, int V, const float *t, const double *u,
                const double *top_p, int32_t *tokens, int8_t *status, int threads) {
    int failed = 0;
    if (threads > rows) threads = rows;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        float *w = scratch(V);
        failed = w == NULL;
#pragma omp for schedule(static) /* every thread reaches it, with memory or not */
        for (int i = 0; i < rows; i++) {
            tokens[i] = -1, status[i] = -1;
            if (w != NULL)
                draw_one(x + (size_t)i * ld, V, t[i], u[i], top_p[i], w, w + V,
                         w + 2 * (size_t)V, tokens + i, status + i);
        }
        free(w);
    }
    return failed ? -1 : 0;
}

/* The rows whose first draw fell outside their nucleus, drawn again inside it with their second
 * uniforms u2; tokens[i] -1 where a row cannot draw. Returns 0, -1 when memory ran out. */
int nucleus_rows(const float *x, int64_t ld, int rows, int V, const float *t, const double *u2,
                 const double *top_p, int32_t *tokens, int threads) {
    int failed = 0;
    if (threads > rows) threads = rows;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        float *w = scratch(V);
        failed = w == NULL;
#pragma omp for schedule(static)
        for (int i = 0; i < rows; i++)
            tokens[i] = w == NULL ? -1
                                  : redraw_one(x + (size_t)i * ld, V, t[i], u2[i], top_p[i], w,
                                               w + V, w + 2 * (size_t)V);
        free(w);
    }
    return failed ? -1 : 0;
}
