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

#endif /* SQIL_PACKED_H */
