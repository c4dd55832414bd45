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

/* When decode attention uses more than one thread (-D can override both, to measure): at
 * least this many positions x query heads in the step, and this many (row, KV head) items a
 * thread. Starting a thread costs ~35 us here, and one stream split over context positions
 * on 2 threads was slower end to end at 1,800 and 3,900 tokens (bench/README.md, C1), though
 * faster in isolation at 4,000; so single rows stay on one thread and wide batches split.
 * (cpu_kernels.py passes n_threads = 1 for now: next to torch's spinning OpenMP workers even
 * wide batches were slower split, see ATTENTION_THREADS there.) */
#ifndef MIN_SPLIT_WORK
#define MIN_SPLIT_WORK 16384
#endif
#ifndef MIN_SPLIT_ITEMS_PER_THREAD
#define MIN_SPLIT_ITEMS_PER_THREAD 4
#endif

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

/* resid[r] += delta[r] (when given: bf16, or float32 with delta_f32 set); then
 * out[r] = rmsnorm(resid[r]) * w, written as bf16 (out_bf16), float32 (out_f32) or both: the input
 * of the next matmul, or the final hidden. float32 deltas and outputs serve models whose
 * linear layers are plain float32 matmuls (cpu_kernels.py). */
void mp_add_rmsnorm_io(int rows, int h, float *resid, const void *delta, int delta_f32,
                       const float *w, float eps, uint16_t *out_bf16, float *out_f32) {
    for (int r = 0; r < rows; r++) {
        float *x = resid + (int64_t)r * h;
        if (delta && delta_f32) {
            const float *d = (const float *)delta + (int64_t)r * h;
            for (int i = 0; i < h; i++) x[i] = d[i] + x[i];
        } else if (delta) {
            const uint16_t *d = (const uint16_t *)delta + (int64_t)r * h;
            for (int i = 0; i < h; i++) x[i] = bf16_to_f32(d[i]) + x[i];
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < h; i++) ss += x[i] * x[i];
        float inv = 1.0f / sqrtf(ss / (float)h + eps);
        if (out_bf16) {
            uint16_t *o = out_bf16 + (int64_t)r * h;
            for (int i = 0; i < h; i++) o[i] = f32_to_bf16(x[i] * inv * w[i]);
        }
        if (out_f32) { /* both where both are given (an MoE layer: fp32 router, bf16 experts) */
            float *o = out_f32 + (int64_t)r * h;
            for (int i = 0; i < h; i++) o[i] = x[i] * inv * w[i];
        }
    }
}

/* mp_add_rmsnorm_io with a bf16 delta (the int4 / int8 GEMMs' output) */
void mp_add_rmsnorm(int rows, int h, float *resid, const uint16_t *delta, const float *w,
                    float eps, uint16_t *out_bf16, float *out_f32) {
    mp_add_rmsnorm_io(rows, h, resid, delta, 0, w, eps, out_bf16, out_f32);
}

/* exp(x) for x <= 0, in plain float arithmetic so that a loop of it vectorises (expf does
 * not without -ffast-math): x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so n ln2 is
 * exact), e^r by its degree-7 Taylor polynomial (truncation error < 1e-8 relative), 2^n put
 * in the exponent bits. Within 2 ulp of expf; 0 below -87 (where expf is denormal). */
static inline float exp_nonpos(float x) {
    const float lo = -87.0f, magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to int */
    const float xc = x < lo ? lo : x;
    const float n = (xc * 1.44269504f + magic) - magic;
    const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } two_n = {((int32_t)n + 127) << 23};
    return x < lo ? 0.0f : p * two_n.f;
}

#define CHUNK 32 /* positions scored, then weighted, per pass (within one cache block) */

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define MP_VEC8 1
#endif
#endif
#ifdef MP_VEC8
/* Eight lanes in the compiler's generic vector type (AVX registers where there are some,
 * lowered to scalar code where not): eight keys' dot products accumulate lane-wise, and one
 * transpose-and-add gives their eight sums at once, instead of eight horizontal sums. */
typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* {sum(a0), ..., sum(a7)} */
static inline v8f sums8(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7) {
#define MP_HALVES(x, y) (__builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11) \
                         + __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15))
#define MP_PAIRS(x, y) (__builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) \
                        + __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15))
    const v8f b01 = MP_HALVES(a0, a1), b23 = MP_HALVES(a2, a3); /* 4 lanes of a0 | of a1 */
    const v8f b45 = MP_HALVES(a4, a5), b67 = MP_HALVES(a6, a7);
    const v8f c0 = MP_PAIRS(b01, b23), c1 = MP_PAIRS(b45, b67); /* a0 a0 a2 a2 a1 a1 a3 a3 */
    const v8f d = __builtin_shufflevector(c0, c1, 0, 8, 2, 10, 4, 12, 6, 14)
                  + __builtin_shufflevector(c0, c1, 1, 9, 3, 11, 5, 13, 7, 15);
#undef MP_HALVES
#undef MP_PAIRS
    return __builtin_shufflevector(d, d, 0, 4, 2, 6, 1, 5, 3, 7); /* d: s0 s4 s2 s6 s1 ... */
}
#endif

/* Attention of the `group` (<= 64) query heads that share one KV head over positions
 * [t0, t1) of a request, as a partial result that mp_decode_attention merges with the other
 * parts of the same (row, KV head): part = m[group] (the running max score), l[group] (the
 * sum of exp(score - m)) and acc[group * hd] (the exp-weighted sum of V rows, unnormalised).
 * One pass over the positions, a block's positions at a time (online softmax): the K rows of
 * a chunk are scored eight (or four) at a time (independent dot products, so the loop over
 * the head dimension vectorises and the horizontal sums are amortised), then exp'd and
 * added into acc while they are still in L1, with acc in registers over the chunk; sums
 * over positions go in position order, as the two-pass kernel before this one took them
 * (results closer to the torch path's: see test_every_step_takes_the_c_path_...). While a
 * chunk is worked on, the next one's K/V rows are prefetched. kh: the K cache at this head's
 * offset; V is v_base floats further on. */
static inline __attribute__((always_inline)) void attend_part(
                        const float *q, int group, int hd, const float *kh,
                        const uint16_t *kh16, int64_t v_base, int64_t row_stride,
                        int block_size, const int32_t *table, int t0, int t1, float scale,
                        float *part) {
    float *m = part, *l = part + group, *acc = part + 2 * group;
    float s[64 * CHUNK];
    /* a bf16 cache (kh16 instead of kh): each chunk's K and V rows widened into `stage`
     * first, then read as a float32 cache's would be; rs: floats from one position to the
     * next in what the loops below read */
    float stage[kh16 ? 2 * CHUNK * hd : 1];
    const int64_t rs = kh16 ? hd : row_stride;
    const char *bytes = kh16 ? (const char *)kh16 : (const char *)kh;
    const int64_t esize = kh16 ? 2 : 4;
    for (int j = 0; j < group; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    for (int i = 0; i < group * hd; i++) acc[i] = 0.0f;
    for (int t = t0; t < t1;) {
        const int in_block = t % block_size;
        int n = block_size - in_block;
        if (n > t1 - t) n = t1 - t;
        if (n > CHUNK) n = CHUNK;
        const int64_t at = ((int64_t)table[t / block_size] * block_size + in_block) * row_stride;
        const float *k0, *v0;
        if (kh16) {
            for (int u = 0; u < n; u++) {
                const uint16_t *ks = kh16 + at + u * row_stride, *vs = ks + v_base;
                float *kd = stage + (int64_t)u * hd, *vd = stage + (int64_t)(CHUNK + u) * hd;
                for (int i = 0; i < hd; i++) {
                    kd[i] = bf16_to_f32(ks[i]);
                    vd[i] = bf16_to_f32(vs[i]);
                }
            }
            k0 = stage;
            v0 = stage + (int64_t)CHUNK * hd;
        } else {
            k0 = kh + at;
            v0 = k0 + v_base;
        }
        if (t + n < t1) { /* the next chunk's K and V rows: ask for them now (blocks are
                           * scattered, so the hardware prefetcher cannot guess them) */
            const int nb_in = (t + n) % block_size, nn = t1 - t - n < n ? t1 - t - n : n;
            const int64_t next = ((int64_t)table[(t + n) / block_size] * block_size + nb_in)
                                 * row_stride;
            for (int u = 0; u < nn; u++)
                for (int i = 0; i < hd; i += 16) {
                    __builtin_prefetch(bytes + (next + u * row_stride + i) * esize);
                    __builtin_prefetch(bytes + (next + v_base + u * row_stride + i) * esize);
                }
        }
        for (int j = 0; j < group; j++) {
            const float *qj = q + (int64_t)j * hd;
            float *sj = s + j * CHUNK;
            int u = 0;
#ifdef MP_VEC8
            if (hd % 8 == 0)
                for (; u + 8 <= n; u += 8) {
                    const float *kr = k0 + u * rs;
                    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0},
                        a7 = {0};
                    for (int i = 0; i < hd; i += 8) {
                        const v8f qv = load8(qj + i);
                        a0 += qv * load8(kr + i);
                        a1 += qv * load8(kr + rs + i);
                        a2 += qv * load8(kr + 2 * rs + i);
                        a3 += qv * load8(kr + 3 * rs + i);
                        a4 += qv * load8(kr + 4 * rs + i);
                        a5 += qv * load8(kr + 5 * rs + i);
                        a6 += qv * load8(kr + 6 * rs + i);
                        a7 += qv * load8(kr + 7 * rs + i);
                    }
                    const v8f sv = sums8(a0, a1, a2, a3, a4, a5, a6, a7) * scale;
                    memcpy(sj + u, &sv, sizeof sv);
                }
#endif
            for (; u + 4 <= n; u += 4) {
                const float *ka = k0 + u * rs, *kb = ka + rs;
                const float *kc = kb + rs, *kd = kc + rs;
                float a = 0.0f, b = 0.0f, c = 0.0f, d = 0.0f;
#pragma omp simd reduction(+ : a, b, c, d)
                for (int i = 0; i < hd; i++) {
                    a += qj[i] * ka[i];
                    b += qj[i] * kb[i];
                    c += qj[i] * kc[i];
                    d += qj[i] * kd[i];
                }
                sj[u] = a * scale;
                sj[u + 1] = b * scale;
                sj[u + 2] = c * scale;
                sj[u + 3] = d * scale;
            }
            for (; u < n; u++) sj[u] = dot(qj, k0 + u * rs, hd) * scale;
        }
        for (int j = 0; j < group; j++) {
            float *sj = s + j * CHUNK, *o = acc + (int64_t)j * hd;
            float cm = m[j];
#pragma omp simd reduction(max : cm)
            for (int u = 0; u < n; u++) cm = sj[u] > cm ? sj[u] : cm;
            if (cm > m[j]) { /* a new max: rescale what was summed so far */
                const float alpha = exp_nonpos(m[j] - cm);
                l[j] *= alpha;
                for (int i = 0; i < hd; i++) o[i] *= alpha;
                m[j] = cm;
            }
            float total = l[j];
#pragma omp simd
            for (int u = 0; u < n; u++) sj[u] = exp_nonpos(sj[u] - cm);
            for (int u = 0; u < n; u++) total += sj[u]; /* in order, as torch-like sums go */
            l[j] = total;
            /* o += p[u] * v[u] for u in order (each element's sum as the two-pass kernel
             * took it), with o held in registers over the chunk */
            int i = 0;
#ifdef MP_VEC8
            for (; i + 32 <= hd; i += 32) {
                v8f o0 = load8(o + i), o1 = load8(o + i + 8), o2 = load8(o + i + 16),
                    o3 = load8(o + i + 24);
                for (int u = 0; u < n; u++) {
                    const float *v = v0 + u * rs + i;
                    const float p = sj[u];
                    o0 += p * load8(v);
                    o1 += p * load8(v + 8);
                    o2 += p * load8(v + 16);
                    o3 += p * load8(v + 24);
                }
                memcpy(o + i, &o0, sizeof o0);
                memcpy(o + i + 8, &o1, sizeof o1);
                memcpy(o + i + 16, &o2, sizeof o2);
                memcpy(o + i + 24, &o3, sizeof o3);
            }
#endif
            for (int u = 0; u < n && i < hd; u++) {
                const float *v = v0 + u * rs;
                const float p = sj[u];
#pragma omp simd
                for (int d = i; d < hd; d++) o[d] += p * v[d];
            }
        }
        t += n;
    }
}

/* y = rmsnorm(y) * w over one head (Qwen3's q_norm / k_norm) */
static void head_rmsnorm(float *y, int n, const float *w, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += y[i] * y[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) y[i] = y[i] * inv * w[i];
}

/* floats of a part's slot, in whole cache lines: two threads' slots never share one */
static int64_t part_floats(int group, int hd) {
    return ((int64_t)group * (hd + 2) + 15) / 16 * 16;
}

typedef struct {
    int nh, nkv, hd, block_size, bt_width, qkv_n;
    const float *f, *kv_cache; /* kv_cache: float32, or NULL with kv16: bf16 */
    const uint16_t *kv16;
    int64_t v_base, row_stride;
    const int32_t *block_tables, *row_req, *row_len;
    const int32_t *rows_of; /* the rows that attend here (single-token rows) */
    int64_t items;          /* item k: row rows_of[k / nkv], KV head k % nkv */
    float scale;
    float *parts; /* part slots of group * (hd + 2) floats: item k's part in job i is k + i */
} attn_ctx;

typedef struct {
    const attn_ctx *c;
    int index;
    int64_t begin, end; /* a range of the items' positions laid end to end */
} attn_job;

static void *run_attn_job(void *arg) {
    const attn_job *job = (const attn_job *)arg;
    const attn_ctx *a = job->c;
    const int group = a->nh / a->nkv;
    const int64_t slot = part_floats(group, a->hd);
    int64_t first = 0, k = 0;
    for (; k < a->items; k++) { /* the item holding position `begin` */
        const int len = a->row_len[a->rows_of[k / a->nkv]];
        if (first + len > job->begin) break;
        first += len;
    }
    for (; k < a->items && first < job->end; k++) {
        const int r = a->rows_of[k / a->nkv], g = (int)(k % a->nkv), len = a->row_len[r];
        const int64_t t0 = job->begin > first ? job->begin - first : 0;
        const int64_t t1 = job->end - first < len ? job->end - first : len;
        /* two inlined copies: with kh16 a constant NULL, the float32 cache's loops are
         * compiled as if the bf16 case did not exist */
        if (t0 < t1 && a->kv16)
            attend_part(a->f + (int64_t)r * a->qkv_n + (int64_t)g * group * a->hd, group,
                        a->hd, NULL, a->kv16 + (int64_t)g * a->hd, a->v_base, a->row_stride,
                        a->block_size, a->block_tables + (int64_t)a->row_req[r] * a->bt_width,
                        (int)t0, (int)t1, a->scale, a->parts + (k + job->index) * slot);
        else if (t0 < t1)
            attend_part(a->f + (int64_t)r * a->qkv_n + (int64_t)g * group * a->hd, group,
                        a->hd, a->kv_cache + (int64_t)g * a->hd, NULL, a->v_base, a->row_stride,
                        a->block_size, a->block_tables + (int64_t)a->row_req[r] * a->bt_width,
                        (int)t0, (int)t1, a->scale, a->parts + (k + job->index) * slot);
        first += len;
    }
    return NULL;
}

/* One attention block of a step's token rows, from the fused qkv matmul's output to the o
 * projection's input (both bf16, or both float32 with io_f32 set: a float32 model's plain
 * matmuls), the cache float32 or (kv_bf16 set) bf16; with q_norm / k_norm (Qwen3) each q
 * and k head is RMS-normed (weights of head_dim floats, qk_eps) after the bias: bias, rotary (rotate-half on the first rot_dim dims of each
 * q and k head, cos/sin from the model's [positions, rot_dim] table) and the K/V write into
 * the paged cache ([2, blocks, block_size, kv_heads, head_dim] float32 or bf16) for every row; then
 * causal attention, GQA by head groups, for the rows with attend[r] set (the one new token
 * of a decoding request): over the first row_len[r] positions of request row_req[r]'s
 * blocks. The other rows (prompt chunks) are left for the caller, whose attention reads the
 * rotated q at work[r * (nh + 2 * nkv) * hd] (float32) and the K/V written here.
 * With n_threads > 1 and enough work to pay for starting threads (MIN_SPLIT_*), the
 * (row, KV head) items' positions, laid end to end, are cut into n_threads equal ranges, one
 * a thread (this one and pthreads started for the call), so rows of mixed lengths split
 * evenly; an item cut between two ranges is split over its context positions
 * (flash-decoding style). Each range leaves a partial softmax per item it touches; they are
 * merged here at the end.
 * work: rows * (nh + 2 * nkv) * hd floats (each row's q | k | v), then a partial-result slot of
 * group * (hd + 2) floats (rounded up to 16)
 * per (row, KV head) and one more per thread beyond the first
 * (cpu_kernels.attention_work_floats); rows_of: scratch of rows int32. */
void mp_decode_attention_io(int rows, int nh, int nkv, int hd, int rot_dim,
                            const void *qkv, const float *bias, const float *cos_sin,
                            const int64_t *positions, void *kv, int num_blocks,
                            int block_size, const int64_t *slots, const int32_t *block_tables,
                            int bt_width, const int32_t *row_req, const int32_t *row_len,
                            const uint8_t *attend, float scale, void *out, float *work,
                            int32_t *rows_of, int n_threads, int io_f32, int kv_bf16,
                            const float *q_norm, const float *k_norm, float qk_eps) {
    float *kv_cache = kv_bf16 ? NULL : (float *)kv;
    uint16_t *kv16 = kv_bf16 ? (uint16_t *)kv : NULL;
    const int qkv_n = (nh + 2 * nkv) * hd;
    const int half = rot_dim / 2;
    const int group = nh / nkv;
    const int64_t row_stride = (int64_t)nkv * hd;            /* one token of K (or V) */
    const int64_t v_base = (int64_t)num_blocks * block_size * row_stride;
    float *f = work;                                          /* q | k | v of each row */
    int n_attend = 0;
    int64_t context = 0;
    for (int r = 0; r < rows; r++) {
        float *x = f + (int64_t)r * qkv_n;
        if (io_f32) {
            memcpy(x, (const float *)qkv + (int64_t)r * qkv_n, sizeof(float) * qkv_n);
        } else {
            const uint16_t *src = (const uint16_t *)qkv + (int64_t)r * qkv_n;
            for (int i = 0; i < qkv_n; i++) x[i] = bf16_to_f32(src[i]);
        }
        if (bias)
            for (int i = 0; i < qkv_n; i++) x[i] = x[i] + bias[i];
        if (q_norm) /* Qwen3: every q and k head RMS-normed over head_dim, then rotated */
            for (int head = 0; head < nh + nkv; head++)
                head_rmsnorm(x + (int64_t)head * hd, hd, head < nh ? q_norm : k_norm, qk_eps);
        const float *cs = cos_sin + positions[r] * rot_dim;
        for (int head = 0; head < nh + nkv; head++) { /* q heads, then k heads */
            float *y = x + (int64_t)head * hd;
            for (int i = 0; i < half; i++) {
                float x1 = y[i], x2 = y[i + half], c = cs[i], s = cs[half + i];
                y[i] = x1 * c - x2 * s;
                y[i + half] = x2 * c + x1 * s;
            }
        }
        if (kv16) {
            uint16_t *kslot = kv16 + slots[r] * row_stride;
            const float *kx = x + (int64_t)nh * hd, *vx = kx + row_stride;
            for (int64_t i = 0; i < row_stride; i++) {
                kslot[i] = f32_to_bf16(kx[i]);
                kslot[v_base + i] = f32_to_bf16(vx[i]);
            }
        } else {
            float *kslot = kv_cache + slots[r] * row_stride;
            memcpy(kslot, x + (int64_t)nh * hd, sizeof(float) * row_stride);
            memcpy(kslot + v_base, x + (int64_t)(nh + nkv) * hd, sizeof(float) * row_stride);
        }
        if (attend[r]) {
            rows_of[n_attend++] = r;
            context += row_len[r];
        }
    }
    if (n_attend == 0) return;
    const int64_t items = (int64_t)n_attend * nkv, total = context * nkv;
    int threads = n_threads < 1 ? 1 : (n_threads > 16 ? 16 : n_threads);
    if (context * nh < MIN_SPLIT_WORK || items < (int64_t)MIN_SPLIT_ITEMS_PER_THREAD * threads)
        threads = 1;
    const attn_ctx c = {nh, nkv, hd, block_size, bt_width, qkv_n, f, kv_cache, kv16, v_base,
                        row_stride, block_tables, row_req, row_len, rows_of, items, scale,
                        f + (int64_t)rows * qkv_n};
    attn_job jobs[16];
    pthread_t tids[16];
    int started[16] = {0};
    for (int i = 0; i < threads; i++) {
        attn_job j = {&c, i, total * i / threads, total * (i + 1) / threads};
        jobs[i] = j;
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
    /* merge each item's parts: rescale each to the overall max, add, normalise */
    const int64_t slot = part_floats(group, hd);
    float w[16][64], mmax[64];
    const float *part_of[16];
    int64_t first = 0;
    for (int64_t k = 0; k < items; k++) {
        const int r = rows_of[k / nkv], g = (int)(k % nkv), len = row_len[r];
        int n_parts = 0;
        for (int i = 0; i < threads; i++)
            if (jobs[i].end > first && jobs[i].begin < first + len)
                part_of[n_parts++] = c.parts + (k + i) * slot;
        for (int j = 0; j < group; j++) {
            mmax[j] = -INFINITY;
            for (int p = 0; p < n_parts; p++)
                if (part_of[p][j] > mmax[j]) mmax[j] = part_of[p][j];
            float lsum = 0.0f;
            for (int p = 0; p < n_parts; p++) {
                w[p][j] = exp_nonpos(part_of[p][j] - mmax[j]);
                lsum += w[p][j] * part_of[p][group + j];
            }
            for (int p = 0; p < n_parts; p++) w[p][j] /= lsum;
        }
        const int64_t at = ((int64_t)r * nh + (int64_t)g * group) * hd;
        for (int j = 0; j < group; j++)
            for (int d = 0; d < hd; d++) {
                float o = 0.0f;
                for (int p = 0; p < n_parts; p++)
                    o += w[p][j] * part_of[p][2 * group + (int64_t)j * hd + d];
                if (io_f32)
                    ((float *)out)[at + (int64_t)j * hd + d] = o;
                else
                    ((uint16_t *)out)[at + (int64_t)j * hd + d] = f32_to_bf16(o);
            }
        first += len;
    }
}

/* mp_decode_attention_io with bf16 qkv and output (the int4 / int8 GEMMs' dtype) */
void mp_decode_attention(int rows, int nh, int nkv, int hd, int rot_dim,
                         const uint16_t *qkv, const float *bias, const float *cos_sin,
                         const int64_t *positions, float *kv_cache, int num_blocks,
                         int block_size, const int64_t *slots, const int32_t *block_tables,
                         int bt_width, const int32_t *row_req, const int32_t *row_len,
                         const uint8_t *attend, float scale, uint16_t *out, float *work,
                         int32_t *rows_of, int n_threads) {
    mp_decode_attention_io(rows, nh, nkv, hd, rot_dim, qkv, bias, cos_sin, positions, kv_cache,
                           num_blocks, block_size, slots, block_tables, bt_width, row_req,
                           row_len, attend, scale, out, work, rows_of, n_threads, 0, 0, NULL,
                           NULL, 0.0f);
}

/* SwiGLU between the gate/up and down matmuls: out = silu(gate) * up, bf16 in and out, or
 * float32 in and out with io_f32 set. */
void mp_silu_mul_io(int rows, int inter, const void *gate_up, void *out, int io_f32) {
    for (int r = 0; r < rows; r++) {
        if (io_f32) {
            const float *gu = (const float *)gate_up + (int64_t)r * 2 * inter;
            float *o = (float *)out + (int64_t)r * inter;
            for (int i = 0; i < inter; i++) {
                float g = gu[i], u = gu[inter + i];
                o[i] = g / (1.0f + expf(-g)) * u;
            }
            continue;
        }
        const uint16_t *gu = (const uint16_t *)gate_up + (int64_t)r * 2 * inter;
        uint16_t *o = (uint16_t *)out + (int64_t)r * inter;
        for (int i = 0; i < inter; i++) {
            float g = bf16_to_f32(gu[i]), u = bf16_to_f32(gu[inter + i]);
            o[i] = f32_to_bf16(g / (1.0f + expf(-g)) * u);
        }
    }
}

/* mp_silu_mul_io in bf16 */
void mp_silu_mul(int rows, int inter, const uint16_t *gate_up, uint16_t *out) {
    mp_silu_mul_io(rows, inter, gate_up, out, 0);
}

/* One token's MoE sum (cpu_moe_step.py): out[i] = sum_j w[j] * ys[j][i], each product rounded
 * to float32 and the k terms added in order j = 0, 1, ..., as grouped_experts sums them; ys[j]
 * is the j-th selected expert's output row (bf16, or float32 with ys_f32 set). */
void mp_moe_sum(int k, int h, const void *const *ys, int ys_f32, const float *w, float *out) {
    for (int j = 0; j < k; j++) {
        const float wj = w[j];
        if (ys_f32) {
            const float *y = (const float *)ys[j];
            if (j == 0)
                for (int i = 0; i < h; i++) out[i] = y[i] * wj;
            else
                for (int i = 0; i < h; i++) out[i] = out[i] + y[i] * wj;
        } else {
            const uint16_t *y = (const uint16_t *)ys[j];
            if (j == 0)
                for (int i = 0; i < h; i++) out[i] = bf16_to_f32(y[i]) * wj;
            else
                for (int i = 0; i < h; i++) out[i] = out[i] + bf16_to_f32(y[i]) * wj;
        }
    }
}
