/* Group-wise (de)quantization of engine/compression.py's packed format in one pass over memory.
 *
 * The torch-op path runs unpack, convert, scale and offset as separate kernels over chunks (~1.3 ns
 * per value on an AVX2 core); this loop reads each code byte once and writes the output once.
 * Bit-equal to that path: fp32 math, the multiply and the add rounded separately (built with
 * -ffp-contract=off, so no FMA), then one round-to-nearest-even conversion to bf16 when asked.
 *
 * Format (see compression.py): codes in (row, in-group) order, cut into blocks of `block_codes`
 * codes held in `block_bytes` bytes; byte j of a block holds codes j, j + W, j + 2W, ... (W =
 * block_bytes) at shifts 0, bits, 2 bits, ... Groups are `group` consecutive codes (inner == 1);
 * meta is fp16 per group: (lo, step), or (step) when symmetric (code offset by 2^(bits-1) - 1).
 */
#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdlib.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);  /* the hardware conversion: exact, like the code below */
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even; values are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One run of `n` codes taken from `src` at `shift`, all in one group, to out[0..n). */
#define RUN_BODY(STORE)                                                         \
    for (int64_t j = 0; j < n; j++) {                                           \
        float v = (float)(((uint32_t)src[j] >> shift) & mask);                  \
        if (sym) { v = v - offset; v = v * step; } else { v = v * step; v = v + lo; } \
        STORE;                                                                  \
    }

static void run_f32(const uint8_t *src, int64_t n, int shift, uint32_t mask, int sym, float offset,
                    float lo, float step, float *out) {
    RUN_BODY(out[j] = v)
}

static void run_bf16(const uint8_t *src, int64_t n, int shift, uint32_t mask, int sym, float offset,
                     float lo, float step, uint16_t *out) {
    RUN_BODY(out[j] = float_to_bf16(v))
}

/* Where code c goes: c itself (ndims == 0), or for codes that form vectors of vec_len values (the
 * innermost axis, contiguous in the output) indexed row-major by dims[0..ndims), the sum of index
 * times stride per axis plus the position in the vector: a dequantization that also transposes. */
static inline int64_t dest_of(int64_t c, int64_t vec_len, int ndims, const int64_t *dims, const int64_t *strides) {
    if (ndims == 0) return c;
    int64_t v = c / vec_len, off = c - v * vec_len;
    for (int a = ndims - 1; a >= 0; a--) {
        int64_t i = v % dims[a];
        v /= dims[a];
        off += i * strides[a];
    }
    return off;
}

/* Dequantize codes [c_begin, c_end) (c_begin a multiple of block_codes) of a tensor whose packed
 * bytes start at `packed` and meta at `meta`. out_kind: 0 = fp32, 1 = bf16. ndims > 0: strided
 * output as in dest_of (vec_len a multiple of group). Returns 0, or -1 on arguments this loop does
 * not handle (the caller then uses the torch-op path). */
static int dequant_runs(const uint8_t *packed, const uint16_t *meta, void *out, int64_t origin, int64_t c_begin,
                        int64_t c_end, int bits, int64_t block_codes, int64_t block_bytes, int64_t group, int symmetric,
                        int out_kind, int64_t vec_len, int ndims, const int64_t *dims, const int64_t *strides);

int fg_dequantize_strided(const uint8_t *packed, const uint16_t *meta, void *out, int64_t c_begin, int64_t c_end,
                          int bits, int64_t block_codes, int64_t block_bytes, int64_t group, int symmetric,
                          int out_kind, int64_t vec_len, int ndims, const int64_t *dims, const int64_t *strides) {
    return dequant_runs(packed, meta, out, 0, c_begin, c_end, bits, block_codes, block_bytes, group, symmetric,
                        out_kind, vec_len, ndims, dims, strides);
}

/* The loop itself; output index of code c: dest_of(c) - origin. */
static int dequant_runs(const uint8_t *packed, const uint16_t *meta, void *out, int64_t origin, int64_t c_begin,
                        int64_t c_end, int bits, int64_t block_codes, int64_t block_bytes, int64_t group, int symmetric,
                        int out_kind, int64_t vec_len, int ndims, const int64_t *dims, const int64_t *strides) {
    if (block_codes != block_bytes * (8 / bits) || (8 % bits) != 0 || c_begin % block_codes || group < 1
            || (ndims > 0 && (vec_len < group || vec_len % group)))
        return -1;
    const uint32_t mask = (1u << bits) - 1u;
    const int per_word = 8 / bits;
    const float offset = (float)((1 << (bits - 1)) - 1);
    const int stride = symmetric ? 1 : 2;
    for (int64_t b0 = c_begin; b0 < c_end; b0 += block_codes) {
        const uint8_t *blk = packed + b0 / block_codes * block_bytes;
        for (int k = 0; k < per_word; k++) {
            int64_t c0 = b0 + k * block_bytes;  /* first code of this field's run */
            int64_t len = block_bytes;
            if (c0 >= c_end) break;
            if (c0 + len > c_end) len = c_end - c0;
            for (int64_t j = 0; j < len;) {  /* split the run at group boundaries (inside one vector) */
                int64_t c = c0 + j, r = c / group;
                int64_t n = (r + 1) * group - c;
                if (n > len - j) n = len - j;
                const uint16_t *m = meta + r * stride;
                float lo = symmetric ? 0.0f : half_to_float(m[0]);
                float step = half_to_float(symmetric ? m[0] : m[1]);
                int64_t d = dest_of(c, vec_len, ndims, dims, strides) - origin;
                if (out_kind == 0)
                    run_f32(blk + j, n, bits * k, mask, symmetric, offset, lo, step, (float *)out + d);
                else
                    run_bf16(blk + j, n, bits * k, mask, symmetric, offset, lo, step, (uint16_t *)out + d);
                j += n;
            }
        }
    }
    return 0;
}

int fg_dequantize(const uint8_t *packed, const uint16_t *meta, void *out, int64_t c_begin, int64_t c_end,
                  int bits, int64_t block_codes, int64_t block_bytes, int64_t group, int symmetric,
                  int out_kind) {
    return fg_dequantize_strided(packed, meta, out, c_begin, c_end, bits, block_codes, block_bytes, group,
                                 symmetric, out_kind, 0, 0, 0, 0);
}

/* ---- quantization (the inverse: compression.quantize's torch-op path, bit for bit) ---------------- */

static inline uint16_t float_to_half(float f) {  /* round to nearest even; |f| <= 65504 here */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x47800000u) return (uint16_t)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (ax < 0x38800000u) {  /* half subnormal or zero: units of 2^-24, exact scaling, one rounding */
        float v;
        memcpy(&v, &ax, 4);
        return (uint16_t)(sign | (uint32_t)rintf(v * 16777216.0f));
    }
    uint32_t half = ((((ax >> 23) - 127 + 15) << 10) | ((ax & 0x7fffffu) >> 13)), rest = ax & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half++;  /* a carry into the exponent is right */
    return (uint16_t)(sign | half);
}

/* An fp16-representable bound of t: >= t (up) or <= t, as compression._fp16_toward computes it. */
static inline float fp16_toward(float t, int up) {
    const float fmax = 65504.0f;
    float c = t > fmax ? fmax : (t < -fmax ? -fmax : t);
    float h = half_to_float(float_to_half(c));
    float ulp = 5.9604644775390625e-08f;  /* 2^-24: the subnormal step, and the step at 0 */
    if (h != 0.0f) {  /* 2^(e-11) for h = m 2^e, m in [0.5, 1): fp32 exponent field minus 10 */
        uint32_t hb, ub;
        memcpy(&hb, &h, 4);
        ub = (((hb >> 23) & 0xffu) - 10u) << 23;  /* h is an fp16 value: field >= 103, no underflow */
        float u;
        memcpy(&u, &ub, 4);
        if (u > ulp) ulp = u;
    }
    int wrong = up ? h < t : h > t;
    float r = wrong ? (up ? h + ulp : h - ulp) : h;
    return r > fmax ? fmax : (r < -fmax ? -fmax : r);
}

#define QCHUNK 4096  /* codes per chunk: its values, codes and packed bytes stay in L1/L2 */

static void load_values(const void *src, int kind, int64_t begin, int64_t n, float *out) {
    if (kind == 1) {  /* bf16: the top half of an fp32 */
        const uint16_t *h = (const uint16_t *)src + begin;
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)h[i] << 16;
            memcpy(out + i, &u, 4);
        }
    } else {
        const uint16_t *h = (const uint16_t *)src + begin;
        for (int64_t i = 0; i < n; i++) out[i] = half_to_float(h[i]);
    }
}

/* min and max of v[0..n): 8 lanes at a time where AVX is there (the compiler does not vectorize
 * this reduction without -ffinite-math-only); lane min(a, b) is a < b ? a : b, as in the scalar tail */
static inline void minmax(const float *v, int64_t n, float *mn_out, float *mx_out) {
    float mn = v[0], mx = v[0];
    int64_t i = 0;
#ifdef __AVX__
    if (n >= 8) {
        __m256 vmn = _mm256_loadu_ps(v), vmx = vmn;
        for (i = 8; i + 8 <= n; i += 8) {
            __m256 x = _mm256_loadu_ps(v + i);
            vmn = _mm256_min_ps(x, vmn);
            vmx = _mm256_max_ps(x, vmx);
        }
        float a[8], b[8];
        _mm256_storeu_ps(a, vmn);
        _mm256_storeu_ps(b, vmx);
        for (int l = 0; l < 8; l++) {
            mn = a[l] < mn ? a[l] : mn;
            mx = b[l] > mx ? b[l] : mx;
        }
    }
#endif
    for (; i < n; i++) {
        mn = v[i] < mn ? v[i] : mn;
        mx = v[i] > mx ? v[i] : mx;
    }
    *mn_out = mn;
    *mx_out = mx;
}

static int64_t gcd64(int64_t a, int64_t b) { while (b) { int64_t t = a % b; a = b; b = t; } return a; }

/* Quantize groups of `group` consecutive values of `src` (fp32 / bf16 / fp16 by src_kind: 0 / 1 / 2)
 * covering codes [c_begin, c_end): c_begin a multiple of both block_codes and group, c_end too unless
 * it is the tensor's end (a whole number of groups). Writes packed blocks (the last one zero-padded)
 * and the fp16 meta of those groups. Returns 0, or -1 on arguments this loop does not handle.
 * Speed: chunks of whole blocks and groups; per group a min/max pass over 8 lanes and a quantize
 * pass, both loops the compiler vectorizes; packing shifts whole runs of codes. */
int fg_quantize(const void *src, int src_kind, uint8_t *packed, uint16_t *meta, int64_t c_begin, int64_t c_end,
                int bits, int64_t block_codes, int64_t block_bytes, int64_t group, int symmetric) {
    if (block_codes != block_bytes * (8 / bits) || (8 % bits) != 0 || group < 1 || c_begin % block_codes
            || c_begin % group || (c_end - c_begin) % group || src_kind < 0 || src_kind > 2)
        return -1;
    const int64_t unit = block_codes / gcd64(block_codes, group) * group;
    const int64_t chunk = QCHUNK / unit * unit;
    if (chunk == 0) return -1;
    const int per_word = 8 / bits;
    const float top = symmetric ? (float)((1 << (bits - 1)) - 1) : (float)((1 << bits) - 1);
    const float qmin = symmetric ? -top : 0.0f;
    float vals[QCHUNK];
    uint8_t codes[QCHUNK + 256];
    for (int64_t c0 = c_begin; c0 < c_end; c0 += chunk) {
        int64_t n = c_end - c0 < chunk ? c_end - c0 : chunk;
        const float *x = (const float *)src + c0;  /* fp32 is read in place */
        if (src_kind != 0) {
            load_values(src, src_kind, c0, n, vals);
            x = vals;
        }
        for (int64_t g0 = 0; g0 < n; g0 += group) {
            const float *v = x + g0;
            float mn, mx;
            minmax(v, group, &mn, &mx);
            int64_t r = (c0 + g0) / group;
            float lo = 0.0f, step;
            if (symmetric) {
                float am = fabsf(mn) > fabsf(mx) ? fabsf(mn) : fabsf(mx);
                step = fp16_toward(am / top, 1);
                meta[r] = float_to_half(step);
            } else {
                lo = fp16_toward(mn, 0);
                step = fp16_toward((mx - lo) / top, 1);
                meta[2 * r] = float_to_half(lo);
                meta[2 * r + 1] = float_to_half(step);
            }
            const float inv = step > 0.0f ? 1.0f / step : 0.0f;
            const float shift = symmetric ? top : 0.0f;
            uint8_t *q = codes + g0;
            for (int64_t j = 0; j < group; j++) {  /* (x - lo) * inv, rounded half to even, clamped */
                float t = rintf((v[j] - lo) * inv);
                t = t < qmin ? qmin : (t > top ? top : t);
                q[j] = (uint8_t)(int32_t)(t + shift);
            }
        }
        int64_t nblocks = (n + block_codes - 1) / block_codes;
        for (int64_t j = n; j < nblocks * block_codes; j++) codes[j] = 0;
        uint8_t *out = packed + c0 / block_codes * block_bytes;
        for (int64_t b = 0; b < nblocks; b++) {
            const uint8_t *cb = codes + b * block_codes;
            uint8_t *ob = out + b * block_bytes;
            if (per_word == 2) {  /* 4 bits: the common case, a constant shift vectorizes */
                for (int64_t j = 0; j < block_bytes; j++) ob[j] = (uint8_t)(cb[j] | (cb[j + block_bytes] << 4));
            } else {
                for (int64_t j = 0; j < block_bytes; j++) ob[j] = cb[j];
                for (int k = 1; k < per_word; k++)
                    for (int64_t j = 0; j < block_bytes; j++)
                        ob[j] |= (uint8_t)(cb[j + k * block_bytes] << (bits * k));
            }
        }
    }
    return 0;
}

/* ---- decode attention read straight from a compressed KV prefix ----------------------------------- */

static inline float load_one(const void *src, int kind, int64_t i) {  /* kind 0 fp32, 1 bf16 */
    if (kind == 0) return ((const float *)src)[i];
    uint32_t u = (uint32_t)((const uint16_t *)src)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float round_to(float v, int kind) {  /* the value as the compute dtype holds it */
    if (kind == 1) {
        uint32_t u = (uint32_t)float_to_bf16(v) << 16;
        memcpy(&v, &u, 4);
    }
    return v;
}

/* sum a[t] b[t] in 16 independent lanes (a sequential sum is one long chain of dependent adds: the
 * compiler may not reorder it without -ffast-math, and it ran ~8x slower) */
static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t t = 0;
    for (; t + 16 <= n; t += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[t + l] * b[t + l];
    for (; t < n; t++) acc[0] += a[t] * b[t];
    for (int w = 8; w >= 1; w /= 2)  /* a tree: 4 dependent adds instead of 15 in a row */
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* The 64 4-bit codes starting at code c (a multiple of 64) as floats: in a 128-code block the first
 * 64 codes are the low nibbles of its 64 bytes and the next 64 the high nibbles. */
static inline void codes64(const uint8_t *packed, int64_t c, float *out) {
    const uint8_t *src = packed + (c >> 7) * 64;
    const int shift = (int)((c >> 6) & 1) * 4;
    for (int t = 0; t < 64; t++) out[t] = (float)((src[t] >> shift) & 15);
}

#if defined(__AVX2__) && defined(__FMA__)
/* codes [8 j, 8 j + 8) of the 64 at src (low nibbles, or high when `high`) as floats */
static inline __m256 codes8_v(const uint8_t *src, int high, int j) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + 8 * j)));
    return _mm256_cvtepi32_ps(high ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15)));
}

static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* What the attention passes read, 64 values per position and group: 4-bit codes (the low or high
 * nibbles of 64 bytes of a 128-code block), or fp32 / bf16 rows. */
enum { SRC_CODES4 = 0, SRC_F32 = 1, SRC_BF16 = 2 };

/* values [8 j, 8 j + 8) of position i's 64, at base + i * stride (bytes for codes, else elements) as
 * floats. sk is a constant wherever this is inlined, so the branches fold away. */
static inline __attribute__((always_inline)) __m256 src8(const void *base, int sk, int high, int64_t stride,
                                                         int64_t i, int j) {
    if (sk == SRC_CODES4) return codes8_v((const uint8_t *)base + i * stride, high, j);
    if (sk == SRC_F32) return _mm256_loadu_ps((const float *)base + i * stride + 8 * j);
    return bf16x8((const uint16_t *)base + i * stride + 8 * j);
}

#define FG_ATTEND_V 1
#endif

#ifdef FG_ATTEND_V
/* The values' sum of HB query heads over one 64-value group, CJ 8-value runs (from run j0) at a time:
 * out[h][8 (j0 + j) + t] = sum over positions i in [i0, n) of wts[h * ws + i] * value(i)[8 (j0 + j) + t]
 * (src8). HB x CJ <= 8 accumulators stay in registers across all positions, and each value is loaded
 * (a code widened) once for all HB heads. sk, HB and CJ are constants at every call site
 * (always_inline), so the loops unroll. */
static inline __attribute__((always_inline)) void values_tile(const void *base, int sk, int high, int64_t stride,
                                                              const float *wts, int64_t ws, int64_t i0, int64_t n,
                                                              int HB, int CJ, int j0, float *out, int64_t os) {
    __m256 a[8];
    for (int k = 0; k < HB * CJ; k++) a[k] = _mm256_setzero_ps();
    for (int64_t i = i0; i < n; i++) {
        for (int j = 0; j < CJ; j++) {
            const __m256 cv = src8(base, sk, high, stride, i, j0 + j);
            for (int h = 0; h < HB; h++)
                a[h * CJ + j] = _mm256_fmadd_ps(cv, _mm256_broadcast_ss(wts + h * ws + i), a[h * CJ + j]);
        }
    }
    for (int h = 0; h < HB; h++)
        for (int j = 0; j < CJ; j++) _mm256_storeu_ps(out + h * os + 8 * (j0 + j), a[h * CJ + j]);
}

/* values_tile over all 8 runs of the group for hb (1..8) heads: as many runs per pass as registers allow */
static inline __attribute__((always_inline)) void values_group_k(const void *base, int sk, int high, int64_t stride,
                                                                 const float *wts, int64_t ws, int64_t i0, int64_t n,
                                                                 int hb, float *out, int64_t os) {
#define FG_VT(HB, CJ) \
    for (int j0 = 0; j0 < 8; j0 += CJ) values_tile(base, sk, high, stride, wts, ws, i0, n, HB, CJ, j0, out, os)
    switch (hb) {
    case 1: FG_VT(1, 8); break;
    case 2: FG_VT(2, 4); break;
    case 3: FG_VT(3, 2); break;
    case 4: FG_VT(4, 2); break;
    case 5: FG_VT(5, 1); break;
    case 6: FG_VT(6, 1); break;
    case 7: FG_VT(7, 1); break;
    default: FG_VT(8, 1); break;
    }
#undef FG_VT
}

static void values_group(const void *base, int sk, int high, int64_t stride, const float *wts, int64_t ws,
                         int64_t i0, int64_t n, int hb, float *out, int64_t os) {
    if (sk == SRC_CODES4) values_group_k(base, SRC_CODES4, high, stride, wts, ws, i0, n, hb, out, os);
    else if (sk == SRC_F32) values_group_k(base, SRC_F32, high, stride, wts, ws, i0, n, hb, out, os);
    else values_group_k(base, SRC_BF16, high, stride, wts, ws, i0, n, hb, out, os);
}
#endif

#ifdef FG_ATTEND_V
/* The 4 horizontal sums of a0..a3 as one 4-lane vector (3 hadds for 4 sums, not 3 shuffles and adds each) */
static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* The keys' pass over one 64-value group of one (batch row, KV head) pair for positions [i0, n):
 * dots[h * ws + i] = q_h . value(i) (src8) for the gq query heads at q (stride D). Speed: 4 positions at
 * a time, their sums reduced together (hsum4); each head's 64 query values stay in registers across
 * positions; with one query head the values are loaded (codes widened) straight into the
 * multiply-adds, with several once into a 1 KB buffer that every head reads. */
static inline __attribute__((always_inline)) void keys_group_k(const void *base, int sk, int high, int64_t stride,
                                                               const float *q, int64_t D, int64_t gq, int64_t i0,
                                                               int64_t n, float *dots, int64_t ws) {
    int64_t i = i0;
    if (gq == 1) {
        __m256 qr[8];
        for (int j = 0; j < 8; j++) qr[j] = _mm256_loadu_ps(q + 8 * j);
        for (; i + 4 <= n; i += 4) {
            __m256 a[4];
            for (int t = 0; t < 4; t++) {
                a[t] = _mm256_mul_ps(src8(base, sk, high, stride, i + t, 0), qr[0]);
                for (int j = 1; j < 8; j++) a[t] = _mm256_fmadd_ps(src8(base, sk, high, stride, i + t, j), qr[j], a[t]);
            }
            _mm_storeu_ps(dots + i, hsum4(a[0], a[1], a[2], a[3]));
        }
    } else {
        __m256 cb[4][8];
        for (; i + 4 <= n; i += 4) {
            for (int t = 0; t < 4; t++)
                for (int j = 0; j < 8; j++) cb[t][j] = src8(base, sk, high, stride, i + t, j);
            for (int64_t h = 0; h < gq; h++) {
                const float *qh = q + h * D;
                __m256 a[4];
                for (int t = 0; t < 4; t++) a[t] = _mm256_mul_ps(cb[t][0], _mm256_loadu_ps(qh));
                for (int j = 1; j < 8; j++) {
                    const __m256 qj = _mm256_loadu_ps(qh + 8 * j);
                    for (int t = 0; t < 4; t++) a[t] = _mm256_fmadd_ps(cb[t][j], qj, a[t]);
                }
                _mm_storeu_ps(dots + h * ws + i, hsum4(a[0], a[1], a[2], a[3]));
            }
        }
    }
    for (; i < n; i++)  /* the last (n - i0) mod 4 positions, one at a time */
        for (int64_t h = 0; h < gq; h++) {
            __m256 a = _mm256_setzero_ps();
            for (int j = 0; j < 8; j++) a = _mm256_fmadd_ps(src8(base, sk, high, stride, i, j), _mm256_loadu_ps(q + h * D + 8 * j), a);
            dots[h * ws + i] = _mm_cvtss_f32(hsum4(a, a, a, a));
        }
}

static void keys_group(const void *base, int sk, int high, int64_t stride, const float *q, int64_t D, int64_t gq,
                       int64_t i0, int64_t n, float *dots, int64_t ws) {
    if (sk == SRC_CODES4) keys_group_k(base, SRC_CODES4, high, stride, q, D, gq, i0, n, dots, ws);
    else if (sk == SRC_F32) keys_group_k(base, SRC_F32, high, stride, q, D, gq, i0, n, dots, ws);
    else keys_group_k(base, SRC_BF16, high, stride, q, D, gq, i0, n, dots, ws);
}
#endif

#ifdef FG_ATTEND_V
/* e^x for x <= 0 (or -inf), 8 at a time: e^x = 2^k e^r with k = round(x / ln 2), |r| <= ln(2) / 2, e^r by
 * Cephes' degree-6 polynomial (within ~2 ulp of expf); x below -87 (where expf is subnormal) gives 0, so
 * masked positions (-inf) weigh exactly nothing. */
static inline __m256 exp_nonpositive_v(__m256 x) {
    const __m256 floor = _mm256_set1_ps(-87.0f), valid = _mm256_cmp_ps(x, floor, _CMP_GE_OQ);
    x = _mm256_max_ps(x, floor);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);  /* ln 2 in two parts: r stays exact */
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(two_k)), valid);
}
#endif

/* sc[0..len) = softmax(scale * sc); masked positions hold -inf and get 0; at least one is not masked.
 * Speed: vectorized where AVX2 is (glibc's scalar expf took ~20% of a decode attention call). */
static void softmax_scaled(float *sc, int64_t len, float scale) {
    float mx = -INFINITY, sum = 0.0f;
    int64_t i = 0;
#ifdef FG_ATTEND_V
    __m256 mv = _mm256_set1_ps(-INFINITY), sv = _mm256_setzero_ps();
    for (; i + 8 <= len; i += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(sc + i), _mm256_set1_ps(scale));  /* -inf stays -inf */
        _mm256_storeu_ps(sc + i, v);
        mv = _mm256_max_ps(mv, v);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (int l = 0; l < 8; l++) mx = lanes[l] > mx ? lanes[l] : mx;
#endif
    for (; i < len; i++) {
        sc[i] *= scale;
        mx = sc[i] > mx ? sc[i] : mx;
    }
    i = 0;
#ifdef FG_ATTEND_V
    for (; i + 8 <= len; i += 8) {
        const __m256 e = exp_nonpositive_v(_mm256_sub_ps(_mm256_loadu_ps(sc + i), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(sc + i, e);
        sv = _mm256_add_ps(sv, e);
    }
    _mm256_storeu_ps(lanes, sv);
    for (int l = 0; l < 8; l++) sum += lanes[l];
#endif
    for (; i < len; i++) {
        sc[i] = sc[i] == -INFINITY ? 0.0f : expf(sc[i] - mx);
        sum += sc[i];
    }
    for (i = 0; i < len; i++) sc[i] /= sum;
}

/* The first attended position before `end` (end if none): what precedes it is left padding or
 * positions before a window, which the pair-by-pair passes skip. */
static inline int64_t first_allowed(const uint8_t *ok, int64_t end) {
    int64_t i = 0;
    while (i < end && !ok[i]) i++;
    return i;
}

/* Piece t of `pieces` over `items` (B x H pairs), cut at multiples of `unit`: [*b, *e). */
static inline void piece_range(int64_t items, int64_t unit, int t, int pieces, int64_t *b, int64_t *e) {
    const int64_t units = (items + unit - 1) / unit;
    *b = units * t / pieces * unit;
    *e = units * (t + 1) / pieces * unit;
    *e = *e < items ? *e : items;
}

/* One decode step of attention for the (batch row, KV head) pairs [p_begin, p_end) of B x H, every
 * query head of a pair's group at once (GQA: Hq = H x gq). The cache holds positions [0, n) of an
 * (n, 2, B, H, D) tensor in compression.py's packed format; the new token's key and value (B, H, D)
 * come dense, at position n. q and out: (B, Hq, D); allowed: (B, n + 1) bytes, 1 = attend (padding
 * and window applied by the caller; position n must be allowed). kind: 0 fp32, 1 bf16 (q, new K/V,
 * out). Cached values, scores, softmax and sums in fp32 (cached values are not rounded to bf16 as a
 * dequantized bf16 copy would be: slightly more precise). Needs p_begin x D and B x H x D to be
 * multiples of block_codes, so each position's keys (values) of the pairs are one aligned run.
 * Speed: 4-bit codes are 0.28x the bytes of a bf16 cache and are read from memory once, never stored
 * dequantized. With 4-bit groups of 64 (and AVX2) the scale and offset leave the inner loops:
 * q.k = sum over groups of step * (q . codes) + lo * sum(q), and the values' sum likewise, so each
 * code costs one widening and a multiply-add per query head, pair by pair (keys_group, values_group);
 * other formats, or no AVX2, take the position-major loop, which dequantizes one run per position. */
int fg_attend_compressed(const uint8_t *packed, const uint16_t *meta, int64_t n, int64_t B, int64_t H, int64_t Hq,
                         int64_t D, int bits, int64_t block_codes, int64_t block_bytes, int64_t group, int symmetric,
                         const void *q, const void *new_k, const void *new_v, const uint8_t *allowed, void *out,
                         int kind, float scale, int64_t p_begin, int64_t p_end) {
    const int64_t P = p_end - p_begin, gq = H > 0 ? Hq / H : 0, BHD = B * H * D;
    if (block_codes != block_bytes * (8 / bits) || (8 % bits) != 0 || group < 1 || D % group || Hq % H
            || kind < 0 || kind > 1 || (p_begin * D) % block_codes || BHD % block_codes || P < 1)
        return -1;
    const int fast = bits == 4 && group == 64 && block_codes == 128;
    const int64_t W = P * gq, G = D / group;  /* query vectors handled here; groups per vector */
    const float offset = (float)((1 << (bits - 1)) - 1);
    float *qv = malloc(sizeof(float) * (size_t)(2 * W * D + W * (n + 1) + P * D + 2 * W * G + (gq + 2) * n + 64));
    if (!qv) return -1;
    float *acc = qv + W * D, *scores = acc + W * D, *kv = scores + W * (n + 1);
    float *qsum = kv + P * D, *cst = qsum + W * G;  /* per (query, group): sum of q; the values' offsets */
#ifdef FG_ATTEND_V
    float *vstep = cst + W * G, *vlo = vstep + n, *wts = vlo + n;  /* one pair's group: scales, offsets, dots */
#endif
    for (int64_t w = 0; w < W; w++) {
        for (int64_t t = 0; t < D; t++) {
            qv[w * D + t] = load_one(q, kind, (p_begin * gq + w) * D + t);
            acc[w * D + t] = 0.0f;
        }
        for (int64_t r = 0; r < G; r++) {
            float sq = 0.0f;
            for (int64_t t = 0; t < group; t++) sq += qv[w * D + r * group + t];
            qsum[w * G + r] = sq;
            cst[w * G + r] = 0.0f;
        }
    }
    for (int part = 0; part < 2; part++) {  /* 0: scores from the keys; 1: weighted sum of the values */
        int64_t first = 0;  /* the position the position-major loop below starts from */
#ifdef FG_ATTEND_V
        if (part == 0 && fast) {
            /* Speed: the cached keys pair by pair and group by group (keys_group), then per-position scales
             * and offsets: score = sum over groups of step * (q . codes) + lo * sum(q). The new token's
             * key is left to the loop below (first = n). */
            for (int64_t p = 0; p < P; p++) {
                const int64_t pair = p_begin + p, bi = pair / H;
                const uint8_t *ok = allowed + bi * (n + 1);
                float *sp = scores + p * gq * (n + 1);
                const int64_t i0 = first_allowed(ok, n);
                for (int64_t i = 0; i < gq * (n + 1); i++) sp[i] = 0.0f;
                for (int64_t r = 0; r < G; r++) {
                    const int64_t c0 = pair * D + r * 64;  /* position 0's first key code */
                    const float *qp = qv + p * gq * D + r * 64;
                    keys_group(packed + (c0 >> 7) * 64, SRC_CODES4, (int)((c0 >> 6) & 1), BHD, qp, D, gq, i0, n, wts, n);
                    for (int64_t i = i0; i < n; i++) {
                        const uint16_t *m = meta + ((c0 + i * 2 * BHD) / 64) * (symmetric ? 1 : 2);
                        const float step = half_to_float(symmetric ? m[0] : m[1]);
                        const float lo = symmetric ? -offset * step : half_to_float(m[0]);
                        for (int64_t g = 0; g < gq; g++)
                            sp[g * (n + 1) + i] += step * wts[g * n + i] + lo * qsum[(p * gq + g) * G + r];
                    }
                }
                for (int64_t i = 0; i < n; i++)
                    if (!ok[i])
                        for (int64_t g = 0; g < gq; g++) sp[g * (n + 1) + i] = -INFINITY;
            }
            first = n;
        }
        if (part == 1 && fast) {
            /* Speed: the values' pass pair by pair and group by group, the output in registers across all
             * positions (values_group; the position-major loop below loads and stores it once per
             * position, which bounds it by stores), each code widened once for all of the pair's query
             * heads. The group's scales and offsets are read once into `step`/`lo` and folded into
             * per-head weights, so the inner loop is a widen and one multiply-add per head. */
            for (int64_t p = 0; p < P; p++) {
                const int64_t pair = p_begin + p, bi = pair / H;
                const uint8_t *ok = allowed + bi * (n + 1);
                const int64_t i0 = first_allowed(ok, n);
                for (int64_t r = 0; r < G; r++) {
                    const int64_t c0 = BHD + pair * D + r * 64;  /* position 0's first value code */
                    for (int64_t i = i0; i < n; i++) {
                        const uint16_t *m = meta + ((c0 + i * 2 * BHD) / 64) * (symmetric ? 1 : 2);
                        vstep[i] = half_to_float(symmetric ? m[0] : m[1]);
                        vlo[i] = symmetric ? -offset * vstep[i] : half_to_float(m[0]);
                    }
                    for (int64_t g = 0; g < gq; g++) {  /* disallowed positions have weight 0 after softmax */
                        const float *sc = scores + (p * gq + g) * (n + 1);
                        float cs = 0.0f;
                        for (int64_t i = i0; i < n; i++) {
                            wts[g * n + i] = sc[i] * vstep[i];
                            cs += sc[i] * vlo[i];
                        }
                        cst[(p * gq + g) * G + r] += cs;
                    }
                    for (int64_t g = 0; g < gq; g += 8)
                        values_group(packed + (c0 >> 7) * 64, SRC_CODES4, (int)((c0 >> 6) & 1), BHD, wts + g * n, n, i0, n,
                                     (int)(gq - g < 8 ? gq - g : 8), acc + (p * gq + g) * D + r * 64, D);
                }
                if (ok[n])  /* the new token's value, dense */
                    for (int64_t g = 0; g < gq; g++) {
                        const float pw = scores[(p * gq + g) * (n + 1) + n];
                        for (int64_t t = 0; t < D; t++) acc[(p * gq + g) * D + t] += pw * load_one(new_v, kind, pair * D + t);
                    }
            }
            continue;
        }
#endif
        for (int64_t i = first; i <= n; i++) {
            const int cached = i < n, direct = cached && fast;
            int64_t c0 = i * 2 * BHD + part * BHD + p_begin * D;
            if (cached && !fast) {
                if (dequant_runs(packed, meta, kv, c0, c0, c0 + P * D, bits, block_codes, block_bytes, group,
                                 symmetric, 0, 0, 0, 0, 0)) {
                    free(qv);
                    return -1;
                }
            } else if (!cached) {
                const void *src = part ? new_v : new_k;
                for (int64_t t = 0; t < P * D; t++) kv[t] = load_one(src, kind, p_begin * D + t);
            }
            int64_t bi = p_begin / H, hh = p_begin % H;  /* batch row of pair p: no division per pair */
            for (int64_t p = 0; p < P; p++, hh = hh + 1 == H ? (bi++, 0) : hh + 1) {
                int ok = allowed[bi * (n + 1) + i];
                if (!ok) {
                    if (part == 0)
                        for (int64_t g = 0; g < gq; g++) scores[(p * gq + g) * (n + 1) + i] = -INFINITY;
                    continue;
                }
                float codes[64];
                for (int64_t r = 0; r < (direct ? G : 1); r++) {
                    float lo = 0.0f, step = 1.0f;
                    const float *v = kv + p * D;
                    if (direct) {  /* one group of 64 codes and its (lo, step) */
                        int64_t c = c0 + p * D + r * 64;
                        const uint16_t *m = meta + (c / 64) * (symmetric ? 1 : 2);
                        step = half_to_float(symmetric ? m[0] : m[1]);
                        lo = symmetric ? -offset * step : half_to_float(m[0]);
                        codes64(packed, c, codes);  /* without AVX2 (with it, the passes above) */
                        v = codes;
                    }
                    const int64_t len = direct ? 64 : D, off = direct ? r * 64 : 0;
                    for (int64_t g = 0; g < gq; g++) {
                        int64_t w = p * gq + g;
                        if (part == 0) {
                            float d = dot(qv + w * D + off, v, len);
                            float sc = direct ? step * d + lo * qsum[w * G + r] : d;
                            scores[w * (n + 1) + i] = (r ? scores[w * (n + 1) + i] : 0.0f) + sc;
                        } else {
                            float pw = scores[w * (n + 1) + i];
                            float a = direct ? pw * step : pw;
                            float *dst = acc + w * D + off;
                            for (int64_t t = 0; t < len; t++) dst[t] += a * v[t];
                            if (direct) cst[w * G + r] += pw * lo;
                        }
                    }
                }
            }
        }
        if (part == 0)
            for (int64_t w = 0; w < W; w++) softmax_scaled(scores + w * (n + 1), n + 1, scale);
    }
    for (int64_t w = 0; w < W; w++)
        for (int64_t t = 0; t < D; t++) {
            int64_t o = (p_begin * gq + w) * D + t;
            float v = acc[w * D + t] + cst[w * G + t / group];
            if (kind == 0) ((float *)out)[o] = v;
            else ((uint16_t *)out)[o] = float_to_bf16(v);
        }
    free(qv);
    return 0;
}

/* fg_attend_compressed over all B x H pairs in `threads` pieces of whole `unit`s of pairs. Speed: on
 * torch's OpenMP pool (see fg_int4_matmul), not Python threads that contend with its spinning workers
 * (a decode call took ~1.5 ms in the engine against ~1 ms alone). */
int fg_attend_compressed_mt(const uint8_t *packed, const uint16_t *meta, int64_t n, int64_t B, int64_t H,
                            int64_t Hq, int64_t D, int bits, int64_t block_codes, int64_t block_bytes, int64_t group,
                            int symmetric, const void *q, const void *new_k, const void *new_v,
                            const uint8_t *allowed, void *out, int kind, float scale, int64_t unit, int threads) {
    const int64_t pairs = B * H, units = (pairs + unit - 1) / unit;
    const int pieces = threads < units ? threads : (int)units;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(pieces) if (pieces > 1) reduction(|:failed)
#endif
    for (int t = 0; t < pieces; t++) {
        int64_t b, e;
        piece_range(pairs, unit, t, pieces, &b, &e);
        if (b < e)
            failed |= fg_attend_compressed(packed, meta, n, B, H, Hq, D, bits, block_codes, block_bytes, group,
                                           symmetric, q, new_k, new_v, allowed, out, kind, scale, b, e) != 0;
    }
    return failed ? -1 : 0;
}

/* One decode step of attention over a dense cache for the (batch row, KV head) pairs [p_begin, p_end)
 * of B x H, every query head of a pair's group at once (GQA: Hq = H x gq). Keys and values of pair
 * (b, h) are n rows of D contiguous values at k + b * sb + h * sh (v likewise; the new token's row
 * already written at n - 1); q and out: (B, Hq, D); allowed: (B, n) bytes, 1 = attend (padding and
 * window applied by the caller; at least one position per row). kind: 0 fp32, 1 bf16 (everything).
 * Scores, softmax and sums in fp32, the output rounded once. Needs AVX2 + FMA and D a multiple of 64.
 * Speed: torch's SDPA takes 0.27-0.62 ns per cached value in fp32 on a 2-core AVX2 CPU (one small
 * matmul per (row, head), a generic GQA path), 0.8-2.9 in bf16 where bf16 is emulated; this reads each
 * value once, pair by pair, with the passes of the compressed cache (keys_group, values_group). */
int fg_attend_dense(const void *k, const void *v, int64_t sb, int64_t sh, int64_t n, int64_t B, int64_t H,
                    int64_t Hq, int64_t D, const void *q, const uint8_t *allowed, void *out, int kind, float scale,
                    int64_t p_begin, int64_t p_end) {
#ifdef FG_ATTEND_V
    const int64_t P = p_end - p_begin, gq = H > 0 ? Hq / H : 0, G = D / 64, W = P * gq;
    if (H < 1 || Hq % H || D % 64 || kind < 0 || kind > 1 || P < 1 || n < 1 || p_end > B * H)
        return -1;
    const int sk = kind ? SRC_BF16 : SRC_F32;
    const size_t es = kind ? 2 : 4;
    float *qv = malloc(sizeof(float) * (size_t)(2 * W * D + W * n + gq * n + 64));
    if (!qv) return -1;
    float *acc = qv + W * D, *scores = acc + W * D, *dots = scores + W * n;
    for (int64_t t = 0; t < W * D; t++) qv[t] = load_one(q, kind, p_begin * gq * D + t);
    for (int64_t p = 0; p < P; p++) {
        const int64_t pair = p_begin + p, bi = pair / H, hh = pair % H;
        const uint8_t *ok = allowed + bi * n;
        const char *kp = (const char *)k + (bi * sb + hh * sh) * es, *vp = (const char *)v + (bi * sb + hh * sh) * es;
        float *sp = scores + p * gq * n;
        const int64_t i0 = first_allowed(ok, n - 1);  /* the new token, at n - 1, is attended */
        /* the first group's dots are the scores (positions before i0 are masked below), later ones add */
        keys_group(kp, sk, 0, D, qv + p * gq * D, D, gq, i0, n, sp, n);
        for (int64_t r = 1; r < G; r++) {
            keys_group(kp + r * 64 * es, sk, 0, D, qv + p * gq * D + r * 64, D, gq, i0, n, dots, n);
            for (int64_t g = 0; g < gq; g++)
                for (int64_t i = i0; i < n; i++) sp[g * n + i] += dots[g * n + i];
        }
        for (int64_t g = 0; g < gq; g++) {
            for (int64_t i = 0; i < n; i++)
                if (!ok[i]) sp[g * n + i] = -INFINITY;
            softmax_scaled(sp + g * n, n, scale);
        }
        for (int64_t r = 0; r < G; r++)
            for (int64_t g = 0; g < gq; g += 8)
                values_group(vp + r * 64 * es, sk, 0, D, sp + g * n, n, i0, n, (int)(gq - g < 8 ? gq - g : 8),
                             acc + (p * gq + g) * D + r * 64, D);
    }
    for (int64_t t = 0; t < W * D; t++) {
        const int64_t o = p_begin * gq * D + t;
        if (kind == 0) ((float *)out)[o] = acc[t];
        else ((uint16_t *)out)[o] = float_to_bf16(acc[t]);
    }
    free(qv);
    return 0;
#else
    (void)k; (void)v; (void)sb; (void)sh; (void)n; (void)B; (void)H; (void)Hq; (void)D; (void)q; (void)allowed;
    (void)out; (void)kind; (void)scale; (void)p_begin; (void)p_end;
    return -1;  /* no vector path here: the caller runs SDPA */
#endif
}

/* fg_attend_dense over all B x H pairs in `threads` pieces, on torch's OpenMP pool */
int fg_attend_dense_mt(const void *k, const void *v, int64_t sb, int64_t sh, int64_t n, int64_t B, int64_t H,
                       int64_t Hq, int64_t D, const void *q, const uint8_t *allowed, void *out, int kind, float scale,
                       int threads) {
    const int64_t pairs = B * H;
    const int pieces = threads < pairs ? threads : (int)pairs;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(pieces) if (pieces > 1) reduction(|:failed)
#endif
    for (int t = 0; t < pieces; t++) {
        int64_t b, e;
        piece_range(pairs, 1, t, pieces, &b, &e);
        if (b < e)
            failed |= fg_attend_dense(k, v, sb, sh, n, B, H, Hq, D, q, allowed, out, kind, scale, b, e) != 0;
    }
    return failed ? -1 : 0;
}

/* ---- y = x @ w.T straight from 4-bit weights ---------------------------------------------------
 * w (N, K): 4-bit asymmetric codes of compression.py's format with groups of `group` (a multiple of
 * 64) along K, K a multiple of 128, stored in S = K / ks slices of ks values (compression.int4_k_slice;
 * S = 1 for most shapes): slice s of row n owns the ks / 2 bytes at packed + (s N + n) ks / 2 and its
 * (lo, step) pairs at meta + 2 (s N + n) ks / group. x (M, K) fp32, y (M, N) fp32 with row stride
 * ldy; this call computes output columns [n_begin, n_end) of the N. Slices: a tile's activations
 * stay in L1 and each slice's codes stream in order (one row, 1.26-1.30x whole rows from K 8192).
 * Speed: a decode step multiplies 1-16 rows by each weight, where the matmul is bound by reading
 * the weights; torch's fused CPU kernel runs ~11 G weights/s on 2 AVX2 cores at one row, about
 * what dense bf16 reaches from memory. Here each weight is read once as a nibble, widened and
 * dequantized in registers (w = q * step + lo, one multiply-add per 8 weights, shared by all rows)
 * and multiplied into up to 4 rows of x at once; independent accumulators per row hide the
 * multiply-add latency. fp32 throughout: activations in bf16 are widened once per call. */
#if defined(__AVX2__) && defined(__FMA__)
static inline __attribute__((always_inline)) void int4_row_tile(
        const uint8_t *prow, const float *mrow, const float *x, int64_t K, int64_t ldx, int mr, float *out) {
    const __m256i m15 = _mm256_set1_epi32(15);
    const int na = mr <= 2 ? 4 : 2;  /* accumulators per row: enough independent chains to hide latency */
    __m256 acc[4][4];
    for (int r = 0; r < mr; r++)
        for (int a = 0; a < na; a++) acc[r][a] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 128) {  /* one 64-byte block: codes k0.. (low), k0 + 64.. (high) */
        const uint8_t *blk = prow + k0 / 2;
        const float *mA = mrow + k0 / 32, *mB = mA + 2;  /* (lo, step) of codes k0.. and k0 + 64.. */
        const __m256 loA = _mm256_set1_ps(mA[0]), stA = _mm256_set1_ps(mA[1]);
        const __m256 loB = _mm256_set1_ps(mB[0]), stB = _mm256_set1_ps(mB[1]);
        for (int j = 0; j < 64; j += 16)
            for (int h = 0; h < 2; h++) {  /* two 8-code steps, into separate accumulators when na == 4 */
                const int a = na == 4 ? 2 * h : 0;
                __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + j + 8 * h)));
                __m256 wa = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c, m15)), stA, loA);
                __m256 wb = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4)), stB, loB);
                const float *xa = x + k0 + j + 8 * h;
                for (int r = 0; r < mr; r++) {
                    acc[r][a] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(xa + r * ldx), acc[r][a]);
                    acc[r][a + 1] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(xa + r * ldx + 64), acc[r][a + 1]);
                }
            }
    }
    for (int r = 0; r < mr; r++) {
        __m256 s = _mm256_add_ps(acc[r][0], acc[r][1]);
        if (na == 4) s = _mm256_add_ps(s, _mm256_add_ps(acc[r][2], acc[r][3]));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[r] = _mm_cvtss_f32(h);
    }
}
#else
static inline void int4_row_tile(const uint8_t *prow, const float *mrow, const float *x, int64_t K, int64_t ldx,
                                 int mr, float *out) {
    for (int r = 0; r < mr; r++) {
        float acc[16] = {0};  /* independent lanes, as in dot() */
        for (int64_t k0 = 0; k0 < K; k0 += 128) {
            const uint8_t *blk = prow + k0 / 2;
            const float *mA = mrow + k0 / 32, *mB = mA + 2;
            for (int j = 0; j < 64; j++) {
                float wa = (float)(blk[j] & 15) * mA[1] + mA[0];
                float wb = (float)(blk[j] >> 4) * mB[1] + mB[0];
                acc[j & 15] += wa * x[r * ldx + k0 + j] + wb * x[r * ldx + k0 + 64 + j];
            }
        }
        float s = 0.0f;
        for (int l = 0; l < 16; l++) s += acc[l];
        out[r] = s;
    }
}
#endif

/* Row n's (lo, step) pairs as fp32, one pair per 64 codes (groups of 64 * per codes repeat theirs).
 * Speed: at one activation row this runs once per K weights; converted one half at a time it took
 * about as long as the row's multiply-adds. F16C converts 8 per instruction: one row went from 11 to
 * 21 GFLOP/s per Zen 3 core (8192 x 2048, g64). */
static void meta_row(const uint16_t *m, int64_t G, int64_t per, float *mrow) {
    int64_t i = 0;
#ifdef __F16C__
    if (per == 1)
        for (; i + 8 <= 2 * G; i += 8)
            _mm256_storeu_ps(mrow + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + i))));
#endif
    for (int64_t g = i / 2; g < G; g++)  /* no division in the inner loops */
        for (int64_t t = 0; t < per; t++) {
            mrow[2 * (g * per + t)] = half_to_float(m[2 * g]);
            mrow[2 * (g * per + t) + 1] = half_to_float(m[2 * g + 1]);
        }
}

static int bad_slices(int64_t K, int64_t group, int64_t ks) {
    return K % 128 || group % 64 || K % group || ks < 1 || K % ks || ks % 128 || ks % group;
}

/* Weight row n (over parts stacked along N, part p of rows[p] rows) in slice s: the part (*p) and the
 * row of its slice-major layout. Call with n rising: *p and *base (part p's first row) carry on. */
static inline int64_t slice_row(const int64_t *rows, int parts, int64_t n, int64_t s, int *p, int64_t *base) {
    while (*p < parts - 1 && n >= *base + rows[*p]) *base += rows[(*p)++];
    return s * rows[*p] + n - *base;
}

int fg_int4_matmul(const uint8_t *packed, const uint16_t *meta, const float *x, float *y, int64_t M, int64_t K,
                   int64_t N, int64_t ldy, int64_t group, int64_t ks, int64_t n_begin, int64_t n_end, int threads) {
    if (bad_slices(K, group, ks) || M < 1 || n_end > N) return -1;
    const int64_t S = K / ks, Gs = ks / group, per = group / 64;
    int failed = 0;
    /* Speed: OpenMP, so the work runs on torch's own thread pool (the process has one libgomp:
     * torch's) instead of Python threads that would contend with its idle-spinning workers. Weight
     * rows in blocks of NB (codes in L2) reused by every tile of 4 activation rows, as in the loops
     * below. */
    enum { NB = 32 };
    const int64_t nblocks = (n_end - n_begin + NB - 1) / NB;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && M * (n_end - n_begin) * K >= (1 << 20))
#endif
    {
        float *mrow = malloc(sizeof(float) * (size_t)(ks / 32));  /* (lo, step) per 64 codes, as fp32 */
        if (!mrow) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(guided)  /* as in fg_int4_matmul_x16: one row 1.01-1.12x, 4 rows 0.99-1.05x */
#endif
        for (int64_t b = 0; b < nblocks; b++) {
            if (!mrow) continue;
            const int64_t nb0 = n_begin + b * NB, nb1 = nb0 + NB < n_end ? nb0 + NB : n_end;
            for (int64_t m = 0; m < M; m += 4) {
                const int64_t mr = M - m < 4 ? M - m : 4;
                float acc[NB][4];  /* [n - nb0][r]: sums over the slices */
                for (int64_t s = 0; s < S; s++)
                    for (int64_t n = nb0; n < nb1; n++) {
                        const int64_t row = s * N + n;  /* slice_row of a single part */
                        const uint8_t *prow = packed + row * (ks / 2);
                        const float *xs = x + m * K + s * ks;
                        float out[4];
                        meta_row(meta + row * Gs * 2, Gs, per, mrow);
                        switch (mr) {  /* constant tile heights: the accumulators stay in registers */
                            case 1: int4_row_tile(prow, mrow, xs, ks, K, 1, out); break;
                            case 2: int4_row_tile(prow, mrow, xs, ks, K, 2, out); break;
                            case 3: int4_row_tile(prow, mrow, xs, ks, K, 3, out); break;
                            default: int4_row_tile(prow, mrow, xs, ks, K, 4, out); break;
                        }
                        for (int64_t r = 0; r < mr; r++) acc[n - nb0][r] = s ? acc[n - nb0][r] + out[r] : out[r];
                    }
                for (int64_t n = nb0; n < nb1; n++)
                    for (int64_t r = 0; r < mr; r++) y[(m + r) * ldy + n] = acc[n - nb0][r];
            }
        }
        free(mrow);
    }
    return failed ? -1 : 0;
}

/* ---- the same product with the activations in 16-bit fixed point, for bf16 activations ----------
 * Speed: the loop above is bound by instructions at one row (a widen, a convert and a multiply-add
 * per 8 weights before the row's own multiply-add: ~55 GFLOP/s on 2 Zen 3 cores, while the weights
 * would stream at ~100). Here the codes stay integers: a 32-byte load holds 64 codes, four shift/and
 * steps give them as 16-bit lanes, and vpmaddwd multiplies 16 of them by 16 activations and adds
 * pairs, so the weight side costs ~1.6 instructions per 8 weights. Per 64-code group, w = q step + lo
 * gives sum x w = step sum(x q) + lo sum(x); sum(x q) is exact in int32 (|X q| <= 15 * 32767 over
 * 64 codes) and in fp32 after the convert (< 2^24).
 * Numerics: each row's activations are scaled per 64 values by a power of two, 2^(15 - e) with
 * max |x| < 2^e, and rounded to int16. A bf16 value within a factor 128 of its group's largest is
 * exact there (8 significant bits); smaller ones move by at most 2^(e - 16), 1/256 of the bf16
 * rounding step of the largest value. sum(x) is taken from the exact values. */
#if defined(__AVX2__) && defined(__FMA__)
#define FG_INT4_X16 1  /* this build has fg_int4_matmul_x16's loop */
/* 16 int32 values (two vectors, natural order) -> as int16: the 8 even ones, then the 8 odd ones */
static inline __m128i split_even_odd(__m256i a, __m256i b, int odd) {
    const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  /* evens to the low half */
    const __m256i pa = _mm256_permutevar8x32_epi32(a, idx), pb = _mm256_permutevar8x32_epi32(b, idx);
    const __m256i e = odd ? _mm256_permute2x128_si256(pa, pb, 0x31) : _mm256_permute2x128_si256(pa, pb, 0x20);
    return _mm_packs_epi32(_mm256_castsi256_si128(e), _mm256_extracti128_si256(e, 1));
}

static void int16_rows(const uint16_t *x, int64_t M, int64_t K, int16_t *xq, float *xc) {
    /* xq: each 128-value block of a row permuted to the order the codes' 16-bit lanes come in (for
     * half h of the block: values 2i, 2i+1 of low chunk A, then of high chunk B, i < 16).
     * xc: per 64 values the pair (sum of x, scale), to meet meta's (lo, step) pairs in one multiply.
     * Speed: vectorized, as it runs once per matmul call on one thread (scalar: 14 us at K = 2048,
     * a tenth of a decode step's 2048 x 2048 product). */
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t r = 0; r < M; r++)
        for (int64_t c = 0; c < K / 64; c++) {
            __m256 v[8], mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
            for (int i = 0; i < 8; i++) {
                v[i] = bf16x8(x + r * K + c * 64 + 8 * i);
                mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absmask));
                sum = _mm256_add_ps(sum, v[i]);
            }
            float m8[8], s8[8], m = 0.0f, t = 0.0f;
            _mm256_storeu_ps(m8, mx);
            _mm256_storeu_ps(s8, sum);
            for (int i = 0; i < 8; i++) { m = m8[i] > m ? m8[i] : m; t += s8[i]; }
            int e = 0;
            frexpf(m, &e);  /* m < 2^e */
            xc[2 * (r * (K / 64) + c)] = t;
            xc[2 * (r * (K / 64) + c) + 1] = m > 0.0f ? ldexpf(1.0f, e - 15) : 0.0f;
            const __m256 up = _mm256_set1_ps(m > 0.0f ? ldexpf(1.0f, 15 - e) : 0.0f);
            __m256i q[8];  /* round to nearest even (the default mode); |q| <= 32640 for bf16 input */
            for (int i = 0; i < 8; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], up));
            /* chunk c is chunk A (c even) or B (c odd) of block c / 2 */
            int16_t *blk = xq + r * K + (c / 2) * 128 + ((c & 1) ? 32 : 0);
            for (int h = 0; h < 2; h++)  /* values 32 h .. 32 h + 31 go to half h of the block */
                for (int odd = 0; odd < 2; odd++) {
                    _mm_storeu_si128((__m128i *)(blk + h * 64 + odd * 16), split_even_odd(q[4 * h], q[4 * h + 1], odd));
                    _mm_storeu_si128((__m128i *)(blk + h * 64 + odd * 16 + 8),
                                     split_even_odd(q[4 * h + 2], q[4 * h + 3], odd));
                }
        }
}

/* pr = mrow * xc for mr rows (C chunks each, xc's rows ldc floats apart): (lo sum(x), step scale) per
 * chunk; returns per row the sum of the
 * lo sum(x) terms. Speed: once per weight row and tile, so the block loop below multiplies each
 * chunk's integer dot by one broadcast value instead of forming it (2 of ~11 operations per chunk). */
static inline __attribute__((always_inline)) void chunk_factors(const float *mrow, const float *xc, int64_t C,
                                                                int64_t ldc, int mr, float *pr, float *lo_out) {
    const __m256 even = _mm256_castsi256_ps(_mm256_set_epi32(0, -1, 0, -1, 0, -1, 0, -1));
    for (int r = 0; r < mr; r++) {
        __m256 lo = _mm256_setzero_ps();
        int64_t g = 0;
        for (; g + 8 <= 2 * C; g += 8) {
            const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(mrow + g), _mm256_loadu_ps(xc + r * ldc + g));
            _mm256_storeu_ps(pr + r * 2 * C + g, p);
            lo = _mm256_add_ps(lo, _mm256_and_ps(p, even));
        }
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1));
        if (g < 2 * C) {  /* 2C is a multiple of 4 */
            const __m128 p = _mm_mul_ps(_mm_loadu_ps(mrow + g), _mm_loadu_ps(xc + r * ldc + g));
            _mm_storeu_ps(pr + r * 2 * C + g, p);
            h = _mm_add_ps(h, _mm_and_ps(p, _mm256_castps256_ps128(even)));
        }
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        lo_out[r] = _mm_cvtss_f32(h);
    }
}

/* Activation rows per tile. Speed: each weight row's codes are unpacked once per tile. With AVX2's
 * 16 vector registers tiles of 3 or 4 rows spilled (4: 15% slower than 2 on Zen 3). AVX-512 builds
 * have 32: on 2 Zen 4 cores (8192 x 2048, alternating in one run) tiles of 4 ran 1.12x tiles of 2 at
 * 4 rows and 1.17-1.21x at 8-48; tiles of 8 ran 0.75-0.9x tiles of 4. */
#ifdef __AVX512VL__
#define X16_TILE 4
#else
#define X16_TILE 2
#endif
/* acc + a0 . x0 + a1 . x1 over 16-bit pairs (vpmaddwd's products and pair sums, no saturation), with
 * VNNI's vpdpwssd (multiply and accumulate in one instruction, 8 of the one-row tile's ~34 vector
 * operations per 128 codes fewer; same integer sums) where `vnni` and the build has it.
 * Speed, 2 Zen 4 cores, alternating builds in one run, weights cycled from memory: one row
 * 0.94-1.07x, mostly 1.02-1.07x (codes in cache 1.02-1.09x); 3 rows 0.88-1.12x (median ~0.93x), so
 * the tiles of 2-4 rows keep vpmaddwd (an earlier session measured 0.85x at 2 rows). */
static inline __attribute__((always_inline)) __m256i dot2_acc(__m256i acc, __m256i a0, __m256i x0, __m256i a1,
                                                              __m256i x1, int vnni) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    if (vnni) return _mm256_dpwssd_epi32(_mm256_dpwssd_epi32(acc, a0, x0), a1, x1);
#elif defined(__AVXVNNI__)
    if (vnni) return _mm256_dpwssd_avx_epi32(_mm256_dpwssd_avx_epi32(acc, a0, x0), a1, x1);
#endif
    (void)vnni;
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(a0, x0), _mm256_madd_epi16(a1, x1)));
}

static inline __attribute__((always_inline)) void int4_x16_tile(
        const uint8_t *prow, const float *pr, const float *lo, const int16_t *xq, int64_t K, int64_t ldx, int mr,
        float *out) {
    const __m256i m15 = _mm256_set1_epi16(15);
    const int64_t C2 = K / 32;  /* floats per row of pr */
    __m256 fa[X16_TILE], fb[X16_TILE];
    for (int r = 0; r < mr; r++) fa[r] = fb[r] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 128)
        /* low nibbles (chunk A), then high (chunk B): half the integer accumulators live at once */
        for (int part = 0; part < 2; part++) {
            __m256i ia[X16_TILE];
            for (int r = 0; r < mr; r++) ia[r] = _mm256_setzero_si256();
            for (int h = 0; h < 2; h++) {
                const __m256i c = _mm256_loadu_si256((const __m256i *)(prow + k0 / 2 + 32 * h));
                const __m256i a0 = _mm256_and_si256(part ? _mm256_srli_epi16(c, 4) : c, m15);
                const __m256i a1 = part ? _mm256_srli_epi16(c, 12) : _mm256_and_si256(_mm256_srli_epi16(c, 8), m15);
                for (int r = 0; r < mr; r++) {
                    const __m256i *xp = (const __m256i *)(xq + r * ldx + k0 + 64 * h) + 2 * part;
                    ia[r] = dot2_acc(ia[r], a0, _mm256_loadu_si256(xp), a1, _mm256_loadu_si256(xp + 1), mr == 1);
                }
            }
            const int64_t g = k0 / 64 + part;
            for (int r = 0; r < mr; r++) {  /* two chains per row, A and B */
                __m256 *f = part ? &fb[r] : &fa[r];
                *f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[r]), _mm256_broadcast_ss(pr + r * C2 + 2 * g + 1), *f);
            }
        }
    for (int r = 0; r < mr; r++) {
        __m256 s = _mm256_add_ps(fa[r], fb[r]);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[r] = _mm_cvtss_f32(h) + lo[r];
    }
}
#else
#define FG_INT4_X16 0
#endif

int fg_int4_x16(void) { return FG_INT4_X16; }

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define FG_INT4_DQ 1  /* this build has int4_dq_matmul */
/* Rows from which int4_dq_matmul beats the loop below. GFLOP/s loop vs it, 2 Zen 4 cores, weights
 * cycled from memory (8192 x 2048, 2048 x 8192, 6144 x 2048): 4 rows 140-180 vs 121-125, 6 rows
 * 146-155 vs 153-158, 8 rows 149-191 vs 183-194, 16: 161-194 vs 255-269, 32: 170-202 vs 319-329,
 * 64: 156-205 vs 365-369, 256: 134-213 vs 406-411. */
#define INT4_DQ_MIN_ROWS 8
static int int4_dq_matmul(const uint8_t *const *packed, const uint16_t *const *meta, const int64_t *rows, int parts,
                          const uint16_t *x, uint16_t *y, int64_t M, int64_t K, int64_t ldy, int64_t group,
                          int64_t ks, int64_t n_begin, int64_t n_end, int threads);
#else
#define FG_INT4_DQ 0
#endif

/* rows from which fg_int4_matmul_x16 takes int4_dq_matmul; 0 where this build has no such path */
int fg_int4_dq_min_rows(void) {
#if FG_INT4_X16 && FG_INT4_DQ
    return INT4_DQ_MIN_ROWS;
#else
    return 0;
#endif
}

/* Weights given in `parts` pieces stacked along N (part p: its own packed codes and meta, rows[p] rows),
 * e.g. q, k and v: one call, one activation prep and one thread split for all of them.
 * 0 when done, 1 when this build has no such loop (see fg_int4_x16), -1 on bad shapes or memory. */
int fg_int4_matmul_x16(const uint8_t *const *packed, const uint16_t *const *meta, const int64_t *rows, int parts,
                       const uint16_t *x, uint16_t *y, int64_t M, int64_t K, int64_t ldy, int64_t group,
                       int64_t ks, int64_t n_begin, int64_t n_end, int threads) {
#if FG_INT4_X16
    if (bad_slices(K, group, ks) || M < 1) return -1;
#if FG_INT4_DQ
    if (M >= INT4_DQ_MIN_ROWS)
        return int4_dq_matmul(packed, meta, rows, parts, x, y, M, K, ldy, group, ks, n_begin, n_end, threads);
#endif
    const int64_t S = K / ks, Gs = ks / group, per = group / 64, C2 = K / 32, Cs = ks / 64;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(M * K));
    float *xc = malloc(sizeof(float) * (size_t)(M * C2));
    int failed = !xq || !xc;
    if (!failed) int16_rows(x, M, K, xq, xc);
    /* Speed: weight rows in blocks of NB, each block's codes (NB K / 2 bytes) reused from L2 by every
     * tile of activation rows, which stays in L1; row by row over all tiles, the M rows' 2 M K bytes
     * were re-read from L2 for every weight row (16 rows: 11% slower). With K in slices (see
     * fg_int4_matmul), each slice's activations (2 X16_TILE ks bytes) stay in L1 for all the block's
     * rows and each slice's codes stream in order. */
    enum { NB = 32 };
    const int64_t nblocks = (n_end - n_begin + NB - 1) / NB;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && M * (n_end - n_begin) * K >= (1 << 20))
#endif
    {
        /* per thread: the row's (lo, step) pairs, then a tile's chunk factors */
        float *mrow = failed ? NULL : malloc(sizeof(float) * (size_t)((1 + X16_TILE) * 2 * Cs));
        if (!mrow) failed = 1;
#ifdef _OPENMP
        /* Speed: guided, not static: each thread first takes a long run of blocks (its codes stream in
         * order), then ever shorter ones, so a thread slowed by its neighbours leaves the last blocks
         * to the other. Timed inside the call, static halves finished 3-23% apart (median per shape;
         * a VM's two vCPUs do not run at one speed). 2 Zen 4 cores, alternating builds, weights
         * cycled from memory: one row 0.98-1.20x (mean ~1.04x over 21 shape runs), 2 rows
         * 1.01-1.17x, 4 rows 0.99-1.05x. */
#pragma omp for schedule(guided)
#endif
        for (int64_t b = 0; b < nblocks; b++) {
            if (!mrow) continue;
            const int64_t nb0 = n_begin + b * NB, nb1 = nb0 + NB < n_end ? nb0 + NB : n_end;
            float *pr = mrow + 2 * Cs;
            for (int64_t m = 0; m < M; m += X16_TILE) {
                const int64_t mr = M - m < X16_TILE ? M - m : X16_TILE;
                const int16_t *xm = xq + m * K;
                const float *cm = xc + m * C2;
                float acc[NB][X16_TILE];  /* [n - nb0][r]: sums over the slices */
                for (int64_t s = 0; s < S; s++) {
                    const int16_t *xs = xm + s * ks;
                    const float *cs = cm + s * 2 * Cs;
                    int p = 0;
                    int64_t base = 0;  /* first row of part p */
                    for (int64_t n = nb0; n < nb1; n++) {
                        const int64_t row = slice_row(rows, parts, n, s, &p, &base);
                        const uint8_t *prow = packed[p] + row * (ks / 2);
                        float out[X16_TILE], lo[X16_TILE];
                        meta_row(meta[p] + row * Gs * 2, Gs, per, mrow);
                        switch (mr) {  /* constant tile heights: the accumulators stay in registers */
                            case 1: chunk_factors(mrow, cs, Cs, C2, 1, pr, lo); int4_x16_tile(prow, pr, lo, xs, ks, K, 1, out); break;
                            case 2: chunk_factors(mrow, cs, Cs, C2, 2, pr, lo); int4_x16_tile(prow, pr, lo, xs, ks, K, 2, out); break;
#if X16_TILE > 2
                            case 3: chunk_factors(mrow, cs, Cs, C2, 3, pr, lo); int4_x16_tile(prow, pr, lo, xs, ks, K, 3, out); break;
                            default: chunk_factors(mrow, cs, Cs, C2, 4, pr, lo); int4_x16_tile(prow, pr, lo, xs, ks, K, 4, out); break;
#endif
                        }
                        for (int64_t r = 0; r < mr; r++) acc[n - nb0][r] = s ? acc[n - nb0][r] + out[r] : out[r];
                    }
                }
                for (int64_t n = nb0; n < nb1; n++)
                    for (int64_t r = 0; r < mr; r++) y[(m + r) * ldy + n] = float_to_bf16(acc[n - nb0][r]);
            }
        }
        free(mrow);
    }
    free(xq);
    free(xc);
    return failed ? -1 : 0;
#else
    (void)packed; (void)meta; (void)rows; (void)parts; (void)x; (void)y; (void)M; (void)K; (void)ldy; (void)group;
    (void)ks; (void)n_begin; (void)n_end; (void)threads;
    return 1;
#endif
}

/* ---- y = x @ w.T from bf16 weights, for CPUs that multiply bf16 only in emulation ---------------
 * w (N, K) bf16 with K a multiple of 32, x (M, K) fp32, y (M, N) fp32 with row stride ldy; this call
 * computes output columns [n_begin, n_end).
 * Speed: without AVX512-BF16 or AMX, torch's bf16 matmul runs ~10 GFLOP/s per core at every row
 * count. A bf16 value widens to fp32 by a 16-bit shift, so here each weight is read once as bf16
 * (half fp32's bytes: decode steps are bound by reading weights), widened in registers and
 * multiplied into up to 4 rows of x at once, as in the 4-bit loop above. For many rows the caller
 * widens the weight once and runs torch's fp32 matmul instead (kernels.bf16_matmul). */
#if defined(__AVX2__) && defined(__FMA__)
static inline __attribute__((always_inline)) void bf16_row_tile(const uint16_t *wrow, const float *x, int64_t K,
                                                                 int mr, float *out) {
    const int na = mr <= 2 ? 4 : 2;  /* accumulators per row: enough independent chains to hide latency */
    __m256 acc[4][4];
    for (int r = 0; r < mr; r++)
        for (int a = 0; a < na; a++) acc[r][a] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32)
        for (int h = 0; h < 4; h++) {
            const __m256 w = bf16x8(wrow + k + 8 * h);
            const int a = h % na;
            for (int r = 0; r < mr; r++)
                acc[r][a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * K + k + 8 * h), acc[r][a]);
        }
    for (int r = 0; r < mr; r++) {
        __m256 s = _mm256_add_ps(acc[r][0], acc[r][1]);
        if (na == 4) s = _mm256_add_ps(s, _mm256_add_ps(acc[r][2], acc[r][3]));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[r] = _mm_cvtss_f32(h);
    }
}
#else
static inline void bf16_row_tile(const uint16_t *wrow, const float *x, int64_t K, int mr, float *out) {
    for (int r = 0; r < mr; r++) {
        float acc[16] = {0};  /* independent lanes, as in dot() */
        for (int64_t k = 0; k < K; k++) {
            uint32_t bits = (uint32_t)wrow[k] << 16;
            float w;
            memcpy(&w, &bits, sizeof w);
            acc[k & 15] += w * x[r * K + k];
        }
        float s = 0.0f;
        for (int l = 0; l < 16; l++) s += acc[l];
        out[r] = s;
    }
}
#endif

/* ---- y = x @ w.T, all bf16, for CPUs that multiply bf16 in hardware (AVX512-BF16, no AMX) --------
 * w (N, K) bf16 with K a multiple of 32, x (M, K) bf16, y (M, N) bf16 (row stride ldy), rounded once
 * from fp32 sums; this call computes output columns [n_begin, n_end).
 * Speed: torch's bf16 matmul reaches its best rate only from ~48 rows; below, a decode step's
 * product runs at 0.2-0.6x of it (2 Zen 4 cores, 8192 x 2048: 16 rows 203-213 GFLOP/s, 4 rows 77-82).
 * Here vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 sums per instruction, on tiles of 4
 * activation rows by 4 weight rows (16 accumulators in registers, 8 loads per 16 multiply-adds),
 * weight rows in blocks of 16 (in L2) reused by every row tile: 16 rows 240-247, 4 rows 92-128
 * GFLOP/s on that box (tiles of 4 x 6, 6 x 4 and 8 x 3: within noise).
 * Each product pair is exact in fp32, so results differ from torch's only in summation order. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define FG_BF16_DP 1  /* this build has fg_bf16_matmul_dp's loop */
/* sums[r][c] = x row r . w row c over K values: mr activation rows (ldx apart) by nr weight rows (ldw
 * apart), the tile both bf16-block loops share */
static inline __attribute__((always_inline)) void bf16dp_sums(const uint16_t *w, int64_t ldw, const uint16_t *x,
                                                               int64_t ldx, int64_t K, int mr, int nr,
                                                               float sums[4][4]) {
    __m512 acc[4][4];
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nr; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv[4];
        for (int c = 0; c < nr; c++) wv[c] = (__m512bh)_mm512_loadu_si512(w + c * ldw + k);
        for (int r = 0; r < mr; r++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * ldx + k);
            for (int c = 0; c < nr; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nr; c++) sums[r][c] = _mm512_reduce_add_ps(acc[r][c]);
}

static inline __attribute__((always_inline)) void bf16dp_tile(const uint16_t *w, const uint16_t *x, int64_t K,
                                                               int mr, int nr, uint16_t *y, int64_t ldy) {
    float sums[4][4];
    bf16dp_sums(w, K, x, K, K, mr, nr, sums);
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nr; c++) y[r * ldy + c] = float_to_bf16(sums[r][c]);
}

/* constant tile shapes: the accumulators stay in registers */
#define BF16DP_ROWS(NR)                                                   \
    switch (mr) {                                                         \
        case 1: bf16dp_tile(wr, xr, K, 1, NR, yr, ldy); break;            \
        case 2: bf16dp_tile(wr, xr, K, 2, NR, yr, ldy); break;            \
        case 3: bf16dp_tile(wr, xr, K, 3, NR, yr, ldy); break;            \
        default: bf16dp_tile(wr, xr, K, 4, NR, yr, ldy); break;           \
    }

/* weight rows [nb0, nb1) against activation rows [m, m + mr), nr weight rows per tile */
static __attribute__((noinline)) void bf16dp_block(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t K,
                                                   int64_t ldy, int64_t nb0, int64_t nb1, int64_t m, int64_t mr,
                                                   int64_t nr) {
    for (int64_t n = nb0; n < nb1; n += nr) {
        const uint16_t *wr = w + n * K, *xr = x + m * K;
        uint16_t *yr = y + m * ldy + n;
        switch (nb1 - n < nr ? nb1 - n : nr) {
            case 1: BF16DP_ROWS(1) break;
            case 2: BF16DP_ROWS(2) break;
            case 3: BF16DP_ROWS(3) break;
            default: BF16DP_ROWS(4) break;
        }
    }
}
#else
#define FG_BF16_DP 0
#endif

int fg_bf16_dp(void) { return FG_BF16_DP; }

/* the widening loop's share of bf16_blocks: weight rows [nb0, nb1) against activation rows [m, m + mr) */
static __attribute__((noinline)) void bf16_widen_block(const uint16_t *w, const float *x, float *y, int64_t K,
                                                       int64_t ldy, int64_t nb0, int64_t nb1, int64_t m, int64_t mr) {
    for (int64_t n = nb0; n < nb1; n++) {
        float out[4];
        switch (mr) {  /* constant tile heights: the accumulators stay in registers */
            case 1: bf16_row_tile(w + n * K, x + m * K, K, 1, out); break;
            case 2: bf16_row_tile(w + n * K, x + m * K, K, 2, out); break;
            case 3: bf16_row_tile(w + n * K, x + m * K, K, 3, out); break;
            default: bf16_row_tile(w + n * K, x + m * K, K, 4, out); break;
        }
        for (int64_t r = 0; r < mr; r++) y[(m + r) * ldy + n] = out[r];
    }
}

/* One schedule for both bf16 loops: weight rows in blocks of NB (NB K 2 bytes, in L2) reused by every
 * tile of 4 activation rows, which stays in L1/L2, the blocks split across threads. Speed: row by row
 * over all tiles, the M rows' 4 M K bytes were re-read for every weight row: 1.2x at 8 rows, 1.3x at
 * 16, 1.5x at 48 (the widening loop, 8192 x 2048, 2 Zen 3 cores). dp: bf16 x and y through
 * vdpbf16ps (only where FG_BF16_DP), else fp32 x and y through the widening loop. */
static int bf16_blocks(const uint16_t *w, const void *x, void *y, int64_t M, int64_t K, int64_t ldy,
                       int64_t n_begin, int64_t n_end, int threads, int dp) {
    if (dp && !FG_BF16_DP) return 1;
    if (K % 32 || M < 1) return -1;
    const int64_t NB = 16, nblocks = (n_end - n_begin + NB - 1) / NB;
    (void)threads;
#ifdef _OPENMP
/* Speed: guided, as in fg_int4_matmul_x16 (alternating builds, weights from memory: one row
 * 0.94-1.31x, mostly 1.01-1.09x over 12 shape runs; 4 and 16 rows 0.97-1.09x) */
#pragma omp parallel for schedule(guided) num_threads(threads) \
    if (threads > 1 && M * (n_end - n_begin) * K >= (1 << 20))
#endif
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t nb0 = n_begin + b * NB, nb1 = nb0 + NB < n_end ? nb0 + NB : n_end;
        for (int64_t m = 0; m < M; m += 4) {
            const int64_t mr = M - m < 4 ? M - m : 4;
            /* Speed: each kind's tiles in a function of its own; inlined into one loop nest they
             * ran 0.83-0.9x at 16-32 rows (vdpbf16ps, 2 Zen 4 cores) */
#if FG_BF16_DP
            if (dp) {
                /* Speed: while the activations fit in half of L1 (M K <= 8192 values), one weight row
                 * at a time: a single sequential stream per thread, which the prefetcher follows (8192 x
                 * 2048, 2 rows 62-100 vs 52-71 GFLOP/s with 4 weight rows interleaved, 4 rows 99-130 vs
                 * 103-119); beyond, tiles of 4 weight rows reuse each activation load (K 8192, 4 rows:
                 * 106 vs 71 one row at a time). */
                bf16dp_block(w, x, y, K, ldy, nb0, nb1, m, mr, M * K <= 8192 ? 1 : 4);
                continue;
            }
#endif
            bf16_widen_block(w, x, y, K, ldy, nb0, nb1, m, mr);
        }
    }
    return 0;
}

int fg_bf16_matmul(const uint16_t *w, const float *x, float *y, int64_t M, int64_t K, int64_t ldy,
                   int64_t n_begin, int64_t n_end, int threads) {
    return bf16_blocks(w, x, y, M, K, ldy, n_begin, n_end, threads, 0);
}

/* 0 when done, 1 when this build has no such loop (see fg_bf16_dp), -1 on bad shapes. */
int fg_bf16_matmul_dp(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t M, int64_t K, int64_t ldy,
                      int64_t n_begin, int64_t n_end, int threads) {
    return bf16_blocks(w, x, y, M, K, ldy, n_begin, n_end, threads, 1);
}

/* ---- y = x @ w.T from 4-bit weights through bf16 blocks, for several rows on AVX512-BF16 ----------
 * The same weights, activations and output as fg_int4_matmul_x16. Speed: from a few rows on, the
 * 16-bit loop's integer multiply-adds (16 products and an add per instruction pair) cap it at
 * ~150-210 GFLOP/s on 2 Zen 4 cores, while vdpbf16ps does 32 products per instruction. So each
 * block of NB weight rows (one K slice of them) is dequantized once into a per-thread bf16 buffer
 * (NB ks 2 bytes, in L2), at ~0.05 ns per weight, and multiplied into all the rows by the tiles of
 * fg_bf16_matmul_dp's loop, with fp32 sums carried across the slices. The weights are rounded to
 * bf16 once (as the dequantize-then-multiply path does); activations and sums are as in that loop.
 * Rows in chunks of MC, so the activations of a chunk stay in cache: each chunk dequantizes the
 * weights again, ~2% of a 512-row product. */
#if FG_INT4_DQ
/* ks codes of one row slice -> bf16: v = q step + lo in fp32 (two roundings, as fg_dequantize), then
 * rounded to bf16 (vcvtne2ps2bf16: nearest even) */
static inline void dq_row_bf16(const uint8_t *p, const uint16_t *m, int64_t ks, int64_t group, uint16_t *out) {
    const __m512i m15 = _mm512_set1_epi8(15);
    for (int64_t k0 = 0; k0 < ks; k0 += 128) {  /* one 64-byte block: codes k0.. (low), k0 + 64.. (high) */
        const __m512i c = _mm512_loadu_si512((const void *)(p + k0 / 2));
        for (int part = 0; part < 2; part++) {
            const __m512i q8 = _mm512_and_si512(part ? _mm512_srli_epi16(c, 4) : c, m15);
            const int64_t g = (k0 + 64 * part) / group;
            const __m512 lo = _mm512_set1_ps(half_to_float(m[2 * g])), st = _mm512_set1_ps(half_to_float(m[2 * g + 1]));
            __m512 v[4];
            for (int q = 0; q < 4; q++) {
                const __m512i qi = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q8, q));
                v[q] = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(qi), st), lo);
            }
            _mm512_storeu_si512((void *)(out + k0 + 64 * part), (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
            _mm512_storeu_si512((void *)(out + k0 + 64 * part + 32), (__m512i)_mm512_cvtne2ps_pbh(v[3], v[2]));
        }
    }
}

/* mr activation rows (ldx apart) x nr weight rows (ldw apart) over K values, added into acc (lda
 * apart; overwritten when first) */
static inline __attribute__((always_inline)) void dq_tile(const uint16_t *w, int64_t ldw, const uint16_t *x,
                                                          int64_t ldx, int64_t K, int mr, int nr, float *acc,
                                                          int64_t lda, int first) {
    float sums[4][4];
    bf16dp_sums(w, ldw, x, ldx, K, mr, nr, sums);
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nr; c++) acc[r * lda + c] = first ? sums[r][c] : acc[r * lda + c] + sums[r][c];
}

#define DQ_NB 32
#define DQ_ROWS(NR)                                                                  \
    switch (mr) {                                                                    \
        case 1: dq_tile(wr, ks, xr, K, ks, 1, NR, ar, DQ_NB, first); break;          \
        case 2: dq_tile(wr, ks, xr, K, ks, 2, NR, ar, DQ_NB, first); break;          \
        case 3: dq_tile(wr, ks, xr, K, ks, 3, NR, ar, DQ_NB, first); break;          \
        default: dq_tile(wr, ks, xr, K, ks, 4, NR, ar, DQ_NB, first); break;         \
    }

/* the nrows dequantized rows of one slice (wb, ks apart) against activation rows x[0, M) (that
 * slice of them: x points at its first value, rows K apart), into acc (M rows of DQ_NB) */
static __attribute__((noinline)) void dq_block(const uint16_t *wb, const uint16_t *x, int64_t K, int64_t ks,
                                               int64_t nrows, int64_t M, float *acc, int first) {
    for (int64_t m = 0; m < M; m += 4) {
        const int64_t mr = M - m < 4 ? M - m : 4;
        for (int64_t n = 0; n < nrows; n += 4) {
            const uint16_t *wr = wb + n * ks, *xr = x + m * K;
            float *ar = acc + m * DQ_NB + n;
            switch (nrows - n < 4 ? nrows - n : 4) {
                case 1: DQ_ROWS(1) break;
                case 2: DQ_ROWS(2) break;
                case 3: DQ_ROWS(3) break;
                default: DQ_ROWS(4) break;
            }
        }
    }
}

static int int4_dq_matmul(const uint8_t *const *packed, const uint16_t *const *meta, const int64_t *rows, int parts,
                          const uint16_t *x, uint16_t *y, int64_t M, int64_t K, int64_t ldy, int64_t group,
                          int64_t ks, int64_t n_begin, int64_t n_end, int threads) {
    const int64_t MC = 512, S = K / ks, Gs = ks / group, nblocks = (n_end - n_begin + DQ_NB - 1) / DQ_NB;
    int failed = 0;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && M * (n_end - n_begin) * K >= (1 << 20))
#endif
    {
        uint16_t *wb = malloc(sizeof(uint16_t) * (size_t)(DQ_NB * ks));
        float *acc = malloc(sizeof(float) * (size_t)((M < MC ? M : MC) * DQ_NB));
        if (!wb || !acc) failed = 1;
        for (int64_t m0 = 0; m0 < M; m0 += MC) {
            const int64_t mc = M - m0 < MC ? M - m0 : MC;
#ifdef _OPENMP
#pragma omp for schedule(guided)  /* as in fg_int4_matmul_x16: 16, 32, 128 rows 0.96-1.07x, mean ~1.02x */
#endif
            for (int64_t b = 0; b < nblocks; b++) {
                if (!wb || !acc) continue;
                const int64_t nb0 = n_begin + b * DQ_NB, nb1 = nb0 + DQ_NB < n_end ? nb0 + DQ_NB : n_end;
                for (int64_t s = 0; s < S; s++) {
                    int p = 0;
                    int64_t base = 0;  /* first row of part p */
                    for (int64_t n = nb0; n < nb1; n++) {
                        const int64_t row = slice_row(rows, parts, n, s, &p, &base);
                        dq_row_bf16(packed[p] + row * (ks / 2), meta[p] + row * Gs * 2, ks, group, wb + (n - nb0) * ks);
                    }
                    dq_block(wb, x + m0 * K + s * ks, K, ks, nb1 - nb0, mc, acc, s == 0);
                }
                for (int64_t m = 0; m < mc; m++)
                    for (int64_t n = nb0; n < nb1; n++) y[(m0 + m) * ldy + n] = float_to_bf16(acc[m * DQ_NB + n - nb0]);
            }
        }
        free(wb);
        free(acc);
    }
    return failed ? -1 : 0;
}
#endif

/* ---- a decode step's small per-row operations: RMS norm and rotary embedding ---------------------
 * Speed: on the few rows of a decode step each is a chain of 4-6 torch ops at ~3-10 us of dispatch
 * each, ~20-45 us per call between the step's matmuls; Qwen3 runs four norms and two rotations per
 * layer (on 2 Zen 4 cores, Qwen3-0.6B at batch 1: 5.8 of 27 ms per token). One call, one pass.
 * Numerics: the torch-op path's, rounding for rounding (fp32 sums in 16 lanes: the mean of squares
 * may differ from torch's in its last bits). kind 0 fp32, 1 bf16. */

/* y[r] = round(round(x[r] * (1 / sqrt(mean(x[r]^2) + eps))) * w) for `rows` rows of `width` (x's rows ldx
 * apart, y contiguous), the mean in fp32 as the reference norms compute it */
int fg_rms_norm(const void *x, int64_t ldx, const void *w, void *y, int64_t rows, int64_t width, float eps, int kind) {
    float *row = malloc(sizeof(float) * (size_t)width);
    if (!row) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + (kind ? 2 : 4) * r * ldx;
        for (int64_t i = 0; i < width; i++) row[i] = load_one(xr, kind, i);
        const float inv = 1.0f / sqrtf(dot(row, row, width) / (float)width + eps);
        for (int64_t i = 0; i < width; i++) {
            const float v = round_to(round_to(row[i] * inv, kind) * load_one(w, kind, i), kind);
            if (kind) ((uint16_t *)y)[r * width + i] = float_to_bf16(v);  /* exact: v is a bf16 value */
            else ((float *)y)[r * width + i] = v;
        }
    }
    free(row);
    return 0;
}

/* out = x cos + rotate_half(x) sin, rotate_half(x) = (-x[d/2:], x[:d/2]), each product and the sum
 * rounded like the torch ops: x (B, H, T, D) at strides (sb, sh, st) with D contiguous, cos and sin
 * (B, T, D) at strides (cb, ct), out (B, H, T, D) contiguous. */
int fg_rope(const void *x, int64_t sb, int64_t sh, int64_t st, const void *cs, const void *sn, int64_t cb,
            int64_t ct, void *out, int64_t B, int64_t H, int64_t T, int64_t D, int kind) {
    const int64_t half = D / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++) {
                const char *xr = (const char *)x + (kind ? 2 : 4) * (b * sb + h * sh + t * st);
                const char *cr = (const char *)cs + (kind ? 2 : 4) * (b * cb + t * ct);
                const char *sr = (const char *)sn + (kind ? 2 : 4) * (b * cb + t * ct);
                const int64_t o = ((b * H + h) * T + t) * D;
                for (int64_t i = 0; i < D; i++) {
                    const float rot = i < half ? -load_one(xr, kind, i + half) : load_one(xr, kind, i - half);
                    const float v = round_to(round_to(load_one(xr, kind, i) * load_one(cr, kind, i), kind)
                                             + round_to(rot * load_one(sr, kind, i), kind), kind);
                    if (kind) ((uint16_t *)out)[o + i] = float_to_bf16(v);
                    else ((float *)out)[o + i] = v;
                }
            }
    return 0;
}

int fg_openmp(void) {  /* 1 when built with OpenMP (fg_int4_matmul splits its own work) */
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
