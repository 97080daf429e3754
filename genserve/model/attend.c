/* genserve's decode attention over the KV lanes: one new token per sequence, each reading its
 * own lane of the cache in place.
 *
 * Why it exists: at 32 streams and 512 cached positions, torch's SDPA on the lanes' views was
 * 52% of a decode step on the 2-core AMX Xeon (2.5 ms a layer, reading K and V at about
 * 5 GB/s). Here each (sequence, KV head) pair is one task that streams its keys once for
 * the query heads sharing that KV head, then its values once, in float32. Whether it runs is
 * measured at start-up against SDPA (runner.py), as the linear kernels are.
 *
 * Layout (runner.py): a layer's cache is [kv_heads, rows, D]; sequence j's lane starts at row
 * row0 + j * lane_len; q and out are [span, heads, D]; query head h reads KV head
 * h / (heads / kv_heads), as transformers' repeat_kv does.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "vexp.h"

/* one row of D keys or values as float32 */
static inline void row_f32(const void *base, int bf16, size_t at, int D, float *out) {
    if (bf16) {
        const uint16_t *p = (const uint16_t *)base + at;
#pragma omp simd
        for (int d = 0; d < D; d++) out[d] = bf16_to_f32(p[d]);
    } else {
        memcpy(out, (const float *)base + at, (size_t)D * sizeof(float));
    }
}

/* A thread reads its tasks as one stream: a task's keys, then its values, then the next
 * task's keys... Ahead walks the keys' rows in front of the reads and prefetches each row's
 * key and its value into L2, across the end of a task into the next (which it claims from
 * the shared counter, so the threads still balance as a dynamic schedule does). It steps one
 * row every second key of the scores pass and every second value of the values pass, so the
 * memory stays busy through both passes at the rate the rows are used; the values pass reads
 * from L2.
 *
 * Why: a lane's keys are a short stream (a few hundred rows, a few 4 KiB pages), which the
 * hardware prefetcher barely picked up before it ended, and a prefetch a fixed distance
 * ahead inside the task wasted its distance at every task's end. 30 layers of 32 lanes x
 * ~200 positions from memory (bf16, 141 MB): 10.9 ms with the per-task prefetch, against
 * 6.2 ms for a loop that only reads the same rows (2-core AMX Xeon). And two streams at a
 * time: a loop reading each task's keys and values side by side took 6.0 ms where keys then
 * values took 6.9, and prefetching the values with the keys (rather than after them) took
 * this kernel from 9.3-9.5 to 8.4-8.7 ms (24 to 96 rows ahead alike). Stepping only in the
 * scores pass left the memory idle through each values pass; split between the passes, and
 * 160 rows ahead rather than 48, a layer of 32 lanes took 0.15-0.17 ms against 0.18-0.20 (up
 * to 256 positions) and 0.31-0.33 against 0.33-0.36 (up to 528) on the 2-core Zen 5 EPYC
 * (bench/lane_attention.py, builds alternating; the split alone at 48 rows: 0.17-0.20 against
 * 0.20-0.22). */
#define AHEAD 160
#define RING 64 /* tasks claimed and not yet done, at most */

typedef struct {
    const char *k, *v;
    const int32_t *lanes, *lengths;
    int kv_heads, tasks;
    size_t rows, row0, lane_len, row_bytes;
    int *counter;           /* next task no thread has claimed */
    int ring[RING], head, tail; /* claimed tasks: ring[head..tail) */
    int at, row;                /* the cursor: ring slot, row */
    const char *base;           /* the cursor's row 0 */
    int len;                    /* the cursor's task's length */
} Ahead;

static inline size_t task_row0(const Ahead *a, int task) {
    int j = task / a->kv_heads, h = task % a->kv_heads;
    return (size_t)h * a->rows + a->row0 + (size_t)a->lanes[j] * a->lane_len;
}

/* Point the cursor at ring slot `at`'s keys, claiming a task there first if none is; 0 when
 * every task is claimed (the cursor then rests). */
static int ahead_enter(Ahead *a) {
    if (a->at == a->tail) {
        if (a->tail - a->head == RING) return 0;
        int task = __atomic_fetch_add(a->counter, 1, __ATOMIC_RELAXED);
        if (task >= a->tasks) return 0;
        a->ring[a->tail++ % RING] = task;
    }
    int task = a->ring[a->at % RING];
    a->len = a->lengths[task / a->kv_heads];
    a->base = a->k + task_row0(a, task) * a->row_bytes;
    a->row = 0;
    return 1;
}

static inline void ahead_step(Ahead *a) {
    if (a->base == NULL) return;
    const char *p = a->base + (size_t)a->row * a->row_bytes, *pv = a->v + (p - a->k);
    for (size_t b = 0; b < a->row_bytes; b += 64) {
        __builtin_prefetch(p + b, 0, 2); /* L2 */
        __builtin_prefetch(pv + b, 0, 2);
    }
    if (++a->row < a->len) return;
    a->row = 0;
    a->at++;
    if (!ahead_enter(a)) a->base = NULL;
}

/* The next task this thread runs (claiming one where the cursor has not), or -1. A cursor
 * at rest (every task claimed, or the ring full) tries again from here. */
static int ahead_next(Ahead *a) {
    if (a->head == a->tail) {
        int task = __atomic_fetch_add(a->counter, 1, __ATOMIC_RELAXED);
        if (task >= a->tasks) return -1;
        a->ring[a->tail++ % RING] = task;
    }
    int task = a->ring[a->head++ % RING];
    if (a->base == NULL) { /* at rest: the cursor stays so unless it finds a task */
        if (a->at < a->head) a->at = a->head;
        ahead_enter(a);
    }
    return task;
}

#define MAX_GROUP 16 /* query heads per KV head handled in one task */
#define MAX_DIM 256

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define ATTEND_AVX512 1

/* 16 cached elements (bf16 or float32) widened to float32 */
static inline __m512 load16(const void *base, int bf16, size_t at) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + at));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)base + at);
}

/* r[j] = the sum of v[j]'s 16 lanes, for 16 vectors at once: pairs, quads, then 128-bit
 * lanes, added in a fixed tree (about 3 instructions a vector, against 9 for one
 * _mm512_reduce_add_ps). Each r[j] adds only v[j]'s lanes, in an order that does not depend
 * on the other vectors, so a key's score is the same bits in any block of keys. */
static inline __m512 sum16x16(const __m512 v[16]) {
    __m512 w[8], x[4], y[2];
    for (int j = 0; j < 8; j++) /* per 128-bit lane: [v2j, v2j+1, v2j, v2j+1] partials */
        w[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                             _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 4; j++) { /* per lane: the partials of v4j .. v4j+3, in order */
        __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
        x[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int j = 0; j < 2; j++) /* lanes 0+1 and 2+3 of two quads */
        y[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88),
                         _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

/* s[i * len + t] = q_i . key_t for the group's query heads; each key loaded once, its
 * group's partial sums kept, and summed 16 keys at a time (sum16x16). With `dp` (bf16 caches
 * where the CPU has AVX512-BF16; a constant at each call, so each is its own loop) the keys
 * and the query heads qb are multiplied as stored by pair dot products, each pair's products
 * exact in float32, and the scale applied to each sum (30 layers x 32 lanes x ~200 positions:
 * 5.5 -> 5.0 ms in cache, 8.4 -> 8.1 ms from memory); else the keys are widened and multiplied
 * by qf, the query heads in float32 already scaled. */
static inline __attribute__((always_inline)) void scores_avx512(
    float qf[][MAX_DIM], const uint16_t *qb, const void *k, int bf16, int dp, size_t cache0,
    int len, int group, int D, float scale, float *s, Ahead *ahead) {
#ifdef __AVX512BF16__
    __m512bh qv[MAX_GROUP][MAX_DIM / 32];
    for (int i = 0; dp && i < group; i++)
        for (int c = 0; c < D / 32; c++)
            qv[i][c] = (__m512bh)_mm512_loadu_si512(qb + (size_t)i * D + 32 * c);
#else
    (void)qb;
#endif
    __m512 part[MAX_GROUP][16], vscale = _mm512_set1_ps(dp ? scale : 1.f);
    for (int t0 = 0; t0 < len; t0 += 16) {
        int n = len - t0 < 16 ? len - t0 : 16;
        for (int t = 0; t < 16; t++) {
            __m512 a[MAX_GROUP];
            for (int i = 0; i < group; i++) a[i] = _mm512_setzero_ps();
            if (t < n) { /* past the last key: zeros, summed and not stored */
                size_t at = (cache0 + t0 + t) * D;
                if (t % 2 == 0) ahead_step(ahead); /* the odd ones in the values pass */
#ifdef __AVX512BF16__
                if (dp) {
                    for (int c = 0; c < D / 32; c++) {
                        __m512bh kv = (__m512bh)_mm512_loadu_si512((const uint16_t *)k + at + 32 * c);
                        for (int i = 0; i < group; i++) a[i] = _mm512_dpbf16_ps(a[i], qv[i][c], kv);
                    }
                } else
#endif
                    for (int d = 0; d < D; d += 16) {
                        __m512 kv = load16(k, bf16, at + d);
                        for (int i = 0; i < group; i++)
                            a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qf[i] + d), kv, a[i]);
                    }
            }
            for (int i = 0; i < group; i++) part[i][t] = a[i];
        }
        __mmask16 keep = (__mmask16)((1u << n) - 1);
        for (int i = 0; i < group; i++) {
            __m512 sums = sum16x16(part[i]);
            if (dp) sums = _mm512_mul_ps(sums, vscale);
            _mm512_mask_storeu_ps(s + (size_t)i * len + t0, keep, sums);
        }
    }
}

/* acc[i] = sum over t of p_i(t) * value_t; each value row loaded once (from L2: Ahead
 * fetched it with its key), the group's sums kept in registers where they fit (D = 64: 4
 * vectors a head). Ahead steps at every odd t of the first pass over the dimensions. */
static inline __attribute__((always_inline)) void values_avx512(
    const void *v, int bf16, size_t cache0, int len, int group, int D, const float *p,
    float acc[][MAX_DIM], Ahead *ahead) {
    enum { CHUNKS = 4 }; /* 64 dims a pass over the values */
    for (int d0 = 0; d0 < D; d0 += 16 * CHUNKS) {
        int n = (D - d0) / 16 < CHUNKS ? (D - d0) / 16 : CHUNKS;
        __m512 a[MAX_GROUP][CHUNKS];
        for (int i = 0; i < group; i++)
            for (int c = 0; c < CHUNKS; c++) a[i][c] = _mm512_setzero_ps();
        for (int t = 0; t < len; t++) {
            size_t at = (cache0 + t) * D + d0;
            if (d0 == 0 && t % 2 == 1) ahead_step(ahead);
            __m512 vv[CHUNKS];
            for (int c = 0; c < n; c++) vv[c] = load16(v, bf16, at + 16 * c);
            for (int i = 0; i < group; i++) {
                __m512 pi = _mm512_set1_ps(p[(size_t)i * len + t]);
                for (int c = 0; c < n; c++) a[i][c] = _mm512_fmadd_ps(pi, vv[c], a[i][c]);
            }
        }
        for (int i = 0; i < group; i++)
            for (int c = 0; c < n; c++) _mm512_storeu_ps(acc[i] + d0 + 16 * c, a[i][c]);
    }
}
#endif

/* s[0..len-1] <- exp(s - max s); returns their sum */
static float softmax(float *s, int len) {
    float top = -INFINITY, sum = 0.f;
    int t = 0;
#ifdef ATTEND_AVX512
    /* the max in vectors: a scalar running max is one dependent compare a score (the same
     * max either way). 32-stream engine step's attention 10.8 -> 10.0 ms; a copy of the
     * scores and values passes specialised for 64 dims was faster with the keys in cache
     * (0.37 -> 0.28 ms a layer) but slower from memory, and was not kept. */
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (; t + 16 <= len; t += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + t));
    top = _mm512_reduce_max_ps(vmax);
#endif
    for (; t < len; t++) top = s[t] > top ? s[t] : top;
    t = 0;
#ifdef ATTEND_AVX512
    __m512 vtop = _mm512_set1_ps(top), vsum = _mm512_setzero_ps();
    for (; t + 16 <= len; t += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), vtop));
        _mm512_storeu_ps(s + t, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    sum = _mm512_reduce_add_ps(vsum);
#endif
    for (; t < len; t++) {
        s[t] = exp_nonpositive(s[t] - top);
        sum += s[t];
    }
    return sum;
}

/* One task: sequence j's KV head h, its `group` query heads against positions 0..len-1. */
static inline __attribute__((always_inline)) int attend_body(
    const void *q, const void *k, const void *v, void *out, int bf16, int j, int h, int len,
    int heads, int group, int D, size_t cache0, float scale, Ahead *ahead) {
    float qf[MAX_GROUP][MAX_DIM], acc[MAX_GROUP][MAX_DIM], row[MAX_DIM];
    float *s = (float *)malloc((size_t)group * len * sizeof(float));
    if (s == NULL) return -1;
    size_t qbase = ((size_t)j * heads + (size_t)h * group) * D;
    int dp = 0; /* the pair dot products read the query as stored: no float32 copy */
#if defined(__AVX512BF16__) && defined(ATTEND_AVX512)
    dp = bf16 && D % 32 == 0;
#endif
    for (int i = 0; i < group && !dp; i++)
        for (int d = 0; d < D; d++) qf[i][d] = elem_get(q, bf16, qbase + (size_t)i * D + d) * scale;
    const uint16_t *qb = (const uint16_t *)q + qbase;
#ifdef ATTEND_AVX512
    if (dp) {
        scores_avx512(qf, qb, k, bf16, 1, cache0, len, group, D, scale, s, ahead);
    } else if (D % 16 == 0) {
        scores_avx512(qf, qb, k, bf16, 0, cache0, len, group, D, scale, s, ahead);
    } else
#endif
        for (int t = 0; t < len; t++) { /* scores: each key read once for the group */
            if (t % 2 == 0) ahead_step(ahead);
            row_f32(k, bf16, (cache0 + t) * D, D, row);
            for (int i = 0; i < group; i++) {
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; d++) dot += qf[i][d] * row[d];
                s[(size_t)i * len + t] = dot;
            }
        }
    float total[MAX_GROUP];
    for (int i = 0; i < group; i++) { /* softmax, in place */
        total[i] = softmax(s + (size_t)i * len, len);
        memset(acc[i], 0, (size_t)D * sizeof(float));
    }
#ifdef ATTEND_AVX512
    if (D % 16 == 0) {
        values_avx512(v, bf16, cache0, len, group, D, s, acc, ahead);
    } else
#endif
        for (int t = 0; t < len; t++) { /* values: each read once for the group */
            if (t % 2 == 1) ahead_step(ahead);
            row_f32(v, bf16, (cache0 + t) * D, D, row);
            for (int i = 0; i < group; i++) {
                float p = s[(size_t)i * len + t];
#pragma omp simd
                for (int d = 0; d < D; d++) acc[i][d] += p * row[d];
            }
        }
    for (int i = 0; i < group; i++) {
        size_t o = qbase + (size_t)i * D;
        float inv = 1.f / total[i];
        for (int d = 0; d < D; d++) elem_put(out, bf16, o + d, acc[i][d] * inv);
    }
    free(s);
    return 0;
}

/* attend_body with the group and D as constants where they are common. With the group a
 * runtime value, values_avx512's accumulators lived in memory (a load, an FMA and a store
 * a vector and key) and the loops over the group branched on every key: the same 30 layers
 * with the rows in cache took 8.8 ms, 4.3 specialised. */
#define ATTEND_ARGS                                                                            \
    const void *q, const void *k, const void *v, void *out, int bf16, int j, int h, int len,   \
        int heads, size_t cache0, float scale, Ahead *ahead
#define ATTEND_FIXED(G, DIM)                                                                   \
    static int attend_g##G##_d##DIM(ATTEND_ARGS) {                                             \
        return attend_body(q, k, v, out, bf16, j, h, len, heads, G, DIM, cache0, scale, ahead); \
    }
ATTEND_FIXED(1, 64) ATTEND_FIXED(2, 64) ATTEND_FIXED(3, 64) ATTEND_FIXED(4, 64)
ATTEND_FIXED(5, 64) ATTEND_FIXED(6, 64) ATTEND_FIXED(7, 64) ATTEND_FIXED(8, 64)
ATTEND_FIXED(1, 128) ATTEND_FIXED(2, 128) ATTEND_FIXED(3, 128) ATTEND_FIXED(4, 128)
ATTEND_FIXED(5, 128) ATTEND_FIXED(6, 128) ATTEND_FIXED(7, 128) ATTEND_FIXED(8, 128)
typedef int (*attend_fn)(ATTEND_ARGS);
static const attend_fn FIXED64[9] = {
    NULL, attend_g1_d64, attend_g2_d64, attend_g3_d64, attend_g4_d64,
    attend_g5_d64, attend_g6_d64, attend_g7_d64, attend_g8_d64,
};
static const attend_fn FIXED128[9] = {
    NULL, attend_g1_d128, attend_g2_d128, attend_g3_d128, attend_g4_d128,
    attend_g5_d128, attend_g6_d128, attend_g7_d128, attend_g8_d128,
};

static int attend_generic(ATTEND_ARGS, int group, int D) {
    return attend_body(q, k, v, out, bf16, j, h, len, heads, group, D, cache0, scale, ahead);
}

/* q, out: [B, heads, D]; k, v: [kv_heads, rows, D]; row j of q reads lengths[j] >= 1
 * positions from row row0 + lanes[j] * lane_len. Returns 0, -1 when memory ran out, -2 for
 * shapes past the fixed buffers. Each (sequence, KV head) is a task, claimed by the threads
 * from a shared counter. */
int attend_lanes(const void *q, const void *k, const void *v, void *out, const int32_t *lanes,
                 const int32_t *lengths, int B, int heads, int kv_heads, int D, int64_t rows,
                 int64_t row0, int64_t lane_len, float scale, int bf16, int threads) {
    int group = heads / kv_heads;
    if (group > MAX_GROUP || D > MAX_DIM || group * kv_heads != heads) return -2;
    attend_fn fixed = NULL;
    if (group <= 8) fixed = D == 64 ? FIXED64[group] : D == 128 ? FIXED128[group] : NULL;
    int failed = 0, counter = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        Ahead a = {
            .k = (const char *)k, .v = (const char *)v, .lanes = lanes, .lengths = lengths,
            .kv_heads = kv_heads, .tasks = B * kv_heads, .rows = (size_t)rows,
            .row0 = (size_t)row0, .lane_len = (size_t)lane_len,
            .row_bytes = (size_t)D * (bf16 ? 2 : 4), .counter = &counter,
        };
        if (ahead_enter(&a)) /* else the cursor rests (base NULL) */
            for (int i = 0; i < AHEAD; i++) ahead_step(&a);
        for (int task; (task = ahead_next(&a)) >= 0;) {
            int j = task / kv_heads, h = task % kv_heads;
            size_t cache0 = task_row0(&a, task);
            failed |= (fixed ? fixed(q, k, v, out, bf16, j, h, lengths[j], heads, cache0, scale, &a)
                             : attend_generic(q, k, v, out, bf16, j, h, lengths[j], heads, cache0,
                                              scale, &a, group, D)) != 0;
        }
    }
    return failed ? -1 : 0;
}
