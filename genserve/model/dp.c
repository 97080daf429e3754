/* genserve's AVX512-BF16 kernels (VDPBF16PS: 16 float32 sums each += two bf16 products), for
 * CPUs that have those dot products but no AMX tiles (AMD's Zen 4 and 5, Intel's Cooper Lake):
 * the linear y = x W^T for a batched decode step's 9-64 rows, and a prompt chunk's causal
 * attention. Each is one more candidate, kept where it measures faster (hardware.py for the
 * linear, the runner for the attention).
 *
 * The linear. Why: oneDNN's bf16 kernel ran a 32-row product of the benchmark model's 3072 x
 * 576 weight at 0.48 TFLOP/s on a 2-core Zen 5 EPYC, where its 512-row products run at ~0.75.
 * The weight is packed once (native.Dp) as amx.c packs it, [N/16][K/2][16 columns][2]: each
 * block of 16 output columns is one stream of 64-byte vectors, a pair of k for its 16 columns
 * each. A call splits panels of four such blocks (64 columns) between the threads, and runs
 * every group of up to 6 rows of x through the panel with 24 accumulators (6 rows x 4 blocks):
 * per pair of k, four weight vectors and six broadcast pairs of x for 24 dot products; the
 * panel (K x 128 bytes) stays in cache while the row groups go by, and at 9-64 rows the next
 * panel comes into L2 meanwhile (NextPanel). A row's sums run over k in order whatever the
 * call's rows, so the kernel is batch-invariant by construction.
 *
 * The prompt attention. Why: torch's SDPA (its CPU flash kernel) ran a 512-token prompt's
 * attention at about 30 GFLOP/s on the same EPYC: 5.4 ms a layer of this project's benchmark
 * model, 180 of a 380 ms prefill, in bf16 and in fp32 alike. The work is the same as amx.c's
 * (prompt.h): each KV head's keys and values packed once per call into bf16 pairs, then per
 * task (a query head, 16 rows) S = Q K^T in float32, the exact softmax of each row, and O = P V.
 * Here each product is a run of VDPBF16PS: for S, one packed key row (16 keys, a pair of
 * dimensions) against a broadcast pair of each row's query; for O, one packed value row (16
 * dimensions, a pair of keys) against a broadcast pair of each row's weights. A row's result
 * depends on its own query, the keys and values it sees and nothing else: its sums run in the
 * same order (dimension pairs, then key pairs, ascending) in any call, and keys past the ones
 * it sees add exact zeros. Row i (position start + i) sees keys 0 .. start + i, as the
 * runner's causal mask says. */
#include <stdint.h>

#include "bf16.h"
#include "prompt.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__x86_64__)
#include <omp.h>

int dp_available(void) { return 1; }

/* ---- The linear ---- */

#define DP_ROWS 6   /* rows of x per group */
#define DP_BLOCKS 4 /* 16-column blocks per panel */

/* The next panel a thread will sum, fetched into L2 while it sums this one: `lines` cache
 * lines from `at`, spread evenly over the `passes` passes of k this panel's groups make.
 *
 * Why: a batch's panel is read from memory once, then from cache by each group of rows; the
 * hardware prefetcher fetched no further than the panel's end, so each new panel began with
 * the cores waiting on memory. On the 2-core Zen 5 EPYC, the benchmark model's 30 layers of
 * four linears and its LM head, bf16 weights from memory, builds alternating: 32 rows 14.4-14.9
 * -> 11.5-12.0 ms, 16 rows 10.0-10.5 -> 7.7-8.0 ms (fastest of 15 runs each). Only for 9-64
 * rows: a prompt's many groups keep the cores busy on one panel, and fetching the next ran
 * 512 rows about 5% slower; one to eight rows mostly stream the weight, and measured
 * 0.92-1.06x with it, not clearly better, so they go without. */
typedef struct {
    const char *at;
    int left, lines, passes, acc; /* lines not yet fetched; acc: lines owed, times passes */
} NextPanel;

static inline void next_panel_step(NextPanel *n) {
    for (n->acc += n->lines; n->acc >= n->passes && n->left > 0; n->acc -= n->passes) {
        _mm_prefetch(n->at, _MM_HINT_T1);
        n->at += 64;
        n->left--;
    }
}

/* Rows [0, R) of x against column blocks [0, C) of the panel at w (blocks `stride` halves
 * apart), into y (float32 sums, or bf16 when y_bf16). R, C: constants where inlined. `next`:
 * the panel to fetch meanwhile, or NULL. */
static inline __attribute__((always_inline)) void dp_group(
    const uint16_t *x, size_t ldx, const uint16_t *w, size_t stride, int K, void *y, size_t ldy,
    int y_bf16, const int R, const int C, NextPanel *next) {
    __m512 acc[DP_ROWS * DP_BLOCKS];
    for (int j = 0; j < R * C; j++) acc[j] = _mm512_setzero_ps();
    for (int kp = 0; kp < K / 2; kp++) {
        if (next != NULL) next_panel_step(next);
        __m512bh wv[DP_BLOCKS];
        for (int c = 0; c < C; c++)
            wv[c] = (__m512bh)_mm512_loadu_si512(w + c * stride + (size_t)kp * 32);
        for (int r = 0; r < R; r++) {
            uint32_t pair;
            memcpy(&pair, x + r * ldx + 2 * kp, sizeof pair);
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int c = 0; c < C; c++) acc[r * C + c] = _mm512_dpbf16_ps(acc[r * C + c], xb, wv[c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            if (y_bf16)
                _mm256_storeu_si256((__m256i *)((uint16_t *)y + r * ldy + c * 16),
                                    (__m256i)_mm512_cvtneps_pbh(acc[r * C + c]));
            else
                _mm512_storeu_ps((float *)y + r * ldy + c * 16, acc[r * C + c]);
        }
}

/* dp_group with R and C as constants: 6 x 4 for whole groups and panels, the rest at the
 * edges; `_next` fetches the next panel meanwhile, the other nothing (no test in its loop). */
#define DP_GROUP_ANY(NAME, NEXT)                                                               \
    static void NAME(const uint16_t *x, size_t ldx, const uint16_t *w, size_t stride, int K,     \
                     void *y, size_t ldy, int y_bf16, int R, int C, NextPanel *next) {          \
        (void)next;                                                                            \
        switch (R * 8 + C) {                                                                   \
            DP_ROW(1, NEXT) DP_ROW(2, NEXT) DP_ROW(3, NEXT)                                    \
            DP_ROW(4, NEXT) DP_ROW(5, NEXT) DP_ROW(6, NEXT)                                    \
        }                                                                                      \
    }
#define DP_CASE(r, c, NEXT)                                                                    \
    case (r) * 8 + (c):                                                                        \
        dp_group(x, ldx, w, stride, K, y, ldy, y_bf16, r, c, NEXT);                            \
        return;
#define DP_ROW(r, NEXT) DP_CASE(r, 1, NEXT) DP_CASE(r, 2, NEXT) DP_CASE(r, 3, NEXT) DP_CASE(r, 4, NEXT)
DP_GROUP_ANY(dp_group_any, NULL)
DP_GROUP_ANY(dp_group_any_next, next)
#undef DP_ROW
#undef DP_CASE
#undef DP_GROUP_ANY

/* Panels [p0, p1) of y = x W^T: one thread's run, so that panel p + 1 is its own next. */
static void dp_panels(const uint16_t *x, const uint16_t *w, void *y, int y_bf16, int M, int N,
                      int K, int p0, int p1) {
    size_t stride = (size_t)K * 16, esize = y_bf16 ? 2 : 4;
    int blocks = N / 16;
    /* groups as even as can be (32 rows: 6, 6, 5, 5, 5, 5): a group of few rows has too few
     * accumulators to hide the dot product's latency */
    int groups = (M + DP_ROWS - 1) / DP_ROWS;
    int fetch = M > 8 && M <= 64; /* the rows NextPanel pays for */
    for (int p = p0; p < p1; p++) {
        int b0 = p * DP_BLOCKS, c = blocks - b0 < DP_BLOCKS ? blocks - b0 : DP_BLOCKS;
        int b1 = b0 + DP_BLOCKS, c1 = blocks - b1 < DP_BLOCKS ? blocks - b1 : DP_BLOCKS;
        NextPanel next = {
            .at = (const char *)(w + (size_t)b1 * stride),
            .left = fetch && p + 1 < p1 ? (int)((size_t)c1 * stride * sizeof(uint16_t) / 64) : 0,
            .passes = groups * (K / 2),
        };
        next.lines = next.left;
        const uint16_t *wp = w + (size_t)b0 * stride;
        for (int gi = 0, m = 0; gi < groups; gi++) {
            int r = M / groups + (gi < M % groups);
            char *yp = (char *)y + ((size_t)m * N + (size_t)b0 * 16) * esize;
            if (next.left > 0)
                dp_group_any_next(x + (size_t)m * K, (size_t)K, wp, stride, K, yp, (size_t)N,
                                  y_bf16, r, c, &next);
            else
                dp_group_any(x + (size_t)m * K, (size_t)K, wp, stride, K, yp, (size_t)N, y_bf16,
                             r, c, NULL);
            m += r;
        }
    }
}

/* x [M, K] bf16, w packed [N/16][K/2][16][2] bf16, y [M, N] (bf16 when y_bf16, else float32
 * sums). Returns 0, or -2 for a shape it does not take. */
int dp_linear_bf16(const uint16_t *x, const uint16_t *w, void *y, int y_bf16, int M, int N,
                   int K, int threads) {
    if (M < 1 || N % 16 || K % 2) return -2;
    int panels = (N / 16 + DP_BLOCKS - 1) / DP_BLOCKS;
#pragma omp parallel num_threads(threads)
    {
        long t = omp_get_thread_num(), nt = omp_get_num_threads();
        dp_panels(x, w, y, y_bf16, M, N, K, (int)(panels * t / nt), (int)(panels * (t + 1) / nt));
    }
    return 0;
}

/* ---- The prompt attention ---- */

/* Scores of 16 rows (their queries' dimension pairs at q[i], zeros past `rows`) against key
 * block b: s[i * ls + b * 16 + key], float32, unscaled. 16 accumulators, one a row. */
static void scores_block(const uint32_t *const *q, const uint16_t *kp, int b, int D, float *s,
                         size_t ls) {
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int d = 0; d < D / 32; d++) {
        const uint32_t *t = (const uint32_t *)(kp + ((size_t)b * (D / 32) + d) * 512);
        for (int r = 0; r < 16; r++) { /* dims 2r, 2r + 1 of this block: 16 keys' pairs */
            __m512bh keys = (__m512bh)_mm512_loadu_si512(t + r * 16);
            for (int i = 0; i < 16; i++)
                acc[i] = _mm512_dpbf16_ps(
                    acc[i], (__m512bh)_mm512_set1_epi32((int)q[i][d * 16 + r]), keys);
        }
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(s + i * ls + (size_t)b * 16, acc[i]);
}

/* O = P V for rows [i0, i0 + RG) and dims [0, CS * 16): RG x CS accumulators (16 in all),
 * over key blocks [0, b32). o: 16 rows x 128 floats. */
static inline __attribute__((always_inline)) void values_group(
    const uint16_t *p, size_t lp, const uint16_t *vp, int b32, int i0, float *o, const int RG,
    const int CS) {
    __m512 acc[16];
    for (int j = 0; j < RG * CS; j++) acc[j] = _mm512_setzero_ps();
    for (int b = 0; b < b32; b++) {
        const uint32_t *vb = (const uint32_t *)(vp + (size_t)b * CS * 512);
        for (int r = 0; r < 16; r++) { /* keys b * 32 + 2r and + 1 */
            for (int c = 0; c < CS; c++) {
                __m512bh v = (__m512bh)_mm512_loadu_si512(vb + (size_t)c * 256 + r * 16);
                for (int i = 0; i < RG; i++) {
                    uint32_t w;
                    memcpy(&w, p + (size_t)(i0 + i) * lp + (size_t)b * 32 + 2 * r, sizeof w);
                    acc[i * CS + c] =
                        _mm512_dpbf16_ps(acc[i * CS + c], (__m512bh)_mm512_set1_epi32((int)w), v);
                }
            }
        }
    }
    for (int i = 0; i < RG; i++)
        for (int c = 0; c < CS; c++) _mm512_storeu_ps(o + (i0 + i) * 128 + c * 16, acc[i * CS + c]);
}

/* Query head h, rows [r0, r0 + 16) (fewer at the end), as amx.c's prompt_task. */
static void dp_task(const Prompt *a, int h, int r0, float *s, uint16_t *p) {
    int rows = a->n - r0 < 16 ? a->n - r0 : 16, D = a->D, g = h / a->group;
    int seen_max = a->start + r0 + rows; /* keys the block's last row sees */
    int b16 = (seen_max + 15) / 16, b32 = (seen_max + 31) / 32;
    size_t ls = (size_t)a->kblocks16 * 16, lp = (size_t)a->kblocks32 * 32;
    static const uint32_t zeros[PA_MAX_DIM / 2];
    const uint32_t *q[16];
    for (int i = 0; i < 16; i++)
        q[i] = i < rows ? (const uint32_t *)(a->q + (size_t)(r0 + i) * a->q_row + (size_t)h * D)
                        : zeros;
    const uint16_t *kp = a->kp + (size_t)g * a->kblocks16 * (D / 32) * 512;
    const uint16_t *vp = a->vp + (size_t)g * a->kblocks32 * (D / 16) * 512;
    for (int b = 0; b < b16; b++) scores_block(q, kp, b, D, s, ls);
    float total[16];
    for (int i = 0; i < 16; i++) {
        uint16_t *pi = p + i * lp;
        if (i < rows)
            total[i] = softmax_row(s + i * ls, a->start + r0 + i + 1, b32 * 32, a->scale, pi);
        else
            memset(pi, 0, (size_t)b32 * 32 * 2), total[i] = 1.f;
    }
    float o[16 * 128];
    for (int i0 = 0; i0 < rows; i0 += 16 / (D / 16)) { /* constants, for the registers */
        if (D == 32)
            values_group(p, lp, vp, b32, i0, o, 8, 2);
        else if (D == 64)
            values_group(p, lp, vp, b32, i0, o, 4, 4);
        else
            values_group(p, lp, vp, b32, i0, o, 2, 8);
    }
    for (int i = 0; i < rows; i++) {
        uint16_t *dst = a->out + (size_t)(r0 + i) * a->out_row + (size_t)h * D;
        float inv = 1.f / total[i];
        for (int d = 0; d < D; d++) dst[d] = f32_to_bf16(o[i * 128 + d] * inv);
    }
}

/* As amx_attend_causal (amx.c): q, out rows [n, heads, D] bf16 at q_row / out_row elements
 * apart; k, v each KV head's cache rows for positions 0 .. start + n - 1, [end, D] contiguous,
 * heads kv_stride elements apart. D: 32, 64 or 128. Returns 0, -1 when memory ran out, -2 for
 * a shape it does not take. */
int dp_attend_causal(const uint16_t *q, int64_t q_row, const uint16_t *k, const uint16_t *v,
                     int64_t kv_stride, uint16_t *out, int64_t out_row, int n, int start,
                     int heads, int kv_heads, int D, float scale, int threads) {
    if ((D != 32 && D != 64 && D != 128) || kv_heads < 1 || heads % kv_heads || n < 1 ||
        start < 0)
        return -2;
    int end = start + n, kb16 = (end + 15) / 16, kb32 = (end + 31) / 32;
    size_t kp_size = (size_t)kb16 * (D / 32) * 512, vp_size = (size_t)kb32 * (D / 16) * 512;
    uint16_t *kp = scratch(0, kp_size * kv_heads * 2), *vp = scratch(1, vp_size * kv_heads * 2);
    size_t s_floats = (size_t)16 * kb16 * 16, p_halves = (size_t)16 * kb32 * 32;
    char *sp = scratch(2, (size_t)threads * (s_floats * 4 + p_halves * 2));
    if (kp == NULL || vp == NULL || sp == NULL) return -1;
    Prompt a = {q, kp, vp, out, (size_t)q_row, (size_t)out_row, n, start, heads,
                heads / kv_heads, D, kb16, kb32, scale};
    int qblocks = (n + 15) / 16, tasks = heads * qblocks;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int g = 0; g < 2 * kv_heads; g++) {
            int h = g / 2;
            if (g % 2 == 0)
                pack_keys(k + (size_t)h * kv_stride, (size_t)D, end, D, kp + h * kp_size, kb16);
            else
                pack_values(v + (size_t)h * kv_stride, (size_t)D, end, D, vp + h * vp_size, kb32);
        }
        int t = omp_get_thread_num();
        float *sb = (float *)(sp + (size_t)t * (s_floats * 4 + p_halves * 2));
        uint16_t *pb = (uint16_t *)(sb + s_floats);
        /* the last rows see the most keys: they go first */
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++)
            dp_task(&a, task % heads, (qblocks - 1 - task / heads) * 16, sb, pb);
    }
    return 0;
}
#else
int dp_available(void) { return 0; }

int dp_linear_bf16(const uint16_t *x, const uint16_t *w, void *y, int y_bf16, int M, int N,
                   int K, int threads) {
    (void)x, (void)w, (void)y, (void)y_bf16, (void)M, (void)N, (void)K, (void)threads;
    return -2;
}

int dp_attend_causal(const uint16_t *q, int64_t q_row, const uint16_t *k, const uint16_t *v,
                     int64_t kv_stride, uint16_t *out, int64_t out_row, int n, int start,
                     int heads, int kv_heads, int D, float scale, int threads) {
    (void)q, (void)q_row, (void)k, (void)v, (void)kv_stride, (void)out, (void)out_row;
    (void)n, (void)start, (void)heads, (void)kv_heads, (void)D, (void)scale, (void)threads;
    return -2;
}
#endif
