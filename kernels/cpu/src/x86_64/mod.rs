//! x86-64 kernels, one module per instruction set (`avx2`, `avx512`) over shared pieces
//! (`common`: building blocks and the drivers generic over the instruction set's part, importing
//! neither ISA module); callers go through the dispatchers in the crate root, which check the CPU
//! at run time.

pub mod amx;
pub mod avx2;
pub mod avx512;
pub mod common;
