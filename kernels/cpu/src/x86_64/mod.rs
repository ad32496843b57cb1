//! x86-64 kernels, one module per instruction set; callers go through the dispatchers in the
//! crate root, which check the CPU at run time.

pub mod avx2;
pub mod avx512;
