//! Packed low-bit weight formats, defined once. The C header the firmware back end includes
//! (`kernels/c/sqil_packed.h`) is generated from these definitions by
//! [`c_header`]; a test fails if the committed header drifts.
//!
//! **Q4 block**: 32 consecutive weights of one output channel along the reduction axis, 4 bits
//! each, in 16 bytes. Byte `i` holds element `i` in its low nibble and element `i + 16` in its
//! high nibble, so one AND and one shift unpack 32 values into two 16-byte halves in order.
//! A nibble stores `q + 8` for a signed weight `q` in [-8, 7]. The CPU runtime keeps 2- and 3-bit
//! weights in this layout too (`q` in [-2, 1] or [-4, 3]); the firmware back end stores them
//! densely:
//!
//! **Q2 block**: 32 2-bit weights in 8 bytes. Byte `j` holds elements `j`, `j + 8`, `j + 16`,
//! `j + 24` at bits 0, 2, 4, 6, each as `q + 2`: one shift and one AND per two bits give a run of
//! 8 consecutive elements from all 8 bytes.
//!
//! **Q3 block**: 32 3-bit weights in 12 bytes: `ql`, the low two bits of `q + 4` in the Q2
//! layout, then `qh`, the high bits, bit `i` of the little-endian 32-bit word for element `i`:
//! `v = ((ql[j] >> 2s) & 3) | (((qh >> (j + 8s)) & 1) << 2)` for element `j + 8s`.
//!
//! **Packed layer**: `n` output channels, reduction length `k` padded with zero weights to
//! `k_pad`, a multiple of 32; blocks row-major (`n` rows of `k_pad / 32` blocks); one f32 scale
//! per `(channel, group)` with `group` a multiple of 32 (or the whole row); and per `(channel,
//! group)` the sum of the signed weights, which integer kernels use to apply an activation zero
//! point once per group instead of per element.

/// 32 4-bit weights: byte `i` = `(q[i] + 8) | (q[i + 16] + 8) << 4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ4 {
    pub qs: [u8; 16],
}

/// Weights per [`BlockQ4`].
pub const QK4: usize = 32;

const _: () = assert!(std::mem::size_of::<BlockQ4>() == 16);
const _: () = assert!(std::mem::align_of::<BlockQ4>() == 1);

impl BlockQ4 {
    /// Packs 32 signed values in [-8, 7].
    pub fn pack(q: &[i8; QK4]) -> BlockQ4 {
        let mut qs = [0u8; 16];
        for i in 0..16 {
            debug_assert!((-8..=7).contains(&q[i]) && (-8..=7).contains(&q[i + 16]));
            qs[i] = ((q[i] + 8) as u8) | (((q[i + 16] + 8) as u8) << 4);
        }
        BlockQ4 { qs }
    }

    /// The 32 signed values.
    pub fn unpack(&self) -> [i8; QK4] {
        let mut q = [0i8; QK4];
        for i in 0..16 {
            q[i] = (self.qs[i] & 0x0f) as i8 - 8;
            q[i + 16] = (self.qs[i] >> 4) as i8 - 8;
        }
        q
    }
}

/// 32 2-bit weights: byte `j` = `sum over s of (q[j + 8 s] + 2) << 2 s`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ2 {
    pub qs: [u8; 8],
}

/// 32 3-bit weights: the low two bits of `q + 4` as in [`BlockQ2`], the high bits as one
/// little-endian 32-bit word (bit `i` for element `i`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ3 {
    pub ql: [u8; 8],
    pub qh: [u8; 4],
}

const _: () = assert!(std::mem::size_of::<BlockQ2>() == 8);
const _: () = assert!(std::mem::size_of::<BlockQ3>() == 12);
const _: () = assert!(std::mem::align_of::<BlockQ3>() == 1);

impl BlockQ2 {
    /// Packs 32 signed values in [-2, 1].
    pub fn pack(q: &[i8; QK4]) -> BlockQ2 {
        let mut qs = [0u8; 8];
        for (i, &v) in q.iter().enumerate() {
            debug_assert!((-2..=1).contains(&v));
            qs[i % 8] |= ((v + 2) as u8 & 3) << (2 * (i / 8));
        }
        BlockQ2 { qs }
    }

    pub fn unpack(&self) -> [i8; QK4] {
        std::array::from_fn(|i| ((self.qs[i % 8] >> (2 * (i / 8))) & 3) as i8 - 2)
    }
}

impl BlockQ3 {
    /// Packs 32 signed values in [-4, 3].
    pub fn pack(q: &[i8; QK4]) -> BlockQ3 {
        let (mut ql, mut qh) = ([0u8; 8], 0u32);
        for (i, &v) in q.iter().enumerate() {
            debug_assert!((-4..=3).contains(&v));
            let u = (v + 4) as u8;
            ql[i % 8] |= (u & 3) << (2 * (i / 8));
            qh |= ((u >> 2) as u32 & 1) << i;
        }
        BlockQ3 { ql, qh: qh.to_le_bytes() }
    }

    pub fn unpack(&self) -> [i8; QK4] {
        let qh = u32::from_le_bytes(self.qh);
        std::array::from_fn(|i| (((self.ql[i % 8] >> (2 * (i / 8))) & 3) | (((qh >> i) & 1) << 2) as u8) as i8 - 4)
    }
}

/// The fewest bits (2, 3 or 4) whose signed range holds every weight of `p`: the width the
/// firmware back end stores it at (lossless: a layer allocated 3 bits fits 3).
pub fn narrowest_bits(p: &PackedQ4) -> u32 {
    let (lo, hi) = p.blocks.iter().flat_map(|b| b.unpack()).fold((0i8, 0i8), |(l, h), v| (l.min(v), h.max(v)));
    if (-2..=1).contains(&lo) && (-2..=1).contains(&hi) {
        2
    } else if (-4..=3).contains(&lo) && (-4..=3).contains(&hi) {
        3
    } else {
        4
    }
}

/// `p`'s blocks at `bits` (2, 3 or 4; every weight must fit) as bytes, row-major like
/// `p.blocks`: [`BlockQ2`], [`BlockQ3`] or [`BlockQ4`] each.
pub fn dense_bytes(p: &PackedQ4, bits: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.blocks.len() * 4 * bits as usize);
    for b in &p.blocks {
        let q = b.unpack();
        match bits {
            2 => out.extend(BlockQ2::pack(&q).qs),
            3 => {
                let d = BlockQ3::pack(&q);
                out.extend(d.ql);
                out.extend(d.qh);
            }
            _ => out.extend(b.qs),
        }
    }
    out
}

/// A layer's weight `[n, k]` in Q4 blocks with group-wise scales. (Equality compares the stored
/// parts; the derived layouts follow from them.)
#[derive(Clone, Debug)]
pub struct PackedQ4 {
    pub n: usize,
    pub k: usize,
    /// `k` rounded up to a multiple of [`QK4`].
    pub k_pad: usize,
    /// Weights per scale along `k` (a multiple of [`QK4`]); `k_pad` for one scale per channel.
    pub group: usize,
    /// `n * k_pad / 32` blocks, row-major.
    pub blocks: Vec<BlockQ4>,
    /// `n * groups` scales, row-major.
    pub scales: Vec<f32>,
    /// `n * groups` sums of the signed weights of each group.
    pub sums: Vec<i32>,
    /// Derived from `scales` for the SIMD kernels' tiles of four rows: tile `t` (rows `4t..4t+4`,
    /// the last row repeated past `n`), group `g` at `[(t * groups + g) * 4..][..4]`, so one
    /// load fetches a tile's four scales of a group.
    pub tile_scales: Vec<f32>,
    /// `sums` in the layout of `tile_scales`.
    pub tile_sums: Vec<i32>,
    /// The weights again for the batch kernel that vectorises over output channels, made on
    /// first use (see [`ChannelTiles`]).
    pub channel_tiles: std::sync::OnceLock<ChannelTiles>,
    /// The weights again as half bytes for the VNNI channel-lane kernel on rows, made on first
    /// use (see [`NibbleTiles`]).
    pub nibble_tiles: std::sync::OnceLock<NibbleTiles>,
    /// The weights again one signed byte each, four consecutive k per word (`[n][k_pad / 4]`,
    /// little-endian), for the pointwise-convolution kernels' broadcasts (AVX-512 and AVX2); made on
    /// first use.
    pub quad_words: std::sync::OnceLock<Vec<u32>>,
}

/// A buffer of plain values (integers, floats) that starts on a 64-byte boundary: the lane
/// kernels' 512-bit loads at multiples of 64 bytes from its start never split a cache line (a
/// `Vec` starts where the allocator puts it, 16 bytes aligned, and three in four of those loads
/// did).
#[derive(Clone)]
pub struct Aligned64<T: Copy> {
    lines: Vec<Line64>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

/// One cache line of [`Aligned64`]'s storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line64([u8; 64]);

impl<T: Copy> Aligned64<T> {
    /// `values` copied into aligned storage.
    pub fn from_slice(values: &[T]) -> Aligned64<T> {
        const {
            assert!(
                std::mem::size_of::<T>() > 0 && 64 % std::mem::size_of::<T>() == 0 && std::mem::align_of::<T>() <= 64
            )
        };
        let bytes = std::mem::size_of_val(values);
        let mut lines = vec![Line64([0; 64]); bytes.div_ceil(64)];
        // SAFETY: the lines hold at least `bytes` bytes, 64-byte aligned (so aligned for T, whose
        // alignment divides 64); T is Copy, the source and destination do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), lines.as_mut_ptr() as *mut T, values.len()) };
        Aligned64 { lines, len: values.len(), _t: std::marker::PhantomData }
    }
}

impl<T: Copy> std::ops::Deref for Aligned64<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` values of T were written from the start of the lines (from_slice).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Copy + std::fmt::Debug> std::fmt::Debug for Aligned64<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: Copy + PartialEq> PartialEq for Aligned64<T> {
    fn eq(&self, o: &Aligned64<T>) -> bool {
        **self == **o
    }
}

/// A layer's signed weights one byte each, for kernels that keep eight output channels in one
/// vector: per block of 32 channels (padded with zero rows), per group, per four consecutive k,
/// 128 bytes: for each of the 32 channels its 4 weights (`data[((cb * groups + g) * (group / 4) +
/// quad) * 128 + 4 c + i]`); scales and weight sums per (channel, group) likewise channel-minor
/// (zero for padding rows).
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelTiles {
    /// Blocks of 32 channels.
    pub blocks: usize,
    pub data: Aligned64<i8>,
    /// `[blocks][groups][32]`.
    pub scales: Aligned64<f32>,
    /// `[blocks][groups][32]`.
    pub sums: Aligned64<i32>,
}

/// A layer's weights as unsigned half bytes (`q + 8`, in [0, 15]) for the VNNI channel-lane
/// kernel on rows, half the bytes of [`ChannelTiles`]: per block of 32 channels (padded with zero
/// weights, i.e. nibbles of 8), per group, per four consecutive k, 64 bytes: byte `4 c + i` holds
/// channel `c`'s weight `i` in its low nibble and channel `16 + c`'s in its high nibble
/// (`data[((cb * groups + g) * (group / 4) + quad) * 64 + 4 c + i]`): `vpdpbusd` takes the whole
/// bytes (`lo + 16 hi`) and their masked high halves as its unsigned operand, and the two
/// 16-channel sums follow per group. Scales and weight sums as in [`ChannelTiles`].
#[derive(Clone, Debug, PartialEq)]
pub struct NibbleTiles {
    /// Blocks of 32 channels.
    pub blocks: usize,
    pub data: Aligned64<u8>,
    /// `[blocks][groups][32]`.
    pub scales: Aligned64<f32>,
    /// `[blocks][groups][32]`.
    pub sums: Aligned64<i32>,
}

impl PartialEq for PackedQ4 {
    fn eq(&self, o: &PackedQ4) -> bool {
        (self.n, self.k, self.k_pad, self.group) == (o.n, o.k, o.k_pad, o.group)
            && self.blocks == o.blocks
            && self.scales == o.scales
            && self.sums == o.sums
    }
}

impl PackedQ4 {
    pub fn groups(&self) -> usize {
        self.k_pad / self.group
    }

    /// The padded row length of `k` weights in groups of `group` (0: one group): the next
    /// multiple of the group, or of 32 for one group.
    pub fn padded_k(k: usize, group: usize) -> usize {
        let k32 = k.div_ceil(QK4) * QK4;
        if group == 0 {
            k32
        } else {
            k.div_ceil(group).max(1) * group
        }
    }

    /// Packs integer weights `q` (`[n, k]` row-major, each in [-8, 7]) with scales `[n, ceil(k /
    /// group)]`. `group` must be a multiple of 32, or 0 for one scale per channel. Rows are
    /// zero-padded to `k_pad`, the next multiple of the group (of 32 per channel), so a last group
    /// that `k` cuts short (96 columns in groups of 64) is a whole group whose extra weights are 0
    /// and add nothing.
    pub fn pack(q: &[i8], scales: &[f32], n: usize, k: usize, group: usize) -> Result<PackedQ4, String> {
        if q.len() != n * k {
            return Err(format!("pack: {} weights for [{n}, {k}]", q.len()));
        }
        if group != 0 && !group.is_multiple_of(QK4) {
            return Err(format!("pack: group {group} must be a multiple of {QK4}"));
        }
        let k_pad = Self::padded_k(k, group);
        let group = if group == 0 { k_pad } else { group };
        let groups = k_pad / group;
        if scales.len() != n * groups {
            return Err(format!("pack: {} scales for {n} channels x {groups} groups", scales.len()));
        }
        if let Some(v) = q.iter().find(|v| !(-8..=7).contains(*v)) {
            return Err(format!("pack: weight {v} outside [-8, 7]"));
        }
        let mut blocks = Vec::with_capacity(n * k_pad / QK4);
        let mut sums = vec![0i32; n * groups];
        for r in 0..n {
            let row = &q[r * k..(r + 1) * k];
            for b in 0..k_pad / QK4 {
                let mut vals = [0i8; QK4];
                for (i, v) in vals.iter_mut().enumerate() {
                    *v = row.get(b * QK4 + i).copied().unwrap_or(0);
                }
                sums[r * groups + b * QK4 / group] += vals.iter().map(|&v| v as i32).sum::<i32>();
                blocks.push(BlockQ4::pack(&vals));
            }
        }
        Ok(PackedQ4::from_parts(n, k, k_pad, group, blocks, scales.to_vec(), sums))
    }

    /// A packed layer from its stored parts (an artifact, or a shape with no data yet: empty
    /// `scales` give empty tile arrays), with the tile arrays derived.
    pub fn from_parts(
        n: usize,
        k: usize,
        k_pad: usize,
        group: usize,
        blocks: Vec<BlockQ4>,
        scales: Vec<f32>,
        sums: Vec<i32>,
    ) -> PackedQ4 {
        let groups = k_pad.checked_div(group).unwrap_or(0);
        let (mut tile_scales, mut tile_sums) = (vec![], vec![]);
        if n > 0 && scales.len() == n * groups && sums.len() == n * groups {
            for t in 0..n.div_ceil(4) {
                for g in 0..groups {
                    for j in 0..4 {
                        let r = (4 * t + j).min(n - 1);
                        tile_scales.push(scales[r * groups + g]);
                        tile_sums.push(sums[r * groups + g]);
                    }
                }
            }
        }
        PackedQ4 {
            n,
            k,
            k_pad,
            group,
            blocks,
            scales,
            sums,
            tile_scales,
            tile_sums,
            channel_tiles: Default::default(),
            nibble_tiles: Default::default(),
            quad_words: Default::default(),
        }
    }

    /// [`PackedQ4::quad_words`], built on first use.
    pub fn quad_words(&self) -> &[u32] {
        // Each block unpacked once (get() per weight unpacks the whole block each time).
        self.quad_words.get_or_init(|| {
            let blocks = &self.blocks[..self.n * self.k_pad / QK4];
            let mut words = Vec::with_capacity(self.n * self.k_pad / 4);
            for block in blocks {
                for q in block.unpack().chunks_exact(4) {
                    words.push(u32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8]));
                }
            }
            words
        })
    }

    /// Scales and weight sums per (block of 32 channels, group, channel), zero for padding rows:
    /// the lane kernels' layout.
    fn lane_scales_sums(&self) -> (Aligned64<f32>, Aligned64<i32>) {
        let groups = self.groups();
        let blocks = self.n.div_ceil(32);
        let mut scales = vec![0f32; blocks * groups * 32];
        let mut sums = vec![0i32; blocks * groups * 32];
        for r in 0..self.n {
            let (cb, c) = (r / 32, r % 32);
            for g in 0..groups {
                scales[(cb * groups + g) * 32 + c] = self.scales[r * groups + g];
                sums[(cb * groups + g) * 32 + c] = self.sums[r * groups + g];
            }
        }
        (Aligned64::from_slice(&scales), Aligned64::from_slice(&sums))
    }

    /// [`NibbleTiles`] of this layer (built once).
    pub fn nibble_tiles(&self) -> &NibbleTiles {
        self.nibble_tiles.get_or_init(|| {
            let groups = self.groups();
            let blocks = self.n.div_ceil(32);
            let quads = self.group / 4;
            let mut data = vec![0x88u8; blocks * groups * quads * 64];
            for r in 0..self.n {
                let (cb, c) = (r / 32, r % 32);
                let (byte, shift) = (4 * (c % 16), 4 * (c / 16));
                for (b, block) in self.blocks[r * self.k_pad / QK4..(r + 1) * self.k_pad / QK4].iter().enumerate() {
                    for (j, &q) in block.unpack().iter().enumerate() {
                        let col = b * QK4 + j;
                        let (g, quad, i) = (col / self.group, col % self.group / 4, col % 4);
                        let at = ((cb * groups + g) * quads + quad) * 64 + byte + i;
                        data[at] = (data[at] & !(0xF << shift)) | (((q + 8) as u8) << shift);
                    }
                }
            }
            let (scales, sums) = self.lane_scales_sums();
            NibbleTiles { blocks, data: Aligned64::from_slice(&data), scales, sums }
        })
    }

    /// [`ChannelTiles`] of this layer (built once).
    pub fn channel_tiles(&self) -> &ChannelTiles {
        self.channel_tiles.get_or_init(|| {
            let groups = self.groups();
            let blocks = self.n.div_ceil(32);
            let quads = self.group / 4;
            let mut data = vec![0i8; blocks * groups * quads * 128];
            for r in 0..self.n {
                let (cb, c) = (r / 32, r % 32);
                for g in 0..groups {
                    for quad in 0..quads {
                        for i in 0..4 {
                            let col = g * self.group + quad * 4 + i;
                            data[((cb * groups + g) * quads + quad) * 128 + 4 * c + i] = self.get(r, col);
                        }
                    }
                }
            }
            let (scales, sums) = self.lane_scales_sums();
            ChannelTiles { blocks, data: Aligned64::from_slice(&data), scales, sums }
        })
    }

    /// The signed weight at `(row, col)`.
    pub fn get(&self, row: usize, col: usize) -> i8 {
        let b = &self.blocks[row * self.k_pad / QK4 + col / QK4];
        b.unpack()[col % QK4]
    }

    /// Bytes of the packed weights, scales and sums.
    pub fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<BlockQ4>() + 4 * self.scales.len() + 4 * self.sums.len()
    }
}

/// The C declaration of every packed format (kernels/c/sqil_packed.h).
pub fn c_header() -> String {
    format!(
        "/* Generated from kernels/cpu/src/packed.rs by `sqil_kernels_cpu::packed::c_header`: do not edit.\n\
         \x20* A test fails if this file and the Rust definitions drift. */\n\
         #ifndef SQIL_PACKED_H\n#define SQIL_PACKED_H\n\n#include <stdint.h>\n\n\
         /* 32 4-bit weights of one output channel along the reduction axis. Byte i holds element i\n\
         \x20* in its low nibble and element i + 16 in its high nibble; a nibble stores q + 8, q in [-8, 7]. */\n\
         #define SQIL_QK4 {QK4}\n\
         typedef struct {{\n    uint8_t qs[{half}];\n}} sqil_block_q4;\n\n\
         /* Does not compile if the size differs (C99 has no static_assert). */\n\
         typedef char sqil_block_q4_size_check[(sizeof(sqil_block_q4) == {size}) ? 1 : -1];\n\n\
         /* 32 2-bit weights: byte j holds elements j, j + 8, j + 16, j + 24 at bits 0, 2, 4, 6, each\n\
         \x20* as q + 2, q in [-2, 1]. */\n\
         typedef struct {{\n    uint8_t qs[{q2}];\n}} sqil_block_q2;\n\n\
         typedef char sqil_block_q2_size_check[(sizeof(sqil_block_q2) == {q2}) ? 1 : -1];\n\n\
         /* 32 3-bit weights, v = q + 4, q in [-4, 3]: ql holds v's low two bits as sqil_block_q2 does,\n\
         \x20* qh the high bits, bit i of the little-endian 32-bit word for element i. */\n\
         typedef struct {{\n    uint8_t ql[{q2}];\n    uint8_t qh[{qh}];\n}} sqil_block_q3;\n\n\
         typedef char sqil_block_q3_size_check[(sizeof(sqil_block_q3) == {q3}) ? 1 : -1];\n\n\
         #endif /* SQIL_PACKED_H */\n",
        half = QK4 / 2,
        size = std::mem::size_of::<BlockQ4>(),
        q2 = std::mem::size_of::<BlockQ2>(),
        qh = QK4 / 8,
        q3 = std::mem::size_of::<BlockQ3>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Aligned64` keeps its values, starts on a cache line (a copy too), and compares by value.
    #[test]
    fn aligned_buffers_keep_their_values_on_a_cache_line() {
        for len in [0usize, 1, 63, 64, 65, 1000] {
            let v: Vec<i32> = (0..len as i32).map(|i| i * 7 - 3).collect();
            let a = Aligned64::from_slice(&v);
            let b = a.clone();
            assert_eq!(&*a, &v[..]);
            assert_eq!(a, b);
            assert_eq!((a.as_ptr() as usize % 64, b.as_ptr() as usize % 64), (0, 0), "{len}");
            let bytes = Aligned64::from_slice(&vec![0x88u8; len]);
            assert_eq!((bytes.len(), bytes.as_ptr() as usize % 64), (len, 0));
        }
    }

    #[test]
    fn blocks_round_trip_and_follow_the_documented_nibble_order() {
        let mut q: [i8; QK4] = std::array::from_fn(|i| (i as i8 % 16) - 8);
        (q[0], q[16]) = (3, -5);
        let b = BlockQ4::pack(&q);
        assert_eq!(b.unpack(), q);
        // Element 0 (3 -> 11) in the low nibble of byte 0, element 16 (-5 -> 3) in its high nibble.
        assert_eq!(b.qs[0], 0x3b);
    }

    #[test]
    fn dense_blocks_round_trip_in_the_documented_order() {
        let q2: [i8; QK4] = std::array::from_fn(|i| ((i * 5) % 4) as i8 - 2);
        let b = BlockQ2::pack(&q2);
        assert_eq!(b.unpack(), q2);
        // Byte 0: elements 0, 8, 16, 24 at bits 0, 2, 4, 6 (each q + 2).
        let want = (0..4).map(|s| ((q2[8 * s] + 2) as u8) << (2 * s)).fold(0, |a, v| a | v);
        assert_eq!(b.qs[0], want);
        let q3: [i8; QK4] = std::array::from_fn(|i| ((i * 3) % 8) as i8 - 4);
        let b = BlockQ3::pack(&q3);
        assert_eq!(b.unpack(), q3);
        let qh = u32::from_le_bytes(b.qh);
        assert!((0..QK4).all(|i| ((qh >> i) & 1) as i8 == (q3[i] + 4) >> 2), "bit i of qh is element i's high bit");
        // A layer: narrowest width and its bytes.
        let (n, k) = (2, 64);
        let q: Vec<i8> = (0..n * k).map(|i| (i % 8) as i8 - 4).collect();
        let p = PackedQ4::pack(&q, &[1.0; 2], n, k, 0).unwrap();
        assert_eq!(narrowest_bits(&p), 3);
        let d = dense_bytes(&p, 3);
        assert_eq!(d.len(), p.blocks.len() * 12);
        for (j, blk) in p.blocks.iter().enumerate() {
            let b3 = BlockQ3 {
                ql: d[12 * j..12 * j + 8].try_into().unwrap(),
                qh: d[12 * j + 8..12 * j + 12].try_into().unwrap(),
            };
            assert_eq!(b3.unpack(), blk.unpack());
        }
        let q: Vec<i8> = (0..n * k).map(|i| (i % 16) as i8 - 8).collect();
        assert_eq!(narrowest_bits(&PackedQ4::pack(&q, &[1.0; 2], n, k, 0).unwrap()), 4);
    }

    #[test]
    fn packing_pads_k_and_sums_groups() {
        let (n, k) = (3, 40);
        let q: Vec<i8> = (0..n * k).map(|i| ((i * 7) % 16) as i8 - 8).collect();
        let p = PackedQ4::pack(&q, &[1.0; 3], n, k, 0).unwrap();
        assert_eq!((p.k_pad, p.group, p.blocks.len()), (64, 64, 6));
        for r in 0..n {
            for c in 0..k {
                assert_eq!(p.get(r, c), q[r * k + c]);
            }
            assert_eq!(p.get(r, 50), 0, "padding is zero");
            assert_eq!(p.sums[r], q[r * k..(r + 1) * k].iter().map(|&v| v as i32).sum::<i32>());
        }
        assert!(PackedQ4::pack(&q, &[1.0; 3], n, k, 48).is_err());
        // Tiles of four rows, the last row repeated: tile 0 = rows 0, 1, 2, 2.
        assert_eq!(p.tile_sums, vec![p.sums[0], p.sums[1], p.sums[2], p.sums[2]]);
    }

    #[test]
    fn the_committed_c_header_matches_the_rust_definitions() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../c/sqil_packed.h");
        let want = c_header();
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let got = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(got, want, "{} drifted from packed.rs (BLESS=1 regenerates it)", path.display());
    }
}
