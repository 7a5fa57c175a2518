/* tslm's one-token decode step for Llama-style models (pre-norm RMSNorm, RoPE on interleaved pairs,
 * SwiGLU, no biases), written for this project. Built on first use by tinystories_cli/fastpath/build.py
 * with the system C compiler (-O3 -march=native -fopenmp) and driven through ctypes by engine.py.
 *
 * One call, tslm_forward(), runs one token per batch row through the whole model and writes the
 * next-token logits into a caller-owned buffer. Weights are read in place as row-major [out, in]
 * matrices (torch's own layout for fp32; packed copies for bf16 and int8), so every matrix-vector
 * product streams each weight row once, contiguously. The KV cache is the caller's: per layer a
 * (batch, heads, columns, head_dim) fp32 buffer, the layout TransformerLM's KVCache uses, so a
 * prompt prefilled by the torch model can be continued here.
 *
 * Precisions (weights only; activations and the KV cache stay fp32):
 *   0 fp32  plain fp32 dot products (AVX-512 FMA when the compiler targets it).
 *   1 bf16  weights in bf16, the input vector rounded to bf16 (round to nearest even), products
 *           accumulated in fp32 (AVX512-BF16 vdpbf16ps where available, else a scalar loop).
 *   2 int8  weights quantized symmetrically per group of GROUP consecutive inputs of a row:
 *           w ~= q * scale[row, group], q in [-127, 127]; the fp32 input is multiplied by q
 *           (dequantized on the fly) and each group's partial sum is scaled once.
 * Threads: one OpenMP parallel region per call; the rows of every matrix are split statically
 * among the threads, attention is split over heads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { PREC_F32 = 0, PREC_BF16 = 1, PREC_INT8 = 2 };
#define GROUP 64
#define ROWS_PER_CHUNK 4

typedef struct {
    const void *w;      /* [rows, cols] in the precision's element type */
    const float *scale; /* int8: [rows, ceil(cols / GROUP)]; otherwise NULL */
} Mat;

typedef struct {
    int dim, n_layers, n_heads, head_dim, d_ff, vocab;
    int cache_batch, cache_len; /* KV cache shape (batch, heads, cache_len, head_dim) per layer */
    int prec;
    float eps;
    const float *emb;        /* [vocab, dim] fp32 (row lookup) */
    const float *rope_cos;   /* [max positions, head_dim]: cos_i repeated per pair */
    const float *rope_sin;   /* [max positions, head_dim]: (-sin_i, sin_i) per pair */
    int rope_len;
    const float *final_norm; /* [dim] */
    Mat head;                /* [vocab, dim] */
    const float **attn_norm; /* per layer [dim] */
    const float **ffn_norm;
    const Mat *wq, *wk, *wv, *wo, *w1, *w3, *w2; /* per layer */
    float **k_cache, **v_cache; /* per layer */
} Model;

typedef struct {
    float *x, *xn, *q, *att_out, *hb; /* dim, dim, dim, dim, d_ff */
    float *scores;                    /* n_heads * cache_len */
    uint16_t *xh;                     /* bf16 copy of the current input vector: max(dim, d_ff) */
} Work;

int tslm_abi_version(void) { return 3; }

int tslm_has_avx512(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

int tslm_has_native_bf16(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------------- */
/* bf16 helpers                                                                                   */

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

void tslm_round_bf16(const float *x, uint16_t *out, long n) {
    for (long i = 0; i < n; i++) out[i] = f32_to_bf16(x[i]);
}

/* ---------------------------------------------------------------------------------------------- */
/* dot products: one row against a vector                                                        */

#if defined(__AVX512F__)
static inline __mmask16 tail16(int n) { return (__mmask16)((1u << n) - 1u); }
#endif

static float dot_f32(const float *w, const float *x, int n) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail16(n - i);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + i), _mm512_maskz_loadu_ps(m, x + i), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += w[i] * x[i];
    return s;
#endif
}

static float dot_bf16(const uint16_t *w, const uint16_t *x, int n) {
#if defined(__AVX512BF16__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + i), (__m512bh)_mm512_loadu_si512(w + i));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + i + 32), (__m512bh)_mm512_loadu_si512(w + i + 32));
    }
    for (; i < n; i += 32) {
        int left = n - i;
        __mmask32 m = left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1u);
        __m512i wv = _mm512_maskz_loadu_epi16(m, w + i), xv = _mm512_maskz_loadu_epi16(m, x + i);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)xv, (__m512bh)wv);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += bf16_to_f32(w[i]) * bf16_to_f32(x[i]);
    return s;
#endif
}

/* int8 row (n inputs, groups of GROUP) against an fp32 vector: sum_g scale[g] * sum_{i in g} q[i] x[i] */
static float dot_int8(const int8_t *w, const float *s, const float *x, int n) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (int g0 = 0, g = 0; g0 < n; g0 += GROUP, g++) {
        int end = g0 + GROUP < n ? g0 + GROUP : n;
        __m512 part = _mm512_setzero_ps();
        for (int i = g0; i < end; i += 16) {
            int left = end - i;
            __mmask16 m = left >= 16 ? (__mmask16)0xffff : tail16(left);
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + i)));
            part = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + i), part);
        }
        acc = _mm512_fmadd_ps(part, _mm512_set1_ps(s[g]), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float acc = 0.0f;
    for (int g0 = 0, g = 0; g0 < n; g0 += GROUP, g++) {
        int end = g0 + GROUP < n ? g0 + GROUP : n;
        float part = 0.0f;
        for (int i = g0; i < end; i++) part += (float)w[i] * x[i];
        acc += part * s[g];
    }
    return acc;
#endif
}

/* Rows [r0, r1) of W (rows x n) times the vector: out[r - r0] = W[r] . x, or += when `add`.
 * `x` is fp32; `xh` its bf16 rounding (used by the bf16 precision). One row at a time: a single
 * sequential stream reads faster from memory than several interleaved rows (measured: ~1.7x on the
 * development machine's AMD EPYC for a matrix larger than the caches, and no slower in cache). */
static void rows_times(const Mat *W, int prec, int n, int r0, int r1, const float *x, const uint16_t *xh,
                       float *out, int add) {
    int ng = (n + GROUP - 1) / GROUP;
    for (int r = r0; r < r1; r++) {
        float v;
        if (prec == PREC_F32) v = dot_f32((const float *)W->w + (long)r * n, x, n);
        else if (prec == PREC_BF16) v = dot_bf16((const uint16_t *)W->w + (long)r * n, xh, n);
        else v = dot_int8((const int8_t *)W->w + (long)r * n, W->scale + (long)r * ng, x, n);
        out[r - r0] = add ? out[r - r0] + v : v;
    }
}

/* The chunks of a matrix with `rows` rows, ROWS_PER_CHUNK rows each (the last may be shorter). */
static inline int n_chunks(int rows) { return (rows + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK; }

/* ---------------------------------------------------------------------------------------------- */
/* exp for the softmax: a vector version on AVX-512 (|rel. error| < 2e-7 on the range it is used) */

#if defined(__AVX512F__)
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln2, split in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* p[0..n) = exp(p - max) / sum, in place */
static void softmax_inplace(float *p, int n) {
    float mx = p[0];
    for (int i = 1; i < n; i++) mx = p[i] > mx ? p[i] : mx;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps(), mv = _mm512_set1_ps(mx);
    int i = 0;
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail16(n - i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + i), mv));
        _mm512_mask_storeu_ps(p + i, m, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, e));
    }
    sum = _mm512_reduce_add_ps(acc);
#else
    for (int i = 0; i < n; i++) {
        p[i] = expf(p[i] - mx);
        sum += p[i];
    }
#endif
    float inv = 1.0f / sum;
    for (int i = 0; i < n; i++) p[i] *= inv;
}

/* out = silu(a) * g = a / (1 + exp(-a)) * g */
static void swiglu(float *out, const float *a, const float *g, int n) {
#if defined(__AVX512F__)
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail16(n - i);
        __m512 av = _mm512_maskz_loadu_ps(m, a + i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), av));
        __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_mul_ps(av, sig), _mm512_maskz_loadu_ps(m, g + i)));
    }
#else
    for (int i = 0; i < n; i++) out[i] = (a[i] * (1.0f / (1.0f + expf(-a[i])))) * g[i];
#endif
}

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] * inv) * w[i];
}

/* o[0..hs) = sum_t p[t] * v[t * hs ..]: the attention output of one head (o stays in registers when
 * the head size is a multiple of 16 up to 64) */
static void weighted_values(float *o, const float *p, const float *v, int n, int hs) {
#if defined(__AVX512F__)
    if (hs % 16 == 0 && hs <= 64) {
        int nv = hs / 16;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int t = 0; t < n; t++) {
            __m512 pv = _mm512_set1_ps(p[t]);
            const float *vt = v + (long)t * hs;
            for (int j = 0; j < 4; j++)
                if (j < nv) acc[j] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(vt + 16 * j), acc[j]);
        }
        for (int j = 0; j < nv; j++) _mm512_storeu_ps(o + 16 * j, acc[j]);
        return;
    }
#endif
    for (int i = 0; i < hs; i++) o[i] = 0.0f;
    for (int t = 0; t < n; t++) {
        const float *vt = v + (long)t * hs;
        for (int i = 0; i < hs; i++) o[i] += p[t] * vt[i];
    }
}

/* rotate consecutive pairs: out = x * cos2 + swap_pairs(x) * sin2 (the model's RotaryPositionalEmbedding) */
static void rope(float *v, const float *c, const float *s, int hs) {
    for (int i = 0; i < hs; i += 2) {
        float a = v[i], b = v[i + 1];
        v[i] = a * c[i] + b * s[i];
        v[i + 1] = b * c[i + 1] + a * s[i + 1];
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* one token of one batch row; called by every thread of the enclosing parallel region            */

static void forward_row(const Model *m, const Work *w, int b, int token, int col, int pad, float *logits) {
    const int dim = m->dim, hs = m->head_dim, nh = m->n_heads, dff = m->d_ff, prec = m->prec;
    const int S = m->cache_len;
    const int pos = col - pad; /* this row's position (its first real token sits at column pad) */
    float *x = w->x, *xn = w->xn, *q = w->q;
    const float scale = 1.0f / sqrtf((float)hs);

#pragma omp single
    memcpy(x, m->emb + (long)token * dim, sizeof(float) * dim);

    for (int l = 0; l < m->n_layers; l++) {
        float *kc = m->k_cache[l] + (long)b * nh * S * hs, *vc = m->v_cache[l] + (long)b * nh * S * hs;
#pragma omp single
        {
            rmsnorm(xn, x, m->attn_norm[l], dim, m->eps);
            if (prec == PREC_BF16) tslm_round_bf16(xn, w->xh, dim);
        }
        /* q, k, v: 3 matrices, their row chunks in one loop; k and v rows go straight into the cache */
        int cq = n_chunks(dim);
#pragma omp for schedule(static)
        for (int c = 0; c < 3 * cq; c++) {
            int which = c / cq, r0 = (c % cq) * ROWS_PER_CHUNK;
            int r1 = r0 + ROWS_PER_CHUNK < dim ? r0 + ROWS_PER_CHUNK : dim;
            if (which == 0) {
                rows_times(&m->wq[l], prec, dim, r0, r1, xn, w->xh, q + r0, 0);
            } else {
                float tmp[ROWS_PER_CHUNK];
                rows_times(which == 1 ? &m->wk[l] : &m->wv[l], prec, dim, r0, r1, xn, w->xh, tmp, 0);
                float *dst = which == 1 ? kc : vc;
                for (int r = r0; r < r1; r++) dst[((long)(r / hs) * S + col) * hs + r % hs] = tmp[r - r0];
            }
        }
        /* RoPE, then attention over this row's columns pad..col, one head per iteration */
#pragma omp for schedule(static)
        for (int h = 0; h < nh; h++) {
            const float *c = m->rope_cos + (long)pos * hs, *s = m->rope_sin + (long)pos * hs;
            float *qh = q + h * hs, *kh = kc + (long)h * S * hs, *vh = vc + (long)h * S * hs;
            if (m->rope_cos) {
                rope(qh, c, s, hs);
                rope(kh + (long)col * hs, c, s, hs);
            }
            float *sc = w->scores + (long)h * S;
            int n = col - pad + 1;
            for (int t = 0; t < n; t++) sc[t] = dot_f32(kh + (long)(pad + t) * hs, qh, hs) * scale;
            softmax_inplace(sc, n);
            weighted_values(w->att_out + h * hs, sc, vh + (long)pad * hs, n, hs);
        }
        if (prec == PREC_BF16) {
#pragma omp single
            tslm_round_bf16(w->att_out, w->xh, dim);
        }
        /* output projection, added to the residual stream */
#pragma omp for schedule(static)
        for (int c = 0; c < cq; c++) {
            int r0 = c * ROWS_PER_CHUNK, r1 = r0 + ROWS_PER_CHUNK < dim ? r0 + ROWS_PER_CHUNK : dim;
            rows_times(&m->wo[l], prec, dim, r0, r1, w->att_out, w->xh, x + r0, 1);
        }
#pragma omp single
        {
            rmsnorm(xn, x, m->ffn_norm[l], dim, m->eps);
            if (prec == PREC_BF16) tslm_round_bf16(xn, w->xh, dim);
        }
        /* SwiGLU: hb = silu(w1 xn) * (w3 xn), 16 rows per chunk so that silu runs on whole vectors */
        int cf = (dff + 15) / 16;
#pragma omp for schedule(static)
        for (int c = 0; c < cf; c++) {
            int r0 = c * 16, r1 = r0 + 16 < dff ? r0 + 16 : dff;
            float a[16], g[16];
            rows_times(&m->w1[l], prec, dim, r0, r1, xn, w->xh, a, 0);
            rows_times(&m->w3[l], prec, dim, r0, r1, xn, w->xh, g, 0);
            swiglu(w->hb + r0, a, g, r1 - r0);
        }
        if (prec == PREC_BF16) {
#pragma omp single
            tslm_round_bf16(w->hb, w->xh, dff);
        }
#pragma omp for schedule(static)
        for (int c = 0; c < cq; c++) {
            int r0 = c * ROWS_PER_CHUNK, r1 = r0 + ROWS_PER_CHUNK < dim ? r0 + ROWS_PER_CHUNK : dim;
            rows_times(&m->w2[l], prec, dff, r0, r1, w->hb, w->xh, x + r0, 1);
        }
    }
#pragma omp single
    {
        rmsnorm(xn, x, m->final_norm, dim, m->eps);
        if (prec == PREC_BF16) tslm_round_bf16(xn, w->xh, dim);
    }
    int cv = n_chunks(m->vocab);
#pragma omp for schedule(static)
    for (int c = 0; c < cv; c++) {
        int r0 = c * ROWS_PER_CHUNK, r1 = r0 + ROWS_PER_CHUNK < m->vocab ? r0 + ROWS_PER_CHUNK : m->vocab;
        rows_times(&m->head, prec, dim, r0, r1, xn, w->xh, logits + r0, 0);
    }
}

/* One token per row b < batch: tokens[b] at cache column `col`, row b's padding pad[b] (its
 * position is col - pad[b]). Writes logits[b * vocab ...]. Returns 0, or -1 for arguments out of range. */
int tslm_forward(const Model *m, const Work *w, int batch, const int64_t *tokens, int col, const int64_t *pad,
                 float *logits, int threads) {
    if (batch < 1 || batch > m->cache_batch || col < 0 || col >= m->cache_len) return -1;
    for (int b = 0; b < batch; b++) {
        int p = pad ? (int)pad[b] : 0;
        if (tokens[b] < 0 || tokens[b] >= m->vocab || p < 0 || p > col) return -1;
        if (m->rope_cos && col - p >= m->rope_len) return -1;
    }
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    for (int b = 0; b < batch; b++)
        forward_row(m, w, b, (int)tokens[b], col, pad ? (int)pad[b] : 0, logits + (long)b * m->vocab);
    return 0;
}

static int argmax_row(const float *x, int n) {
    int best = 0;
    float bv = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > bv) bv = x[i], best = i; /* the first of equal maxima, as torch.argmax */
    return best;
}

/* Greedy decoding, n_ids steps per row without returning to the caller: step s takes the argmax
 * of logits[b] over ids < vocab_limit as ids[s * batch + b] and, for s < n_feeds, runs it at
 * column col + s (row b at position col + s - pad[b]), which leaves the next logits in `logits`. */
int tslm_greedy(const Model *m, const Work *w, int batch, int col, const int64_t *pad, float *logits, int threads,
                int n_ids, int n_feeds, int vocab_limit, int64_t *ids) {
    if (batch < 1 || batch > m->cache_batch || col < 0 || n_ids < 1 || n_feeds < 0 || n_feeds > n_ids) return -1;
    if (n_feeds && col + n_feeds - 1 >= m->cache_len) return -1;
    if (vocab_limit < 1 || vocab_limit > m->vocab) return -1;
    for (int b = 0; b < batch; b++) {
        int p = pad ? (int)pad[b] : 0;
        if (p < 0 || p > col) return -1;
        if (n_feeds && m->rope_cos && col + n_feeds - 1 - p >= m->rope_len) return -1;
    }
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    for (int s = 0; s < n_ids; s++) {
#pragma omp single
        for (int b = 0; b < batch; b++) ids[(long)s * batch + b] = argmax_row(logits + (long)b * m->vocab, vocab_limit);
        if (s < n_feeds)
            for (int b = 0; b < batch; b++)
                forward_row(m, w, b, (int)ids[(long)s * batch + b], col + s, pad ? (int)pad[b] : 0,
                            logits + (long)b * m->vocab);
    }
    return 0;
}

/* int8 packing: q[r, i] = round(w[r, i] / scale[r, g]), scale = max |w| over the group / 127 */
void tslm_quantize_int8(const float *w, long rows, int cols, int8_t *q, float *scale) {
    int ng = (cols + GROUP - 1) / GROUP;
    for (long r = 0; r < rows; r++) {
        for (int g = 0; g < ng; g++) {
            int g0 = g * GROUP, g1 = g0 + GROUP < cols ? g0 + GROUP : cols;
            float mx = 0.0f;
            for (int i = g0; i < g1; i++) {
                float a = fabsf(w[r * cols + i]);
                mx = a > mx ? a : mx;
            }
            float s = mx / 127.0f;
            scale[r * ng + g] = s;
            float inv = s > 0.0f ? 1.0f / s : 0.0f;
            for (int i = g0; i < g1; i++) {
                float v = rintf(w[r * cols + i] * inv);
                v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
                q[r * cols + i] = (int8_t)v;
            }
        }
    }
}

int tslm_int8_group(void) { return GROUP; }

/* rows x cols matrix (precision prec) times x: out = W x, threads split the rows (for tests and tools) */
int tslm_matvec(const Mat *W, int prec, int rows, int cols, const float *x, float *out, int threads) {
    if (rows < 1 || cols < 1 || prec < 0 || prec > 2) return -1;
    uint16_t *xh = NULL;
    uint16_t stack[4096];
    if (prec == PREC_BF16) {
        if (cols > 4096) return -1;
        xh = stack;
        tslm_round_bf16(x, xh, cols);
    }
    if (threads < 1) threads = 1;
    int nc = n_chunks(rows);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int c = 0; c < nc; c++) {
        int r0 = c * ROWS_PER_CHUNK, r1 = r0 + ROWS_PER_CHUNK < rows ? r0 + ROWS_PER_CHUNK : rows;
        rows_times(W, prec, cols, r0, r1, x, xh, out + r0, 0);
    }
    return 0;
}
