/* genserve's AMX kernels, on CPUs with AMX tiles: the linear y = x W^T in bf16 for the 9-64
 * rows of a batched decode step (and a prefill chunk), and, further down, a prompt chunk's
 * causal attention (amx_attend_causal).
 *
 * Why it exists: at 32 rows a decode step's linears are still a pass over every weight, and
 * should run at the memory's read bandwidth; the multiply is cheap on AMX. oneDNN's
 * prepacked bf16 linear read the layers' weights at 16-17 GB/s there, F.linear at 11, where
 * one pass summing a large buffer ran at 26-31 GB/s (2-core AMX Xeon VM). Which kernel runs
 * for which row count is still measured at start-up (hardware.py): this one is a candidate,
 * kept only where it is faster.
 *
 * Layout: the weight is packed once (native.Amx) into the tiles TDPBF16PS reads, 16 output
 * columns by 32 inputs per 1 KB tile, [N/16][K/32][16 pairs of k][16 columns][2]: each
 * column block's tiles follow one another, so the weight streams front to back. A call
 * walks two column blocks (32 outputs) at a time, split between the threads, and for each
 * runs every 32 rows of x through four accumulator tiles (2 x 16 rows by 2 x 16 columns): the
 * two blocks' weights (18-48 KB) stay in cache while the rows go by.
 *
 * A row's result depends only on that row: products of its own inputs, summed in the same
 * order (k blocks ascending) in whatever call it is, so the kernel is batch-invariant by
 * construction (rows are padded with zeros to a multiple of 16, never mixed).
 *
 * Built with the other kernels (-march=native); where the compiler or CPU has no AMX the
 * entry points answer -2 and the kernel is not offered.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__x86_64__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <math.h>
#include <omp.h>
#include <unistd.h>

#include "vexp.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Linux hands a process AMX's tile state only once asked (the state is 8 KB per thread). */
int amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) ? -1 : 0;
}

/* Tiles 0-3: fp32 accumulators, 16 rows x 16 columns. 4-5: x, 16 rows x 32 bf16. 6-7: the
 * weight, 16 pairs of k x 16 columns x 2 bf16. */
static void configure(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* Rows [m, m + 32) (or 16 when `one`) of x against column blocks b and b + 1 (or b alone when
 * `single`), into out[32][32] float32. */
#define KBLOCK_BYTES 1024
/* Into L2, AHEAD_K tiles ahead of the ones being summed in each of the pair's two streams,
 * running on into the next pair's first tiles, the first time a pair is read: 30 layers'
 * linears at 32 rows from memory took 9.7 ms so (2, 4 or 8 ahead alike), 10.6 with the next
 * pair's whole 36 KB fetched a pair ahead (2-core AMX Xeon VM). */
#define AHEAD_K 4
static inline void prefetch_tile(const uint16_t *t) {
    for (int l = 0; l < KBLOCK_BYTES; l += 64) _mm_prefetch((const char *)t + l, _MM_HINT_T1);
}
static void tile_block(const uint16_t *x, size_t ldx, const uint16_t *b0, const uint16_t *b1,
                       const char *next, int fetch, int kblocks, int one, int single) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int kb = 0; kb < kblocks; kb++) {
        const uint16_t *xa = x + (size_t)kb * 32;
        if (fetch) {
            int ahead = kb + AHEAD_K;
            if (ahead < kblocks) {
                prefetch_tile(b0 + (size_t)ahead * 512);
                if (!single) prefetch_tile(b1 + (size_t)ahead * 512);
            } else if (next != NULL) { /* the next pair's two blocks, one after the other */
                const uint16_t *n0 = (const uint16_t *)next + (size_t)(ahead - kblocks) * 512;
                prefetch_tile(n0);
                prefetch_tile(n0 + (size_t)kblocks * 512);
            }
        }
        _tile_loadd(4, xa, ldx * 2);
        _tile_loadd(6, b0 + (size_t)kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (!single) {
            _tile_loadd(7, b1 + (size_t)kb * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (!one) {
            _tile_loadd(5, xa + 16 * ldx, ldx * 2);
            _tile_dpbf16ps(2, 5, 6);
            if (!single) _tile_dpbf16ps(3, 5, 7);
        }
    }
}

/* tile_block's sums into out[32][32] (the tiles it used as `one` and `single` say). */
static void store_block(int one, int single, float *out) {
    _tile_stored(0, out, 128);
    if (!single) _tile_stored(1, out + 16, 128);
    if (!one) {
        _tile_stored(2, out + 16 * 32, 128);
        if (!single) _tile_stored(3, out + 16 * 32 + 16, 128);
    }
}

/* `cols` (16 or 32) results of one row into y at `at`: a scalar loop here cost more than the
 * tiles' multiplies. vcvtneps2bf16 rounds to nearest even as torch does (denormals go to 0). */
static inline void put_row(void *y, int y_bf16, size_t at, const float *v, int cols) {
    if (!y_bf16) {
        for (int j = 0; j < cols; j += 16)
            _mm512_storeu_ps((float *)y + at + j, _mm512_loadu_ps(v + j));
        return;
    }
    uint16_t *dst = (uint16_t *)y + at;
    if (cols == 32) {
        __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(v + 16), _mm512_loadu_ps(v));
        _mm512_storeu_si512(dst, (__m512i)both);
    } else {
        __m256bh half = _mm512_cvtneps_pbh(_mm512_loadu_ps(v));
        _mm256_storeu_si256((__m256i *)dst, (__m256i)half);
    }
}

/* A gated MLP's gate and up projections in one weight ([gate; up], each I rows) are packed
 * with their column blocks interleaved, gate block j then up block j (native.Amx's `glu`),
 * so that each pair of blocks the kernel walks holds the same 16 features of both: the
 * features' SiLU(gate) * up can then be taken from the tiles' sums at once (GLU_SILU), and
 * the [M, 2I] products never go to memory. A 512-row prompt chunk's 3 MB of gate/up sums,
 * written and read back by the SiLU pass, cost about as much as the multiply (2-core AMX
 * Xeon VM). GLU_SPLIT writes the two halves where an unpacked weight would have put them. */
enum { GLU_NONE = 0, GLU_SPLIT = 1, GLU_SILU = 2 };

/* One row's 16 features from a pair's sums (v: 16 gate, then 16 up) as SiLU(gate) * up,
 * each step rounded to bf16 as decode.c's silu_mul rounds it (the sums first, as a bf16
 * linear's output is): the same bits as the linear and then glue_silu_mul. */
static inline void put_silu_row(uint16_t *act, const float *v) {
    __m512 g = round16(_mm512_loadu_ps(v)), u = round16(_mm512_loadu_ps(v + 16));
    __m512 s = round16(silu16(g));
    _mm256_storeu_si256((__m256i *)act, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(s, u)));
}

/* Row i of a 32 x 32 block of sums (pair p, rows from m) into y as `glu` says. */
static inline void put_block_row(void *y, int y_bf16, int glu, int N, int p, size_t row,
                                 const float *v, int cols) {
    if (glu == GLU_NONE) {
        put_row(y, y_bf16, row * N + (size_t)p * 32, v, cols);
    } else if (glu == GLU_SPLIT) { /* N = 2I: gate to column 16p, up to I + 16p */
        put_row(y, 1, row * N + (size_t)p * 16, v, 16);
        put_row(y, 1, row * N + (size_t)N / 2 + (size_t)p * 16, v + 16, 16);
    } else { /* GLU_SILU: y is [M, I] */
        put_silu_row((uint16_t *)y + row * (size_t)(N / 2) + (size_t)p * 16, v);
    }
}

/* A block of sums not yet written: `rows` rows from m of pair p, in out (buffer `buf`). */
typedef struct {
    const float *out;
    int buf, p, m, rows, cols;
} Held;

static void put_held(const Held *h, void *y, int y_bf16, int glu, int N) {
    for (int i = 0; i < h->rows; i++)
        put_block_row(y, y_bf16, glu, N, h->p, (size_t)(h->m + i), h->out + i * 32, h->cols);
}

/* x [M, K] bf16, w packed [N/16][K/32][512] bf16, y [M, N] (bf16 when y_bf16; [M, N/2] for
 * GLU_SILU), K % 32 == 0, N % 16 == 0 (% 32 with glu). Returns 0, -1 when memory ran out. */
static int tiles_linear(const uint16_t *x, const uint16_t *w, void *y, int y_bf16, int M, int N,
                        int K, int threads, int glu) {
    int padded = (M + 15) / 16 * 16;
    const uint16_t *xs = x;
    uint16_t *owned = NULL;
    if (padded != M) { /* whole tiles of 16 rows: the extra rows zeros, their results dropped */
        owned = calloc((size_t)padded * K, sizeof *owned);
        if (owned == NULL) return -1;
        memcpy(owned, x, (size_t)M * K * sizeof *owned);
        xs = owned;
    }
    int kblocks = K / 32, nblocks = N / 16, pairs = (nblocks + 1) / 2;
    size_t block = (size_t)kblocks * 512; /* one column block's packed weights, in bf16 */
#pragma omp parallel num_threads(threads)
    {
        configure();
        /* Two blocks of sums: the last block's are written out (AVX-512) while the tiles
         * still multiply this one (the tile instructions go first, and the core runs the
         * two units side by side); written after them, a 512-row chunk's linears spent a
         * quarter of their time in the epilogue, the tiles idle (2-core AMX Xeon VM). */
        float out[2][32 * 32];
        Held held = {0};
#pragma omp for schedule(static)
        for (int p = 0; p < pairs; p++) {
            int nb = 2 * p, single = nb + 1 >= nblocks, cols = single ? 16 : 32;
            const uint16_t *b0 = w + (size_t)nb * block, *b1 = b0 + block;
            for (int m = 0; m < padded; m += 32) {
                int one = padded - m < 32, rows = M - m < 32 ? M - m : 32;
                const char *next = p + 1 < pairs ? (const char *)(b0 + 2 * block) : NULL;
                tile_block(xs + (size_t)m * K, K, b0, b1, next, m == 0, kblocks, one, single);
                put_held(&held, y, y_bf16, glu, N);
                store_block(one, single, out[held.buf ^ 1]);
                held = (Held){out[held.buf ^ 1], held.buf ^ 1, p, m, rows, cols};
            }
        }
        put_held(&held, y, y_bf16, glu, N);
        _tile_release();
    }
    free(owned);
    return 0;
}

int amx_linear_bf16(const uint16_t *x, const uint16_t *w, void *y, int y_bf16, int M, int N,
                    int K, int threads) {
    return tiles_linear(x, w, y, y_bf16, M, N, K, threads, GLU_NONE);
}

/* The interleaved [gate; up] weight (2I outputs): silu != 0 writes act [M, I] = SiLU(gate) *
 * up, else y [M, 2I] as an unpacked weight's product. Returns -2 where I is not whole pairs. */
int amx_glu_bf16(const uint16_t *x, const uint16_t *w, void *y, int M, int I, int K,
                 int threads, int silu) {
    if (I % 16) return -2;
    return tiles_linear(x, w, y, 1, M, 2 * I, K, threads, silu ? GLU_SILU : GLU_SPLIT);
}

/* ---- Causal attention of a prompt chunk on the tiles ----
 *
 * Why: torch's SDPA (its CPU flash kernel) ran a 512-token prompt's attention at about 160
 * GFLOP/s here, 32 of a prefill's 110 ms (2-core AMX Xeon VM). Here S = Q K^T and O = P V are
 * tile products. The keys and values of each KV head are first packed into the tiles'
 * layout (once per call, shared by the query heads of the group); then each task (a query
 * head, 16 rows) computes its rows' scores against every key it may see, in float32, takes the
 * exact softmax of each row (max, then e^(s - max), the weights rounded to bf16 for the second
 * product and summed as rounded), and multiplies them by the values. Row i (position start +
 * i) sees keys 0 .. start + i, as the runner's causal mask says.
 *
 * A row's result depends on its own query, the keys and values it sees and nothing else: the
 * same bits in any call (rows of another task or sequence never mix). */
#include "prompt.h"

/* Query head h, rows [r0, r0 + 16) (fewer at the end); s: 16 x kblocks16 * 16 floats, p: 16 x
 * kblocks32 * 32 bf16, scratch of the calling thread. */
static void prompt_task(const Prompt *a, int h, int r0, float *s, uint16_t *p) {
    int rows = a->n - r0 < 16 ? a->n - r0 : 16, D = a->D, g = h / a->group;
    int seen_max = a->start + r0 + rows; /* keys the block's last row sees */
    int b16 = (seen_max + 15) / 16, b32 = (seen_max + 31) / 32;
    size_t ls = (size_t)a->kblocks16 * 16, lp = (size_t)a->kblocks32 * 32;
    uint16_t qbuf[16 * PA_MAX_DIM];
    const uint16_t *qa = a->q + (size_t)r0 * a->q_row + (size_t)h * D;
    size_t qstride = a->q_row;
    if (rows < 16) { /* a partial block: its rows, then zeros */
        memset(qbuf, 0, sizeof qbuf);
        for (int i = 0; i < rows; i++) memcpy(qbuf + i * D, qa + i * a->q_row, (size_t)D * 2);
        qa = qbuf, qstride = (size_t)D;
    }
    const uint16_t *kp = a->kp + (size_t)g * a->kblocks16 * (D / 32) * 512;
    const uint16_t *vp = a->vp + (size_t)g * a->kblocks32 * (D / 16) * 512;
    /* S = Q K^T, 64 keys (four accumulator tiles) at a time: one tile reused key block after
     * key block waited for its store before the next product (a third of the call's time). The
     * packed keys are padded to whole groups of four blocks. */
    for (int b = 0; b < b16; b += 4) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int d = 0; d < D / 32; d++) {
            const uint16_t *kb = kp + ((size_t)b * (D / 32) + d) * 512;
            size_t next = (size_t)(D / 32) * 512;
            _tile_loadd(4, qa + d * 32, qstride * 2);
            _tile_loadd(6, kb, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, kb + next, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, kb + 2 * next, 64);
            _tile_dpbf16ps(2, 4, 5);
            _tile_loadd(6, kb + 3 * next, 64);
            _tile_dpbf16ps(3, 4, 6);
        }
        _tile_stored(0, s + b * 16, ls * 4);
        _tile_stored(1, s + (b + 1) * 16, ls * 4);
        _tile_stored(2, s + (b + 2) * 16, ls * 4);
        _tile_stored(3, s + (b + 3) * 16, ls * 4);
    }
    float total[16];
    for (int i = 0; i < 16; i++) {
        uint16_t *pi = p + i * lp;
        if (i < rows)
            total[i] = softmax_row(s + i * ls, a->start + r0 + i + 1, b32 * 32, a->scale, pi);
        else
            memset(pi, 0, (size_t)b32 * 32 * 2), total[i] = 1.f;
    }
    float o[16 * 64];
    for (int c0 = 0; c0 < D / 16; c0 += 4) { /* O = P V, 64 dims (four tiles) at a time */
        int cs = D / 16 - c0 < 4 ? D / 16 - c0 : 4;
        _tile_zero(0); /* tile numbers are constants in the instruction */
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int b = 0; b < b32; b++) {
            _tile_loadd(4, p + b * 32, lp * 2);
            const uint16_t *vb = vp + (size_t)b * (D / 16) * 512;
            _tile_loadd(5, vb + (size_t)(c0 + 0) * 512, 64);
            _tile_dpbf16ps(0, 4, 5);
            if (cs > 1) { _tile_loadd(6, vb + (size_t)(c0 + 1) * 512, 64); _tile_dpbf16ps(1, 4, 6); }
            if (cs > 2) { _tile_loadd(7, vb + (size_t)(c0 + 2) * 512, 64); _tile_dpbf16ps(2, 4, 7); }
            if (cs > 3) { _tile_loadd(5, vb + (size_t)(c0 + 3) * 512, 64); _tile_dpbf16ps(3, 4, 5); }
        }
        _tile_stored(0, o, 256);
        if (cs > 1) _tile_stored(1, o + 16, 256);
        if (cs > 2) _tile_stored(2, o + 32, 256);
        if (cs > 3) _tile_stored(3, o + 48, 256);
        for (int i = 0; i < rows; i++) {
            uint16_t *dst = a->out + (size_t)(r0 + i) * a->out_row + (size_t)h * D + c0 * 16;
            float inv = 1.f / total[i];
            for (int d = 0; d < cs * 16; d++) dst[d] = f32_to_bf16(o[i * 64 + d] * inv);
        }
    }
}

/* q, out: rows [n, heads, D] bf16 at q_row / out_row elements apart; k, v: each KV head's
 * cache rows for positions 0 .. start + n - 1, [end, D] contiguous, heads kv_stride elements
 * apart. Returns 0, -1 when memory ran out, -2 for a shape it does not take. */
int amx_attend_causal(const uint16_t *q, int64_t q_row, const uint16_t *k, const uint16_t *v,
                      int64_t kv_stride, uint16_t *out, int64_t out_row, int n, int start,
                      int heads, int kv_heads, int D, float scale, int threads) {
    if (D % 32 || D > PA_MAX_DIM || kv_heads < 1 || heads % kv_heads || n < 1 || start < 0)
        return -2;
    int end = start + n, kb16 = (end + 63) / 64 * 4, kb32 = (end + 31) / 32;
    size_t kp_size = (size_t)kb16 * (D / 32) * 512, vp_size = (size_t)kb32 * (D / 16) * 512;
    uint16_t *kp = scratch(0, kp_size * kv_heads * 2), *vp = scratch(1, vp_size * kv_heads * 2);
    size_t s_floats = (size_t)16 * kb16 * 16, p_halves = (size_t)16 * kb32 * 32;
    char *sp = scratch(2, (size_t)threads * (s_floats * 4 + p_halves * 2));
    int failed = kp == NULL || vp == NULL || sp == NULL;
    if (!failed) {
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
            configure();
            int t = omp_get_thread_num();
            float *sb = (float *)(sp + (size_t)t * (s_floats * 4 + p_halves * 2));
            uint16_t *pb = (uint16_t *)(sb + s_floats);
            /* the last rows see the most keys: they go first */
#pragma omp for schedule(dynamic, 1)
            for (int task = 0; task < tasks; task++)
                prompt_task(&a, task % heads, (qblocks - 1 - task / heads) * 16, sb, pb);
            _tile_release();
        }
    }
    return failed ? -1 : 0;
}
#else
int amx_init(void) { return -2; }
int amx_linear_bf16(const uint16_t *x, const uint16_t *w, void *y, int y_bf16, int M, int N,
                    int K, int threads) {
    (void)x, (void)w, (void)y, (void)y_bf16, (void)M, (void)N, (void)K, (void)threads;
    return -2;
}
int amx_glu_bf16(const uint16_t *x, const uint16_t *w, void *y, int M, int I, int K,
                 int threads, int silu) {
    (void)x, (void)w, (void)y, (void)M, (void)I, (void)K, (void)threads, (void)silu;
    return -2;
}
int amx_attend_causal(const uint16_t *q, int64_t q_row, const uint16_t *k, const uint16_t *v,
                      int64_t kv_stride, uint16_t *out, int64_t out_row, int n, int start,
                      int heads, int kv_heads, int D, float scale, int threads) {
    (void)q, (void)q_row, (void)k, (void)v, (void)kv_stride, (void)out, (void)out_row, (void)n;
    (void)start, (void)heads, (void)kv_heads, (void)D, (void)scale, (void)threads;
    return -2;
}
#endif
