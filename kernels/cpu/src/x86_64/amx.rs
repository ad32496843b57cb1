//! W4A8 for batches on Intel AMX (`tdpbssd`: signed int8 x signed int8 into int32 tiles), for
//! CPUs that have it (Sapphire Rapids and later; Linux, which must grant the tile state to the
//! process first). The arithmetic is [`generic_q4q8_row`]'s exactly: each group's integer dot
//! product is an int32 tile element (integer sums: the order inside a group does not matter),
//! then per group, in order, `acc += (s - zero * sum) as f32 * scale` as a separate multiply and
//! add, then `acc * x.scale + bias`. Weights come from [`ChannelTiles`] (four consecutive k per
//! channel, 32 channels per 128-byte row: a B tile is 16 of those rows' first or second half);
//! inputs are copied into 16-row blocks.
//!
//! [`generic_q4q8_row`]: crate::generic::generic_q4q8_row
//! [`ChannelTiles`]: crate::packed::ChannelTiles

use crate::generic::QRow;
use crate::packed::PackedQ4;
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether this CPU has AMX-TILE and AMX-INT8 and the OS gave this process the tile state
/// (checked once).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var_os("SQIL_NO_AMX").is_some() {
            return false;
        }
        let l7 = __cpuid_count(7, 0);
        let (tile, int8) = (l7.edx >> 24 & 1 == 1, l7.edx >> 25 & 1 == 1);
        tile && int8 && request_tile_state()
    })
}

/// Linux: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, without which the first tile
/// instruction faults.
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    let ret: isize;
    // SAFETY: the arch_prctl system call (158) with a request code and a feature number; it only
    // changes which extended states this process may use.
    unsafe {
        asm!("syscall", inlateout("rax") 158isize => ret, in("rdi") 0x1023usize, in("rsi") 18usize,
             lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// Whether the AMX kernel takes this layer: groups of a multiple of 64 along k.
pub fn takes(w: &PackedQ4) -> bool {
    w.group.is_multiple_of(64) && w.k_pad.is_multiple_of(w.group)
}

/// The palette-1 tile configuration: tmm0 the int32 result (16 x 16), tmm1 an input block
/// (16 rows x 64 int8), tmm2 a weight block (16 rows of 4 k x 16 channels).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

fn config() -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1;
    for t in 0..3 {
        c[16 + 2 * t] = 64; // bytes per row
        c[48 + t] = 16; // rows
    }
    TileConfig(c)
}

/// `y[c * strides.0 + (r - rows.start) * strides.1]` for inputs `xs` and output channels `rows`
/// (starting at a multiple of 16), as [`crate::gemm_q4q8_rows`] writes them: per block of 16
/// inputs and 16 channels, per group, the int32 tile of the group's dot products, then the
/// group's step of the float sum. (Measured: 2 x 2 blocks of tiles were slower here, the
/// per-group tile stores and sums being the cost, not the tile products.)
///
/// # Safety
/// [`available`] and AVX-512 F must hold, [`takes`] for `w`; every `xs[c].q` holds `k_pad`
/// values and `y` every index written.
#[target_feature(enable = "avx512f,avx2")]
pub unsafe fn gemm_q4q8(
    w: &PackedQ4,
    rows: std::ops::Range<usize>,
    xs: &[QRow],
    bias: Option<&[f32]>,
    y: &mut [f32],
    strides: (usize, usize),
) {
    debug_assert!(rows.start.is_multiple_of(16));
    let t = w.channel_tiles();
    let groups = w.groups();
    let quads = w.group / 4;
    let cfg = config();
    asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack));
    // Every input block copied once (rows past the batch zero), so that each block of 16
    // channels' weight tiles is read once for the whole batch and used by every input block
    // while in cache (channel blocks outside, input blocks inside).
    let blocks = xs.len().div_ceil(16);
    let mut a_all = vec![0i8; blocks * 16 * w.k_pad];
    for (i, x) in xs.iter().enumerate() {
        a_all[i * w.k_pad..(i + 1) * w.k_pad].copy_from_slice(&x.q[..w.k_pad]);
    }
    let mut c = [0i32; 256];
    let mut acc = [0f32; 256];
    for n0 in (rows.start..rows.end).step_by(16) {
        let (cb, half) = (n0 / 32, (n0 % 32) / 16);
        for m0 in (0..xs.len()).step_by(16) {
            let mrows = (xs.len() - m0).min(16);
            let a = &a_all[m0 * w.k_pad..(m0 + 16) * w.k_pad];
            acc.fill(0.0);
            for g in 0..groups {
                asm!("tilezero tmm0", options(nostack));
                for kc in 0..w.group / 64 {
                    let ap = a.as_ptr().add(g * w.group + kc * 64);
                    let bp = t.data.as_ptr().add(((cb * groups + g) * quads + kc * 16) * 128 + half * 64);
                    asm!(
                        "tileloadd tmm1, [{a} + {sa}*1]",
                        "tileloadd tmm2, [{b} + {sb}*1]",
                        "tdpbssd tmm0, tmm1, tmm2",
                        a = in(reg) ap, sa = in(reg) w.k_pad, b = in(reg) bp, sb = in(reg) 128usize,
                        options(nostack)
                    );
                }
                asm!("tilestored [{0} + {1}*1], tmm0", in(reg) c.as_mut_ptr(), in(reg) 64usize, options(nostack));
                let base = (cb * groups + g) * 32 + half * 16;
                let sums = _mm512_loadu_si512(t.sums.as_ptr().add(base) as *const _);
                let scales = _mm512_loadu_ps(t.scales.as_ptr().add(base));
                for (m, x) in xs[m0..m0 + mrows].iter().enumerate() {
                    let s = _mm512_sub_epi32(
                        _mm512_loadu_si512(c.as_ptr().add(m * 16) as *const _),
                        _mm512_mullo_epi32(_mm512_set1_epi32(x.zero), sums),
                    );
                    let p = acc.as_mut_ptr().add(m * 16);
                    // A product, then a sum: two roundings, as the reference (no fused
                    // multiply-add).
                    _mm512_storeu_ps(
                        p,
                        _mm512_add_ps(_mm512_loadu_ps(p), _mm512_mul_ps(_mm512_cvtepi32_ps(s), scales)),
                    );
                }
            }
            let valid = 16.min(rows.end - n0);
            if strides.1 == 1 {
                // Outputs of one input contiguous: 16 channels per vector, `acc * x.scale + bias`
                // (+0 without a bias, as the reference adds), masked at the edge. (The scalar
                // loop was a third of the kernel's time.)
                let mask: __mmask16 = if valid == 16 { 0xffff } else { (1u16 << valid) - 1 };
                let bv = bias.map_or(_mm512_setzero_ps(), |b| _mm512_maskz_loadu_ps(mask, b.as_ptr().add(n0)));
                for (m, x) in xs[m0..m0 + mrows].iter().enumerate() {
                    let v = _mm512_mul_ps(_mm512_loadu_ps(acc.as_ptr().add(m * 16)), _mm512_set1_ps(x.scale));
                    let at = (m0 + m) * strides.0 + (n0 - rows.start);
                    debug_assert!(at + valid <= y.len());
                    _mm512_mask_storeu_ps(y.as_mut_ptr().add(at), mask, _mm512_add_ps(v, bv));
                }
                continue;
            }
            for (m, x) in xs[m0..m0 + mrows].iter().enumerate() {
                for j in 0..valid {
                    let r = n0 + j;
                    y[(m0 + m) * strides.0 + (r - rows.start) * strides.1] =
                        acc[m * 16 + j] * x.scale + bias.map_or(0.0, |b| b[r]);
                }
            }
        }
    }
    asm!("tilerelease", options(nostack));
}
