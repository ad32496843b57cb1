/* Generated from kernels/cpu/src/packed.rs by `sqil_kernels_cpu::packed::c_header`: do not edit.
 * A test fails if this file and the Rust definitions drift. */
#ifndef SQIL_PACKED_H
#define SQIL_PACKED_H

#include <stdint.h>

/* 32 4-bit weights of one output channel along the reduction axis. Byte i holds element i
 * in its low nibble and element i + 16 in its high nibble; a nibble stores q + 8, q in [-8, 7]. */
#define SQIL_QK4 32
typedef struct {
    uint8_t qs[16];
} sqil_block_q4;

/* Does not compile if the size differs (C99 has no static_assert). */
typedef char sqil_block_q4_size_check[(sizeof(sqil_block_q4) == 16) ? 1 : -1];

/* 32 2-bit weights: byte j holds elements j, j + 8, j + 16, j + 24 at bits 0, 2, 4, 6, each
 * as q + 2, q in [-2, 1]. */
typedef struct {
    uint8_t qs[8];
} sqil_block_q2;

typedef char sqil_block_q2_size_check[(sizeof(sqil_block_q2) == 8) ? 1 : -1];

/* 32 3-bit weights, v = q + 4, q in [-4, 3]: ql holds v's low two bits as sqil_block_q2 does,
 * qh the high bits, bit i of the little-endian 32-bit word for element i. */
typedef struct {
    uint8_t ql[8];
    uint8_t qh[4];
} sqil_block_q3;

typedef char sqil_block_q3_size_check[(sizeof(sqil_block_q3) == 12) ? 1 : -1];

#endif /* SQIL_PACKED_H */
