/* A prompt chunk's causal attention with AVX512-BF16 dot products (VDPBF16PS), for CPUs that
 * have them but no AMX tiles (AMD's Zen 4 and 5, Intel's Cooper Lake).
 *
 * Why: torch's SDPA (its CPU flash kernel) ran a 512-token prompt's attention at about 30
 * GFLOP/s on a 2-core AMD EPYC (Zen 5): 5.4 ms a layer of this project's benchmark model, 180
 * of a 380 ms prefill, in bf16 and in fp32 alike. The work is the same as amx.c's (prompt.h):
 * each KV head's keys and values packed once per call into bf16 pairs, then per task (a
 * query head, 16 rows) S = Q K^T in float32, the exact softmax of each row, and O = P V.
 * Here each product is a run of VDPBF16PS: for S, one packed key row (16 keys, a pair of
 * dimensions) against a broadcast pair of each row's query; for O, one packed value row (16
 * dimensions, a pair of keys) against a broadcast pair of each row's weights.
 *
 * A row's result depends on its own query, the keys and values it sees and nothing else: its
 * sums run in the same order (dimension pairs, then key pairs, ascending) in any call, and
 * keys past the ones it sees add exact zeros. Row i (position start + i) sees keys 0 .. start
 * + i, as the runner's causal mask says. */
#include <stdint.h>

#include "bf16.h"
#include "prompt.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__x86_64__)
#include <omp.h>

int dp_available(void) { return 1; }

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

int dp_attend_causal(const uint16_t *q, int64_t q_row, const uint16_t *k, const uint16_t *v,
                     int64_t kv_stride, uint16_t *out, int64_t out_row, int n, int start,
                     int heads, int kv_heads, int D, float scale, int threads) {
    (void)q, (void)q_row, (void)k, (void)v, (void)kv_stride, (void)out, (void)out_row;
    (void)n, (void)start, (void)heads, (void)kv_heads, (void)D, (void)scale, (void)threads;
    return -2;
}
#endif
