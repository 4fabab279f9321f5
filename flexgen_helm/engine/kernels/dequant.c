/* Group-wise dequantization of engine/compression.py's packed format in one pass over memory.
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

static inline float half_to_float(uint16_t h) {
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
int fg_dequantize_strided(const uint8_t *packed, const uint16_t *meta, void *out, int64_t c_begin, int64_t c_end,
                          int bits, int64_t block_codes, int64_t block_bytes, int64_t group, int symmetric,
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
                int64_t d = dest_of(c, vec_len, ndims, dims, strides);
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
