/* What the layouts' C row decoders share (the CPU counterpart of kernel_base.py's Triton kernel).
 *
 * A prepared linear reaches C as its pointers and integers in the order of its layout's `prepare`
 * (llmquant/layouts/<layout>/kernels.py): tensors in p[], integers in v[]. Each layout defines
 *     void decode_row_<layout>(const kernel_args *a, int64_t n, float *out);
 * writing row n of the weight, W[n, 0..K), with the float32 arithmetic of the layout's `decode`,
 * term for term (compiled with -ffp-contract=off: no fused multiply-add), so a row equals the
 * reference's bit for bit. Bit streams are read in place as little-endian 32-bit words.
 */
#ifndef LLMQUANT_CPU_KERNEL_H
#define LLMQUANT_CPU_KERNEL_H

#include <stdint.h>

typedef struct {
    const void *p[8];  /* the prepared tensors' data, in the layout's order */
    int64_t v[16];     /* the prepared integers, in the layout's order */
    int64_t spec;      /* the layout's compile-time constants (as for the Triton kernel) */
    int64_t rows, cols;
} kernel_args;

/* `width` (<= 25) bits at bit offset `bit` of a little-endian 32-bit word stream. */
static inline uint32_t bits_at(const uint32_t *words, int64_t bit, int width) {
    const int64_t index = bit >> 5;
    const int shift = (int)(bit & 31);
    uint64_t value = words[index];
    if (shift + width > 32) value |= (uint64_t)words[index + 1] << 32;
    return (uint32_t)((value >> shift) & ((1u << width) - 1u));
}

/* A sequential reader of a bit stream: rows of every layout are read left to right, so each of
 * their streams is consumed in order. One 64-bit buffer, refilled a 32-bit word at a time. */
typedef struct {
    const uint32_t *next;
    uint64_t buffer;
    int available;
} bit_reader;

static inline bit_reader reader_at(const uint32_t *words, int64_t bit) {
    bit_reader r;
    r.next = words + (bit >> 5) + 1;
    r.buffer = (uint64_t)words[bit >> 5] >> (bit & 31);
    r.available = 32 - (int)(bit & 31);
    return r;
}

static inline uint32_t take(bit_reader *r, int width) {
    if (r->available < width) { /* a word more; only read when the value needs it */
        r->buffer |= (uint64_t)(*r->next++) << r->available;
        r->available += 32;
    }
    const uint32_t value = (uint32_t)(r->buffer & ((1u << width) - 1u));
    r->buffer >>= width;
    r->available -= width;
    return value;
}

/* `count` values of `width` bits from the reader, as floats. The switch gives the compiler a
 * constant width for the common ones (constant masks and shifts, a predictable refill branch). */
static inline void take_run_width(bit_reader *r, int width, int64_t count, float *out) {
    for (int64_t i = 0; i < count; i++) out[i] = (float)take(r, width);
}

static inline void take_run(bit_reader *r, int width, int64_t count, float *out) {
    switch (width) {
    case 1: take_run_width(r, 1, count, out); break;
    case 2: take_run_width(r, 2, count, out); break;
    case 3: take_run_width(r, 3, count, out); break;
    case 4: take_run_width(r, 4, count, out); break;
    case 8: take_run_width(r, 8, count, out); break;
    default: take_run_width(r, width, count, out); break;
    }
}

/* 32 values of `width` bits from 32-bit-aligned words (`width` words). With a constant width the
 * loop unrolls into constant shifts and masks: about 2.5x faster than reading the values one by one. */
static inline __attribute__((always_inline)) void unpack32(const uint32_t *w, const int width, float *out) {
    const uint32_t mask = (1u << width) - 1u;
#pragma GCC unroll 32
    for (int j = 0; j < 32; j++) {
        const int b = j * width, index = b >> 5, shift = b & 31;
        uint32_t value = w[index] >> shift;
        if (shift + width > 32) value |= w[index + 1] << (32 - shift);
        out[j] = (float)(value & mask);
    }
}

/* `count` values of `width` bits from bit offset `bit` on, as floats. From a word boundary, blocks of
 * 32 values go through unpack32 (they end on a word boundary too); the rest are read each on its own
 * (no chain of shifts from one value to the next): a value is cut from the 64 bits of its word and the
 * next, except the last few, whose next word would lie beyond the run's last word (bits_at reads that
 * word only when the value needs it). */
static inline __attribute__((always_inline)) void unpack_run_width(const uint32_t *words, int64_t bit, const int width, int64_t count, float *out) {
    if (count <= 0) return;
    int64_t i = 0;
    if ((bit & 31) == 0)
        for (const uint32_t *w = words + (bit >> 5); i + 32 <= count; i += 32, w += width) unpack32(w, width, out + i);
    bit += i * width;
    out += i;
    count -= i;
    if (count <= 0) return;
    const uint32_t mask = (1u << width) - 1u;
    const int64_t last_word = (bit + count * width - 1) >> 5, limit = last_word * 32 - bit;
    int64_t fast = limit > 0 ? (limit + width - 1) / width : 0;
    if (fast > count) fast = count;
    for (int64_t j = 0; j < fast; j++) {
        const int64_t b = bit + j * width, index = b >> 5;
        const uint64_t window = (uint64_t)words[index] | ((uint64_t)words[index + 1] << 32);
        out[j] = (float)(uint32_t)((window >> (b & 31)) & mask);
    }
    for (int64_t j = fast; j < count; j++) out[j] = (float)bits_at(words, bit + j * width, width);
}

static inline void unpack_run(const uint32_t *words, int64_t bit, int width, int64_t count, float *out) {
    switch (width) {
    case 1: unpack_run_width(words, bit, 1, count, out); break;
    case 2: unpack_run_width(words, bit, 2, count, out); break;
    case 3: unpack_run_width(words, bit, 3, count, out); break;
    case 4: unpack_run_width(words, bit, 4, count, out); break;
    case 5: unpack_run_width(words, bit, 5, count, out); break;
    case 8: unpack_run_width(words, bit, 8, count, out); break;
    default: unpack_run_width(words, bit, width, count, out); break;
    }
}

/* IEEE binary16 -> binary32, exactly (subnormals, infinities, NaN). */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
    if (exponent == 0x1Fu) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exponent = 113u;
        while (!(mantissa & 0x400u)) { mantissa <<= 1; exponent--; }
        bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
    }
    union { uint32_t u; float f; } out = {bits};
    return out.f;
}

void decode_row_uniform(const kernel_args *a, int64_t n, float *out);
void decode_row_mixed(const kernel_args *a, int64_t n, float *out);
void decode_row_partial_binary(const kernel_args *a, int64_t n, float *out);
void decode_row_binary_residual(const kernel_args *a, int64_t n, float *out);

#endif
