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

/* ---- GGUF Q8_0 matmul with the file's per-block scales (quantization/kernels.CpuQ8Kernel) ----
 *
 * y[m, n] = sum_k w[n, k] * x[m, k] with w[n, k] = q[n, k] * d[n, k / 32]: q int8 [N, K],
 * d fp16 [N, K / 32] (the Q8_0 block scales), x float32 or bf16 [M, K], y float32 or bf16
 * [M, N]. Each block's weights are formed in float32 as q * d, which is exact (8 bits times
 * an 11-bit mantissa), so the result is the exactly dequantized weight's matmul up to float32
 * accumulation order. Output rows n are split over this thread and others: built with
 * -fopenmp (cpu_kernels.py tries that first), the threads of the OpenMP team torch's own ops
 * run on (the library is loaded after torch, so libgomp.so.1 is torch's copy); else, or in a
 * child forked after that team ran (whose threads the child lacks: a GOMP call there never
 * returns), a small pool of resident workers (starting a pthread per call costs ~35 us, more
 * than a 1-row projection here), each spinning spin_us microseconds for the next call before
 * sleeping on a condition variable. One team matters on a small box: beside torch's team,
 * whose workers spin for milliseconds after each of its parallel ops (the LM head), a second
 * pool's worker had to share a core with a spinning one, and on 2 cores the decode step
 * after the head took 10.7-14.5 ms instead of 6.4 ms (bench/README.md, session 32). */
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <sched.h>
#include <stdatomic.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <time.h>

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0) { /* zero / subnormal: m * 2^-24 */
        float f = (float)m * 5.9604644775390625e-08f;
        return (h & 0x8000u) ? -f : f;
    }
    u = e == 31 ? (s | 0x7f800000u | (m << 13)) : (s | ((e + 112) << 23) | (m << 13));
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

/* rows of x a pass over one weight row takes (two accumulators each) */
#if defined(__AVX512F__)
#define Q8_MT 8
#else
#define Q8_MT 4
#endif

typedef struct {
    int M, N, K, y_f32, expand; /* expand: write w itself ([N, K] bf16 at y), no matmul */
    const float *x;
    const int8_t *q;
    const uint16_t *d;
    void *y;
    /* mp_q8_matmul_i8 (x quantized per block, see there; x unused): xq int8 [M, kp], xd
     * float32 [M, kp / 32] (kp: K rounded up to 64, the padding zero); with AVX-512 VNNI also
     * per 4 codes -128 x their sum (xc int32 [M, kp / 4]) and each code's block scale per 4
     * codes (xl float32 [M, kp / 4]) */
    const int8_t *xq;
    const float *xd;
    const int32_t *xc;
    const float *xl;
    int kp;
    /* VNNI, groups of 16 blocks (K / 512 of them, the rest of K is the tail): x's codes in
     * the packed order (mp_q8_i8_pack; xi int8 [M, G * 512]) and -128 x each block's code sum
     * (xg int32 [M, G * 16]); packed: q is in that order too (also for expand) */
    const int8_t *xi;
    const int32_t *xg;
    int packed;
} q8_job;

/* rows r0..r0+mt-1 (mt <= Q8_MT) of x against output row n: out[r]. Inlined with a constant
 * mt (q8_dot_rows) so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void q8_dot_impl(const q8_job *j, int n, int r0,
                                                              const int mt, float *out) {
    const int K = j->K, nb = K / 32;
    const int8_t *q = j->q + (int64_t)n * K;
    const uint16_t *d = j->d + (int64_t)n * nb;
    const float *x0 = j->x + (int64_t)r0 * K;
#if defined(__AVX512F__)
    float sc[nb + 16]; /* the row's block scales as float32, converted 16 at a time */
    for (int b = 0; b < nb; b += 16) {
        if (nb - b >= 16)
            _mm512_storeu_ps(sc + b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + b))));
        else
            for (int i = b; i < nb; i++) sc[i] = f16_to_f32(d[i]);
    }
    __m512 a0[Q8_MT], a1[Q8_MT];
    for (int r = 0; r < Q8_MT; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m512 s = _mm512_set1_ps(sc[b]);
        const __m512i qi = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * b)));
        const __m512i qj =
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * b + 16)));
        const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(qi), s);
        const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(qj), s);
        for (int r = 0; r < mt; r++) {
            const float *xr = x0 + (int64_t)r * K + 32 * b;
            a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a0[r]);
            a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), a1[r]);
        }
    }
    for (int r = 0; r < mt; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0[Q8_MT], a1[Q8_MT];
    for (int r = 0; r < Q8_MT; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m256 s = _mm256_set1_ps(f16_to_f32(d[b]));
        for (int h = 0; h < 32; h += 16) {
            const __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                _mm_loadl_epi64((const __m128i *)(q + 32 * b + h)))), s);
            const __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                _mm_loadl_epi64((const __m128i *)(q + 32 * b + h + 8)))), s);
            for (int r = 0; r < mt; r++) {
                const float *xr = x0 + (int64_t)r * K + 32 * b + h;
                a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a0[r]);
                a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), a1[r]);
            }
        }
    }
    for (int r = 0; r < mt; r++) {
        __m256 v = _mm256_add_ps(a0[r], a1[r]);
        __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        t = _mm_add_ps(t, _mm_movehl_ps(t, t));
        t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));
        out[r] = _mm_cvtss_f32(t);
    }
#else
    for (int r = 0; r < mt; r++) {
        const float *xr = x0 + (int64_t)r * K;
        float acc[8] = {0};
        for (int b = 0; b < nb; b++) {
            const float s = f16_to_f32(d[b]);
            for (int k = 0; k < 32; k++) acc[k & 7] += ((float)q[32 * b + k] * s) * xr[32 * b + k];
        }
        out[r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
#endif
}

static void q8_dot_rows(const q8_job *j, int n, int r0, int mt, float *out) {
    switch (mt) {
#define Q8_CASE(c) case c: q8_dot_impl(j, n, r0, c, out); break;
        Q8_CASE(1) Q8_CASE(2) Q8_CASE(3) Q8_CASE(4)
#if Q8_MT > 4
        Q8_CASE(5) Q8_CASE(6) Q8_CASE(7) Q8_CASE(8)
#endif
#undef Q8_CASE
        default: break;
    }
}

/* w[n, :] = q * d rounded once to bf16 (the exact weight's nearest bf16) */
static void q8_expand_rows(const q8_job *j, int n0, int n1) {
    const int K = j->K, nb = K / 32;
    for (int n = n0; n < n1; n++) {
        const int8_t *q = j->q + (int64_t)n * K;
        const uint16_t *d = j->d + (int64_t)n * nb;
        uint16_t *w = (uint16_t *)j->y + (int64_t)n * K;
        int8_t row[j->packed ? K : 1];
        if (j->packed) { /* groups of 16 blocks in the packed order (mp_q8_i8_pack) */
            for (int g = 0; g < K / 512; g++)
                for (int i = 0; i < 16; i++)
                    for (int t = 0; t < 8; t++)
                        memcpy(row + 512 * g + 32 * i + 4 * t, q + 512 * g + 64 * t + 4 * i, 4);
            memcpy(row + K / 512 * 512, q + K / 512 * 512, (size_t)(K % 512));
            q = row;
        }
        for (int b = 0; b < nb; b++) {
            const float s = f16_to_f32(d[b]);
#pragma omp simd
            for (int k = 0; k < 32; k++) w[32 * b + k] = f32_to_bf16((float)q[32 * b + k] * s);
        }
    }
}

static void q8i_run(const q8_job *j, int n0, int n1);

/* y[r0 .. r0 + mt, n] = out, in y's dtype */
static inline void q8_store(const q8_job *j, int n, int r0, int mt, const float *out) {
    for (int r = 0; r < mt; r++) {
        const int64_t at = (int64_t)(r0 + r) * j->N + n;
        if (j->y_f32)
            ((float *)j->y)[at] = out[r];
        else
            ((uint16_t *)j->y)[at] = f32_to_bf16(out[r]);
    }
}

static void q8_run(const q8_job *j, int n0, int n1) {
    if (j->expand) {
        q8_expand_rows(j, n0, n1);
        return;
    }
    if (j->xq) {
        q8i_run(j, n0, n1);
        return;
    }
    float out[Q8_MT];
    for (int n = n0; n < n1; n++)
        for (int r0 = 0; r0 < j->M; r0 += Q8_MT) {
            const int mt = j->M - r0 < Q8_MT ? j->M - r0 : Q8_MT;
            q8_dot_rows(j, n, r0, mt, out);
            q8_store(j, n, r0, mt, out);
        }
}

#define Q8_MAX_THREADS 16
static pthread_mutex_t q8_call_mu = PTHREAD_MUTEX_INITIALIZER; /* one call at a time */
static pthread_mutex_t q8_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q8_cv = PTHREAD_COND_INITIALIZER;
static int q8_workers;                 /* started so far */
static atomic_uint q8_gen;             /* bumped per posted call */
static atomic_int q8_pending;          /* workers' parts not yet done */
static q8_job q8_cur;
static int q8_parts, q8_spin_us;

static double q8_now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

static inline void q8_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* A forked child has none of the parent's workers: start its own on its first call. */
static int q8_forked; /* this process is a fork's child: the pthread pool, not OpenMP */

static void q8_after_fork_child(void) {
    q8_forked = 1;
    pthread_mutex_init(&q8_call_mu, NULL);
    pthread_mutex_init(&q8_mu, NULL);
    pthread_cond_init(&q8_cv, NULL);
    q8_workers = 0;
    atomic_store(&q8_pending, 0);
}

typedef struct {
    int me;        /* its part (the calling thread does part 0) */
    unsigned seen; /* the call count when it was started: it waits for the next one */
} q8_start;

static void *q8_worker(void *arg) {
    const q8_start st = *(const q8_start *)arg;
    free(arg);
    const int me = st.me;
    unsigned seen = st.seen;
    for (;;) {
        unsigned g = atomic_load_explicit(&q8_gen, memory_order_acquire);
        if (g == seen) {
            const double until = q8_now_us() + q8_spin_us;
            int n = 0;
            while ((g = atomic_load_explicit(&q8_gen, memory_order_acquire)) == seen) {
                q8_pause();
                if (++n % 256 == 0 && q8_now_us() > until) break;
            }
            if (g == seen) {
                pthread_mutex_lock(&q8_mu);
                while ((g = atomic_load_explicit(&q8_gen, memory_order_acquire)) == seen)
                    pthread_cond_wait(&q8_cv, &q8_mu);
                pthread_mutex_unlock(&q8_mu);
            }
        }
        seen = g;
        /* every worker acknowledges every call (so none can lag into the next one) */
        if (me < q8_parts) {
            const q8_job *j = &q8_cur;
            q8_run(j, (int)((int64_t)j->N * me / q8_parts),
                   (int)((int64_t)j->N * (me + 1) / q8_parts));
        }
        atomic_fetch_sub_explicit(&q8_pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* x: [M, K] float32 (x_f32) or bf16; y: [M, N] float32 (y_f32) or bf16. K a multiple of 32.
 * n_threads: this thread and up to n_threads - 1 pool workers (fewer for small calls). */
static void q8_go(q8_job j, int n_threads, int spin_us);
static void q8_after_fork_child(void);
/* at load, so that a child forked before this library's first call knows it is one */
__attribute__((constructor)) static void q8_register_atfork(void) {
    pthread_atfork(NULL, NULL, q8_after_fork_child);
}

/* The weight itself as bf16 [N, K] (w: the output), for a bf16 matmul of many rows. */
void mp_q8_expand_bf16(int N, int K, const int8_t *q, const uint16_t *d, uint16_t *w,
                       int n_threads, int spin_us) {
    q8_job j = {0, N, K, 0, 1, NULL, q, d, w};
    q8_go(j, n_threads, spin_us);
}

void mp_q8_matmul(int M, int N, int K, const void *x, int x_f32, const int8_t *q,
                  const uint16_t *d, void *y, int y_f32, int n_threads, int spin_us) {
    float *xf = NULL;
    if (!x_f32) {
        xf = (float *)malloc(sizeof(float) * (size_t)M * K);
        if (!xf) return;
        for (int64_t i = 0; i < (int64_t)M * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    }
    q8_job j = {M, N, K, y_f32, 0, xf ? xf : (const float *)x, q, d, y};
    q8_go(j, n_threads, spin_us);
    free(xf);
}

static void q8_go(q8_job j, int n_threads, int spin_us) {
    const int N = j.N, K = j.K;
    int parts = n_threads < 1 ? 1 : (n_threads > Q8_MAX_THREADS ? Q8_MAX_THREADS : n_threads);
    if ((int64_t)N * K < 65536 || N < 8 * parts) parts = 1; /* too small to pay for a hand-off */
#ifdef _OPENMP
    if (parts > 1 && !q8_forked) { /* torch's team (it may give fewer threads than asked) */
#pragma omp parallel num_threads(parts)
        {
            const int me = omp_get_thread_num(), all = omp_get_num_threads();
            q8_run(&j, (int)((int64_t)N * me / all), (int)((int64_t)N * (me + 1) / all));
        }
        return;
    }
#endif
    if (parts > 1) {
        pthread_mutex_lock(&q8_call_mu);
        while (q8_workers < parts - 1) { /* start the pool's workers on first need */
            pthread_t t;
            q8_start *st = (q8_start *)malloc(sizeof *st);
            if (!st) break;
            st->me = q8_workers + 1;
            st->seen = atomic_load(&q8_gen);
            if (pthread_create(&t, NULL, q8_worker, st) != 0) {
                free(st);
                break;
            }
            pthread_detach(t);
            q8_workers++;
        }
        if (parts > q8_workers + 1) parts = q8_workers + 1;
        q8_cur = j;
        q8_parts = parts;
        q8_spin_us = spin_us;
        atomic_store_explicit(&q8_pending, q8_workers, memory_order_release);
        pthread_mutex_lock(&q8_mu);
        atomic_fetch_add_explicit(&q8_gen, 1, memory_order_acq_rel);
        pthread_cond_broadcast(&q8_cv);
        pthread_mutex_unlock(&q8_mu);
        q8_run(&j, 0, (int)((int64_t)N / parts));
        /* the workers' parts: spin, then give the core away now and then (a worker that
         * slept may be waiting for one on a busy machine) */
        for (int i = 0; atomic_load_explicit(&q8_pending, memory_order_acquire) > 0; i++) {
            q8_pause();
            if (i > 4096 && i % 64 == 0) sched_yield();
        }
        pthread_mutex_unlock(&q8_call_mu);
    } else {
        q8_run(&j, 0, N);
    }
}

/* ---- The same with x quantized per block: int8 x int8 dot products (CpuQ8Kernel) ----
 *
 * Each row of x is quantized per block of 32 (the weight's blocks) to int8 with one float32
 * scale: xd = max|x| / 127, code = round-half-even(x * (1 / xd)) in [-127, 127] (0 where the
 * block is all zero); then y[m, n] = sum_blocks (sum_32 q * code) * (d * xd), the block's
 * integer dot product exact, the scaling and the sum over blocks in float32. So the weights
 * stay exact (the file's block scales) and the only error beyond float32 rounding is x's
 * rounding to 8 bits per block, at most xd / 2 an element. The x codes are made once a call
 * and each weight block serves every row. AVX-512 VNNI: vpdpbusd takes unsigned bytes times
 * signed, so the weight code is offset to q + 128 (unsigned) against signed x codes, and the
 * accumulator starts at -128 x the codes' sum per 4 (xc), which makes the integer sum exact;
 * AVX2: |q| (unsigned, <= 128) times x's code with q's sign (vpsignb), pairs summed in int16
 * (at most 2 x 128 x 127, no saturation), then in int32; else scalar. */

/* rows of x a chunk keeps hot while every weight row of the part passes over it */
#define Q8I_MC 64

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define Q8I_VNNI 1
#else
#define Q8I_VNNI 0
#endif

static void q8i_quantize(int M, int K, const void *x, int x_f32, int kp, int8_t *xq, float *xd,
                         int32_t *xc, float *xl, int8_t *xi, int32_t *xg) {
    const int nb = K / 32, nbp = kp / 32, G = K / 512;
    for (int m = 0; m < M; m++) {
        int8_t *qr = xq + (int64_t)m * kp;
        float *dr = xd + (int64_t)m * nbp;
        int b = 0;
#if Q8I_VNNI
        /* the same arithmetic 16 lanes at a time (vcvtps2dq rounds half to even) */
        for (; b < nb; b++) {
            const int64_t at = (int64_t)m * K + 32 * b;
            __m512 v0, v1;
            if (x_f32) {
                v0 = _mm512_loadu_ps((const float *)x + at);
                v1 = _mm512_loadu_ps((const float *)x + at + 16);
            } else {
                const uint16_t *h = (const uint16_t *)x + at;
                v0 = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)h)), 16));
                v1 = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(h + 16))), 16));
            }
            const float amax = _mm512_reduce_max_ps(
                _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
            const __m512 vi = _mm512_set1_ps(id);
            const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
            const __m512i c0 = _mm512_min_epi32(hi, _mm512_max_epi32(lo,
                _mm512_cvtps_epi32(_mm512_mul_ps(v0, vi))));
            const __m512i c1 = _mm512_min_epi32(hi, _mm512_max_epi32(lo,
                _mm512_cvtps_epi32(_mm512_mul_ps(v1, vi))));
            const __m256i c = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm512_cvtepi32_epi8(c0)), _mm512_cvtepi32_epi8(c1), 1);
            _mm256_storeu_si256((__m256i *)(qr + 32 * b), c);
            dr[b] = d;
            if (xc) { /* per 4 codes: -128 x their sum, and their block's scale */
                const __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(),
                                                      _mm256_set1_epi8((char)0x80), c);
                _mm256_storeu_si256((__m256i *)(xc + (int64_t)m * (kp / 4) + 8 * b),
                                    _mm256_sub_epi32(_mm256_setzero_si256(), s));
                _mm256_storeu_ps(xl + (int64_t)m * (kp / 4) + 8 * b, _mm256_set1_ps(d));
                if (b < 16 * G) { /* the packed copy: 4 codes at a time */
                    int32_t four[8], sum = 0;
                    _mm256_storeu_si256((__m256i *)four, c);
                    int8_t *g = xi + (int64_t)m * G * 512 + 512 * (b / 16) + 4 * (b % 16);
                    for (int t = 0; t < 8; t++) memcpy(g + 64 * t, four + t, 4);
                    _mm256_storeu_si256((__m256i *)four, s);
                    for (int t = 0; t < 8; t++) sum += four[t];
                    xg[(int64_t)m * G * 16 + b] = -sum;
                }
            }
        }
#endif
        for (; b < nb; b++) {
            float v[32], amax = 0.0f;
            const int64_t at = (int64_t)m * K + 32 * b;
            if (x_f32)
                memcpy(v, (const float *)x + at, sizeof v);
            else
                for (int k = 0; k < 32; k++) v[k] = bf16_to_f32(((const uint16_t *)x)[at + k]);
            for (int k = 0; k < 32; k++) amax = fmaxf(amax, fabsf(v[k]));
            const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
            for (int k = 0; k < 32; k++) {
                float c = nearbyintf(v[k] * id); /* round half to even, as torch.round */
                c = c > 127.0f ? 127.0f : (c < -127.0f ? -127.0f : c);
                qr[32 * b + k] = (int8_t)c;
            }
            dr[b] = d;
        }
        for (int b = nb; b < nbp; b++) {
            memset(qr + 32 * b, 0, 32);
            dr[b] = 0.0f;
        }
        if (xc) /* per 4 codes: -128 x their sum, and their block's scale (what is left) */
            for (int i = Q8I_VNNI ? nb * 8 : 0; i < kp / 4; i++) {
                const int8_t *c = qr + 4 * i;
                xc[(int64_t)m * (kp / 4) + i] = -128 * (c[0] + c[1] + c[2] + c[3]);
                xl[(int64_t)m * (kp / 4) + i] = dr[i / 8];
            }
    }
}

/* rows r0..r0+mt-1 of the quantized x against weight row n: out[r] */
static inline __attribute__((always_inline)) void q8i_dot_impl(const q8_job *j, int n, int r0,
                                                               const int mt, float *out) {
    const int K = j->K, nb = K / 32, kp = j->kp;
    const int8_t *q = j->q + (int64_t)n * K;
    const uint16_t *d = j->d + (int64_t)n * nb;
    const int8_t *xq = j->xq + (int64_t)r0 * kp;
#if Q8I_VNNI
    const int nbp = kp / 32;
    float sc[nbp + 16]; /* the row's block scales as float32, zero past nb */
    for (int b = 0; b < nbp; b += 16) {
        if (nb - b >= 16)
            _mm512_storeu_ps(sc + b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + b))));
        else
            for (int i = b; i < b + 16; i++) sc[i] = i < nb ? f16_to_f32(d[i]) : 0.0f;
    }
    const int32_t *xc = j->xc + (int64_t)r0 * (kp / 4);
    const float *xl = j->xl + (int64_t)r0 * (kp / 4);
    const __m512i off = _mm512_set1_epi8((char)0x80);
    /* lanes 0-7: a pair's first block's scale, 8-15 its second's */
    const __m512i two = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[Q8_MT];
    for (int r = 0; r < Q8_MT; r++) acc[r] = _mm512_setzero_ps();
    /* groups of 16 blocks (packed: step t holds codes 4t..4t+3 of each block, so lane i of
     * the int32 sum is block i's whole dot product after 8 steps) */
    const int G = K / 512;
    const int8_t *xi = j->xi + (int64_t)r0 * G * 512;
    const int32_t *xg = j->xg + (int64_t)r0 * G * 16;
    const float *xd = j->xd + (int64_t)r0 * nbp;
    for (int g = 0; g < G; g++) {
        __m512i wu[8];
        for (int t = 0; t < 8; t++)
            wu[t] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(q + 512 * g + 64 * t)),
                                     off);
        const __m512 ws = _mm512_loadu_ps(sc + 16 * g);
        for (int r = 0; r < mt; r++) {
            const int8_t *xr = xi + (int64_t)r * G * 512 + 512 * g;
            __m512i dot = _mm512_loadu_si512((const void *)(xg + (int64_t)r * G * 16 + 16 * g));
            for (int t = 0; t < 8; t++)
                dot = _mm512_dpbusd_epi32(dot, wu[t], _mm512_loadu_si512((const void *)(xr + 64 * t)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                     _mm512_mul_ps(ws, _mm512_loadu_ps(xd + (int64_t)r * nbp + 16 * g)),
                                     acc[r]);
        }
    }
    for (int b = 16 * G; b < nbp; b += 2) { /* the tail: two blocks a step */
        const __m512i w = b + 1 < nb ? _mm512_loadu_si512((const void *)(q + 32 * b))
                                     : _mm512_maskz_loadu_epi8(0xffffffffull, q + 32 * b);
        const __m512i wu = _mm512_xor_si512(w, off); /* q + 128 as unsigned */
        const __m512 ws = _mm512_permutexvar_ps(
            two, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(sc + b)))));
        for (int r = 0; r < mt; r++) {
            const int64_t at = (int64_t)r * (kp / 4) + 8 * b;
            const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512((const void *)(xc + at)),
                                                    wu,
                                                    _mm512_loadu_si512((const void *)(xq + (int64_t)r * kp + 32 * b)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                     _mm512_mul_ps(ws, _mm512_loadu_ps(xl + at)), acc[r]);
        }
    }
    for (int r = 0; r < mt; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(__AVX2__) && defined(__FMA__)
    const float *xd = j->xd + (int64_t)r0 * (kp / 32);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[Q8_MT];
    for (int r = 0; r < Q8_MT; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
        const __m256i aw = _mm256_abs_epi8(w); /* -128 gives 0x80: 128 as unsigned */
        const float s = f16_to_f32(d[b]);
        for (int r = 0; r < mt; r++) {
            const __m256i sx = _mm256_sign_epi8(
                _mm256_loadu_si256((const __m256i *)(xq + (int64_t)r * kp + 32 * b)), w);
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                     _mm256_set1_ps(s * xd[(int64_t)r * (kp / 32) + b]), acc[r]);
        }
    }
    for (int r = 0; r < mt; r++) {
        __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        t = _mm_add_ps(t, _mm_movehl_ps(t, t));
        t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));
        out[r] = _mm_cvtss_f32(t);
    }
#else
    const float *xd = j->xd + (int64_t)r0 * (kp / 32);
    for (int r = 0; r < mt; r++) {
        const int8_t *xr = xq + (int64_t)r * kp;
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            int32_t s = 0;
            for (int k = 0; k < 32; k++) s += (int32_t)q[32 * b + k] * xr[32 * b + k];
            acc += (float)s * (f16_to_f32(d[b]) * xd[(int64_t)r * (kp / 32) + b]);
        }
        out[r] = acc;
    }
#endif
}

static void q8i_dot_rows(const q8_job *j, int n, int r0, int mt, float *out) {
    switch (mt) {
#define Q8_CASE(c) case c: q8i_dot_impl(j, n, r0, c, out); break;
        Q8_CASE(1) Q8_CASE(2) Q8_CASE(3) Q8_CASE(4)
#if Q8_MT > 4
        Q8_CASE(5) Q8_CASE(6) Q8_CASE(7) Q8_CASE(8)
#endif
#undef Q8_CASE
        default: break;
    }
}

static void q8i_run(const q8_job *j, int n0, int n1) {
    float out[Q8_MT];
    for (int m0 = 0; m0 < j->M; m0 += Q8I_MC) {
        const int m1 = j->M - m0 < Q8I_MC ? j->M : m0 + Q8I_MC;
        for (int n = n0; n < n1; n++)
            for (int r0 = m0; r0 < m1; r0 += Q8_MT) {
                const int mt = m1 - r0 < Q8_MT ? m1 - r0 : Q8_MT;
                q8i_dot_rows(j, n, r0, mt, out);
                q8_store(j, n, r0, mt, out);
            }
    }
}

/* As mp_q8_matmul, with x quantized per block to int8 (above). */
void mp_q8_matmul_i8(int M, int N, int K, const void *x, int x_f32, const int8_t *q,
                     const uint16_t *d, void *y, int y_f32, int n_threads, int spin_us) {
    const int kp = (K + 63) / 64 * 64, G = K / 512;
    const size_t codes = (size_t)M * kp, grouped = (size_t)M * G * 512;
    /* xq, xd, and with VNNI xc, xl, xi, xg; 64-byte aligned parts */
    const size_t a0 = (codes + 63) & ~(size_t)63, a1 = (codes / 8 + 63) & ~(size_t)63;
    char *buf = (char *)malloc(a0 + a1 + (Q8I_VNNI ? 2 * a0 + grouped + grouped / 8 : 0) + 64);
    if (!buf) return;
    char *at = (char *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    int8_t *xq = (int8_t *)at, *xi = NULL;
    float *xd = (float *)(at + a0), *xl = NULL;
    int32_t *xc = NULL, *xg = NULL;
    if (Q8I_VNNI) {
        xc = (int32_t *)(at + a0 + a1);
        xl = (float *)(at + 2 * a0 + a1);
        xi = (int8_t *)(at + 3 * a0 + a1);
        xg = (int32_t *)(at + 3 * a0 + a1 + grouped);
    }
    q8i_quantize(M, K, x, x_f32, kp, xq, xd, xc, xl, xi, xg);
    q8_job j = {M, N, K, y_f32, 0, NULL, q, d, y, xq, xd, xc, xl, kp, xi, xg, Q8I_VNNI};
    q8_go(j, n_threads, spin_us);
    free(buf);
}

/* The codes and scales mp_q8_matmul_i8 gives x (xq int8 [M, kp], xd float32 [M, kp / 32]),
 * for tests. */
void mp_q8_quantize_x(int M, int K, const void *x, int x_f32, int8_t *xq, float *xd) {
    q8i_quantize(M, K, x, x_f32, (K + 63) / 64 * 64, xq, xd, NULL, NULL, NULL, NULL);
}

/* The weight codes [N, K] in the order mp_q8_matmul_i8 reads them (out): with VNNI each
 * group of 16 blocks (512 codes) as 8 steps of 4 codes of each block (step t: codes
 * 4t..4t+3 of block 0, then of block 1 ...), the rest of K as it is; else unchanged.
 * Returns 1 where the order changed (mp_q8_expand_bf16_packed then reads it). */
int mp_q8_i8_pack(int N, int K, const int8_t *q, int8_t *out) {
    const int G = Q8I_VNNI ? K / 512 : 0;
    for (int n = 0; n < N; n++) {
        const int8_t *src = q + (int64_t)n * K;
        int8_t *dst = out + (int64_t)n * K;
        for (int g = 0; g < G; g++)
            for (int i = 0; i < 16; i++)
                for (int t = 0; t < 8; t++)
                    memcpy(dst + 512 * g + 64 * t + 4 * i, src + 512 * g + 32 * i + 4 * t, 4);
        memcpy(dst + 512 * G, src + 512 * G, (size_t)(K - 512 * G));
    }
    return Q8I_VNNI;
}

/* mp_q8_expand_bf16 of a weight in mp_q8_i8_pack's order */
void mp_q8_expand_bf16_packed(int N, int K, const int8_t *q, const uint16_t *d, uint16_t *w,
                              int n_threads, int spin_us) {
    q8_job j = {0, N, K, 0, 1, NULL, q, d, w};
    j.packed = Q8I_VNNI;
    q8_go(j, n_threads, spin_us);
}

/* Which int8 dot product this build runs: 2 AVX-512 VNNI, 1 AVX2, 0 scalar (for tests). */
int mp_q8_i8_isa(void) {
#if Q8I_VNNI
    return 2;
#elif defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

/* 1 where the Q8_0 matmuls split rows over the OpenMP team (built with -fopenmp, not a
 * forked child), 0 where over the pthread pool (for tests). */
int mp_q8_uses_openmp(void) {
#ifdef _OPENMP
    return !q8_forked;
#else
    return 0;
#endif
}
