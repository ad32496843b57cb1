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

/// The palette-1 tile configuration: tmm0-tmm3 int32 results (16 x 16 each, one per block of 16
/// output channels), tmm4 an input block (16 rows x 64 int8), tmm5-tmm7 weight blocks (16 rows of
/// 4 k x 16 channels).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

fn config() -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1;
    for t in 0..8 {
        c[16 + 2 * t] = 64; // bytes per row
        c[48 + t] = 16; // rows
    }
    TileConfig(c)
}

/// Channel blocks of 16 whose products run together, one accumulator tile each: four
/// independent `tdpbssd` chains in flight (one chain waited out each product's latency and
/// its store: ~400 cycles per 16 x 16 x 64 block on this VM) and each input tile loaded once
/// for the four.
const NB: usize = 4;

/// `tmm{j} += tmm4 . (weights at bp)`, the weights loaded into tmm5 + j % 3.
#[inline(always)]
unsafe fn product(j: usize, bp: *const i8) {
    macro_rules! dp {
        ($acc:literal, $b:literal) => {
            asm!(
                concat!("tileloadd tmm", $b, ", [{b} + {sb}*1]"),
                concat!("tdpbssd tmm", $acc, ", tmm4, tmm", $b),
                b = in(reg) bp, sb = in(reg) 128usize, options(nostack)
            )
        };
    }
    match j {
        0 => dp!("0", "5"),
        1 => dp!("1", "6"),
        2 => dp!("2", "7"),
        _ => dp!("3", "5"),
    }
}

/// `tilezero tmm{j}`.
#[inline(always)]
unsafe fn zero(j: usize) {
    match j {
        0 => asm!("tilezero tmm0", options(nostack)),
        1 => asm!("tilezero tmm1", options(nostack)),
        2 => asm!("tilezero tmm2", options(nostack)),
        _ => asm!("tilezero tmm3", options(nostack)),
    }
}

/// `tmm{j}` stored as 16 rows of 16 int32 at `c`.
#[inline(always)]
unsafe fn store(j: usize, c: *mut i32) {
    match j {
        0 => asm!("tilestored [{0} + {1}*1], tmm0", in(reg) c, in(reg) 64usize, options(nostack)),
        1 => asm!("tilestored [{0} + {1}*1], tmm1", in(reg) c, in(reg) 64usize, options(nostack)),
        2 => asm!("tilestored [{0} + {1}*1], tmm2", in(reg) c, in(reg) 64usize, options(nostack)),
        _ => asm!("tilestored [{0} + {1}*1], tmm3", in(reg) c, in(reg) 64usize, options(nostack)),
    }
}

/// `y[c * strides.0 + (r - rows.start) * strides.1]` for inputs `xs` and output channels `rows`
/// (starting at a multiple of 16), as [`crate::gemm_q4q8_rows`] writes them: per block of 16
/// inputs and up to [`NB`] blocks of 16 channels, per group, the int32 tiles of the group's dot
/// products (the blocks' products issued together), then the group's step of each block's float
/// sum.
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
    let mut a = vec![0i8; 16 * w.k_pad];
    let mut c = [0i32; 256 * NB];
    let mut acc = [0f32; 256 * NB];
    for m0 in (0..xs.len()).step_by(16) {
        let mrows = (xs.len() - m0).min(16);
        for (i, x) in xs[m0..m0 + mrows].iter().enumerate() {
            a[i * w.k_pad..(i + 1) * w.k_pad].copy_from_slice(&x.q[..w.k_pad]);
        }
        a[mrows * w.k_pad..].fill(0);
        for n0 in (rows.start..rows.end).step_by(16 * NB) {
            let nb = (rows.end - n0).div_ceil(16).min(NB);
            acc[..256 * nb].fill(0.0);
            for g in 0..groups {
                for j in 0..nb {
                    zero(j);
                }
                for kc in 0..w.group / 64 {
                    let ap = a.as_ptr().add(g * w.group + kc * 64);
                    asm!("tileloadd tmm4, [{a} + {sa}*1]", a = in(reg) ap, sa = in(reg) w.k_pad, options(nostack));
                    for j in 0..nb {
                        let n = n0 + 16 * j;
                        let (cb, half) = (n / 32, (n % 32) / 16);
                        product(j, t.data.as_ptr().add(((cb * groups + g) * quads + kc * 16) * 128 + half * 64));
                    }
                }
                for j in 0..nb {
                    store(j, c.as_mut_ptr().add(256 * j));
                }
                for j in 0..nb {
                    let n = n0 + 16 * j;
                    let base = (n / 32 * groups + g) * 32 + (n % 32) / 16 * 16;
                    let sums = _mm512_loadu_si512(t.sums.as_ptr().add(base) as *const _);
                    let scales = _mm512_loadu_ps(t.scales.as_ptr().add(base));
                    for (m, x) in xs[m0..m0 + mrows].iter().enumerate() {
                        let s = _mm512_sub_epi32(
                            _mm512_loadu_si512(c.as_ptr().add(256 * j + m * 16) as *const _),
                            _mm512_mullo_epi32(_mm512_set1_epi32(x.zero), sums),
                        );
                        let p = acc.as_mut_ptr().add(256 * j + m * 16);
                        // A product, then a sum: two roundings, as the reference (no fused
                        // multiply-add).
                        _mm512_storeu_ps(
                            p,
                            _mm512_add_ps(_mm512_loadu_ps(p), _mm512_mul_ps(_mm512_cvtepi32_ps(s), scales)),
                        );
                    }
                }
            }
            for j in 0..nb {
                let n = n0 + 16 * j;
                let valid = 16.min(rows.end - n);
                if strides.1 == 1 {
                    // Outputs of one input contiguous: 16 channels per vector, `acc * x.scale +
                    // bias` (+0 without a bias, as the reference adds), masked at the edge.
                    let mask: __mmask16 = if valid == 16 { 0xffff } else { (1u16 << valid) - 1 };
                    let bv = bias.map_or(_mm512_setzero_ps(), |b| _mm512_maskz_loadu_ps(mask, b.as_ptr().add(n)));
                    for (m, x) in xs[m0..m0 + mrows].iter().enumerate() {
                        let v =
                            _mm512_mul_ps(_mm512_loadu_ps(acc.as_ptr().add(256 * j + m * 16)), _mm512_set1_ps(x.scale));
                        let at = (m0 + m) * strides.0 + (n - rows.start);
                        debug_assert!(at + valid <= y.len());
                        _mm512_mask_storeu_ps(y.as_mut_ptr().add(at), mask, _mm512_add_ps(v, bv));
                    }
                    continue;
                }
                for (m, x) in xs[m0..m0 + mrows].iter().enumerate() {
                    for jj in 0..valid {
                        let r = n + jj;
                        y[(m0 + m) * strides.0 + (r - rows.start) * strides.1] =
                            acc[256 * j + m * 16 + jj] * x.scale + bias.map_or(0.0, |b| b[r]);
                    }
                }
            }
        }
    }
    asm!("tilerelease", options(nostack));
}
