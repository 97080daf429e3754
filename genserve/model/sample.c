/* genserve's sampling pass in C: temperature, the softmax and the inverse-CDF draw of each row
 * of a step, and whether the token drawn is surely inside the row's top_p nucleus.
 *
 * Why it exists: sampler.py does the same in batched torch ops, some twenty per step, each a
 * pass over [rows, vocab] and a wake-up of torch's threads: one row of a 49k vocabulary took
 * 0.3-0.8 ms at top_p 0.95 (most of it dispatch and thread wake-ups after a decode step), 32
 * rows 4.6-4.9 ms, on a 2-core AMX Xeon VM. Here a row is three passes over its logits on one
 * thread (rows split between threads).
 *
 * What it computes is sampler.py's first draw (sampler.draw_batch): weights e^{x t - max},
 * t = 1 / temperature, summed in blocks of 64 ids, and the first id whose cumulative weight
 * exceeds u times the total, never one of weight 0. A top_p row's draw from the whole
 * distribution is kept when it is surely in the nucleus (the weights at least its own, less
 * its own, below top_p of the total with a margin for rounding); the caller draws the other
 * rows again with sampler.py's exact nucleus. A row is computed alone, on one thread, in one
 * order: its token is the same whatever rows share the call (rule 4).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

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
    for (int j0 = 0; j0 < V; j0 += BLOCK) upper += block_sum(w, j0, j0 + BLOCK < V ? j0 + BLOCK : V, wt);
    return upper - wt < (top_p - MARGIN) * total;
}

static void draw_one(const float *x, int V, float t, double u, double top_p, float *w,
                     float *sums, int32_t *token, int8_t *sure) {
    *token = -1;
    *sure = 0;
    float m = row_max(x, V);
    if (!isfinite(m)) return; /* the caller's torch path reports the row */
    double total = weigh(x, V, t, m, w, sums);
    if (!(total > 0.0) || !isfinite(total)) return;
    *token = inverse_cdf(w, sums, V, u * total);
    *sure = *token >= 0 && surely_in_nucleus(w, V, *token, top_p, total);
}

/* Rows of x [rows, V] float32 (row stride ld): t[i] = 1 / temperature, u[i] in [0, 1), top_p[i]
 * (1: none). tokens[i] gets the drawn id, sure[i] 1 where it stands (0: draw the row again with
 * the exact nucleus, or report it). Returns 0, -1 when memory ran out. */
int sample_rows(const float *x, int64_t ld, int rows, int V, const float *t, const double *u,
                const double *top_p, int32_t *tokens, int8_t *sure, int threads) {
    int blocks = (V + BLOCK - 1) / BLOCK, failed = 0;
    if (threads > rows) threads = rows;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        float *w = malloc(((size_t)V + blocks) * sizeof *w);
        failed = w == NULL;
#pragma omp for schedule(static) /* every thread reaches it, with memory or not */
        for (int i = 0; i < rows; i++) {
            tokens[i] = -1, sure[i] = 0;
            if (w != NULL)
                draw_one(x + (size_t)i * ld, V, t[i], u[i], top_p[i], w, w + V, tokens + i,
                         sure + i);
        }
        free(w);
    }
    return failed ? -1 : 0;
}
