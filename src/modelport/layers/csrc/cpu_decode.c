/* Fused small ops of a CPU forward step (modelport/layers/cpu_kernels.py).
 *
 * A Llama-family decode step on a CPU spends most of its time outside the matmuls: ~60
 * small torch ops a layer (norms, casts, rotary, the KV write, the block gather, softmax)
 * each cost microseconds of dispatch for a few hundred floats of work. These functions do
 * the work between two matmuls in one call each; the matmuls stay torch's weight-only int4
 * GEMM. Plain C, no torch headers: it compiles in well under a second with the system's cc.
 *
 * Numerics follow the torch path: float32 everywhere, bf16 only where the int4 GEMM takes
 * or gives it (round to nearest even, as torch converts), compiled without FMA contraction
 * (-ffp-contract=off) so elementwise steps (rotary, residual adds) round as torch's do.
 * Sums (norms, dot products, softmax) are taken in another order than torch's vectorised
 * reductions, so those agree to float32 rounding, not bit for bit.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as torch gives it */
    u += 0x7fffu + ((u >> 16) & 1u);                     /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* resid[r] += delta[r] (bf16, when given); then out[r] = rmsnorm(resid[r]) * w, written as
 * bf16 (out_bf16) or float32 (out_f32): the input of the next matmul, or the final hidden. */
void mp_add_rmsnorm(int rows, int h, float *resid, const uint16_t *delta, const float *w,
                    float eps, uint16_t *out_bf16, float *out_f32) {
    for (int r = 0; r < rows; r++) {
        float *x = resid + (int64_t)r * h;
        if (delta) {
            const uint16_t *d = delta + (int64_t)r * h;
            for (int i = 0; i < h; i++) x[i] = bf16_to_f32(d[i]) + x[i];
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < h; i++) ss += x[i] * x[i];
        float inv = 1.0f / sqrtf(ss / (float)h + eps);
        if (out_bf16) {
            uint16_t *o = out_bf16 + (int64_t)r * h;
            for (int i = 0; i < h; i++) o[i] = f32_to_bf16(x[i] * inv * w[i]);
        } else {
            float *o = out_f32 + (int64_t)r * h;
            for (int i = 0; i < h; i++) o[i] = x[i] * inv * w[i];
        }
    }
}

/* One decode row's attention for KV head g: the `group` (<= 64) query heads that share it
 * read each cached K and V row once. Two passes (scores, then the softmax-weighted sum of
 * V); p: scratch of group * (n + hd) floats (scores, then the fp32 output rows). */
static void attend_kv_head(const float *q, int group, int hd, int g, const float *kv_cache,
                           int64_t v_base, int64_t row_stride, int block_size,
                           const int32_t *table, int n, float scale, uint16_t *out, float *p) {
    const int64_t off = (int64_t)g * hd;
    float m[64], sum[64];
    for (int j = 0; j < group; j++) m[j] = -INFINITY;
    for (int t = 0; t < n; t++) {
        const float *k = kv_cache + ((int64_t)table[t / block_size] * block_size
                                     + t % block_size) * row_stride + off;
        for (int j = 0; j < group; j++) {
            float s = dot(q + (int64_t)j * hd, k, hd) * scale;
            p[(int64_t)j * n + t] = s;
            if (s > m[j]) m[j] = s;
        }
    }
    for (int j = 0; j < group; j++) {
        float *pj = p + (int64_t)j * n, total = 0.0f;
        for (int t = 0; t < n; t++) {
            pj[t] = expf(pj[t] - m[j]);
            total += pj[t];
        }
        sum[j] = total;
    }
    float *o32 = p + (int64_t)group * n; /* group * hd floats */
    for (int i = 0; i < group * hd; i++) o32[i] = 0.0f;
    for (int t = 0; t < n; t++) {
        const float *v = kv_cache + v_base + ((int64_t)table[t / block_size] * block_size
                                              + t % block_size) * row_stride + off;
        for (int j = 0; j < group; j++) {
            const float w = p[(int64_t)j * n + t];
            float *o = o32 + (int64_t)j * hd;
#pragma omp simd
            for (int i = 0; i < hd; i++) o[i] += w * v[i];
        }
    }
    for (int j = 0; j < group; j++) {
        const float inv = 1.0f / sum[j];
        for (int i = 0; i < hd; i++)
            out[(int64_t)j * hd + i] = f32_to_bf16(o32[(int64_t)j * hd + i] * inv);
    }
}

typedef struct {
    int nh, nkv, hd, block_size, bt_width, qkv_n;
    const float *f, *kv_cache;
    int64_t v_base, row_stride;
    const int32_t *block_tables, *row_req, *row_len;
    const int32_t *rows_of; /* the rows that attend here (single-token rows) */
    float scale;
    uint16_t *out;
    float *scratch;
    int64_t begin, end; /* items i * nkv + g over rows_of */
} attn_job;

static void *run_attn_job(void *arg) {
    const attn_job *a = (const attn_job *)arg;
    const int group = a->nh / a->nkv;
    for (int64_t item = a->begin; item < a->end; item++) {
        const int r = a->rows_of[item / a->nkv], g = (int)(item % a->nkv);
        const float *q = a->f + (int64_t)r * a->qkv_n + (int64_t)g * group * a->hd;
        uint16_t *o = a->out + ((int64_t)r * a->nh + (int64_t)g * group) * a->hd;
        attend_kv_head(q, group, a->hd, g, a->kv_cache, a->v_base, a->row_stride,
                       a->block_size, a->block_tables + (int64_t)a->row_req[r] * a->bt_width,
                       a->row_len[r], a->scale, o, a->scratch);
    }
    return NULL;
}

/* One attention block of a step's token rows, from the fused qkv matmul's bf16 output to
 * the o projection's bf16 input: bias, rotary (rotate-half on the first rot_dim dims of each
 * q and k head, cos/sin from the model's [positions, rot_dim] table) and the K/V write into
 * the paged cache ([2, blocks, block_size, kv_heads, head_dim] float32) for every row; then
 * causal attention, GQA by head groups, for the rows with attend[r] set (the one new token
 * of a decoding request): over the first row_len[r] positions of request row_req[r]'s
 * blocks. The other rows (prompt chunks) are left for the caller, whose attention reads the
 * rotated q at work[r * (nh + 2 * nkv) * hd] (float32) and the K/V written here.
 * The (row, KV head) items are split over up to n_threads threads (this one and pthreads
 * started for the call) when the step reads enough context to pay for starting them.
 * work: rows * (nh + 2 * nkv) * hd + n_threads * (group + 1) * (max row_len + hd) floats;
 * rows_of: scratch of rows int32. */
void mp_decode_attention(int rows, int nh, int nkv, int hd, int rot_dim,
                         const uint16_t *qkv, const float *bias, const float *cos_sin,
                         const int64_t *positions, float *kv_cache, int num_blocks,
                         int block_size, const int64_t *slots, const int32_t *block_tables,
                         int bt_width, const int32_t *row_req, const int32_t *row_len,
                         const uint8_t *attend, float scale, uint16_t *out, float *work,
                         int32_t *rows_of, int n_threads) {
    const int qkv_n = (nh + 2 * nkv) * hd;
    const int half = rot_dim / 2;
    const int group = nh / nkv;
    const int64_t row_stride = (int64_t)nkv * hd;            /* one token of K (or V) */
    const int64_t v_base = (int64_t)num_blocks * block_size * row_stride;
    float *f = work;                                          /* q | k | v of each row */
    int max_len = 0, n_attend = 0;
    int64_t context = 0;
    for (int r = 0; r < rows; r++) {
        float *x = f + (int64_t)r * qkv_n;
        const uint16_t *src = qkv + (int64_t)r * qkv_n;
        for (int i = 0; i < qkv_n; i++) x[i] = bf16_to_f32(src[i]);
        if (bias)
            for (int i = 0; i < qkv_n; i++) x[i] = x[i] + bias[i];
        const float *cs = cos_sin + positions[r] * rot_dim;
        for (int head = 0; head < nh + nkv; head++) { /* q heads, then k heads */
            float *y = x + (int64_t)head * hd;
            for (int i = 0; i < half; i++) {
                float x1 = y[i], x2 = y[i + half], c = cs[i], s = cs[half + i];
                y[i] = x1 * c - x2 * s;
                y[i + half] = x2 * c + x1 * s;
            }
        }
        float *kslot = kv_cache + slots[r] * row_stride;
        memcpy(kslot, x + (int64_t)nh * hd, sizeof(float) * row_stride);
        memcpy(kslot + v_base, x + (int64_t)(nh + nkv) * hd, sizeof(float) * row_stride);
        if (attend[r]) {
            rows_of[n_attend++] = r;
            if (row_len[r] > max_len) max_len = row_len[r];
            context += row_len[r];
        }
    }
    if (n_attend == 0) return;
    float *scratch = f + (int64_t)rows * qkv_n;
    const int64_t per_thread = (int64_t)(group + 1) * (max_len + hd);
    const int64_t items = (int64_t)n_attend * nkv;
    int threads = n_threads < 1 ? 1 : (n_threads > 16 ? 16 : n_threads);
    /* threads pay off for wide batches of context (measured: 32 rows x 300 tokens, 1.8x on
     * 2 threads); a single row's few KV heads split unevenly and gained nothing */
    if (context * nh < 16384 || items < 4 * threads) threads = 1;
    attn_job jobs[16];
    pthread_t tids[16];
    int started[16] = {0};
    /* split the items so each thread reads about the same amount of context */
    int64_t done = 0, begin = 0;
    for (int i = 0; i < threads; i++) {
        int64_t target = context * nkv * (i + 1) / threads, end = begin;
        while (end < items && (done < target || end == begin)
               && (i == threads - 1 || items - end > threads - 1 - i)) {
            done += row_len[rows_of[end / nkv]];
            end++;
        }
        if (i == threads - 1) end = items;
        attn_job j = {nh, nkv, hd, block_size, bt_width, qkv_n, f, kv_cache, v_base,
                      row_stride, block_tables, row_req, row_len, rows_of, scale, out,
                      scratch + (int64_t)i * per_thread, begin, end};
        jobs[i] = j;
        begin = end;
    }
    for (int i = 1; i < threads; i++)
        started[i] = pthread_create(&tids[i], NULL, run_attn_job, &jobs[i]) == 0;
    run_attn_job(&jobs[0]);
    for (int i = 1; i < threads; i++) {
        if (started[i])
            pthread_join(tids[i], NULL);
        else
            run_attn_job(&jobs[i]); /* no thread: run it here */
    }
}

/* SwiGLU between the gate/up and down matmuls: out = bf16(silu(gate) * up). */
void mp_silu_mul(int rows, int inter, const uint16_t *gate_up, uint16_t *out) {
    for (int r = 0; r < rows; r++) {
        const uint16_t *gu = gate_up + (int64_t)r * 2 * inter;
        uint16_t *o = out + (int64_t)r * inter;
        for (int i = 0; i < inter; i++) {
            float g = bf16_to_f32(gu[i]), u = bf16_to_f32(gu[inter + i]);
            o[i] = f32_to_bf16(g / (1.0f + expf(-g)) * u);
        }
    }
}
