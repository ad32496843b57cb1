//! The f32 paths of MaxPool and PRelu (what the CPU runtime serves) give the same bits as the
//! general path: MaxPool against its two-output form (which runs the general code), PRelu against
//! the same arithmetic written out in f64, on random data with ties, signed zeros and NaN.

use sqil_ir::ops::{AutoPad, PoolAttrs};
use sqil_ir::testing::Rng;
use sqil_ir::{Data, Op, Tensor};

fn data(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 17 {
            3 => 0.0,
            5 => -0.0,
            7 => f32::NAN,
            11 => 1.0, // ties
            _ => r.unit() * 2.0 - 1.0,
        })
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    match &t.data {
        Data::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        d => panic!("not f32: {:?}", d.dtype()),
    }
}

#[test]
fn max_pool_f32_path_matches_the_general_path() {
    let mut r = Rng::new(5);
    for (kernel, strides, pads, dil, ceil) in [
        (vec![3, 3], vec![2, 2], vec![0, 0, 0, 0], vec![1, 1], false),
        (vec![2, 2], vec![2, 2], vec![0, 0, 0, 0], vec![1, 1], true),
        (vec![3, 3], vec![1, 1], vec![1, 1, 1, 1], vec![1, 1], false),
        (vec![3, 2], vec![2, 1], vec![1, 0, 0, 1], vec![2, 1], false),
    ] {
        let p = PoolAttrs {
            auto_pad: AutoPad::NotSet,
            ceil_mode: ceil,
            count_include_pad: false,
            dilations: dil,
            kernel_shape: kernel,
            pads,
            strides,
            storage_order: 0,
        };
        let x = Tensor::new(vec![2, 3, 11, 9], Data::F32(data(&mut r, 2 * 3 * 11 * 9))).unwrap();
        let op = Op::MaxPool(p);
        let fast = op.eval(&[Some(&x)], 1).unwrap().remove(0);
        let general = op.eval(&[Some(&x)], 2).unwrap().remove(0);
        assert_eq!(fast.shape, general.shape);
        assert_eq!(bits(&fast), bits(&general));
    }
}

#[test]
fn prelu_f32_path_matches_f64_arithmetic() {
    let mut r = Rng::new(6);
    let x = Tensor::new(vec![2, 4, 5, 3], Data::F32(data(&mut r, 120))).unwrap();
    for sshape in [vec![4, 1, 1], vec![1, 4, 1, 1], vec![3], vec![1], vec![5, 3], vec![2, 4, 5, 3]] {
        let n: usize = sshape.iter().product();
        let s = Tensor::new(sshape.clone(), Data::F32((0..n).map(|_| r.unit() * 2.0 - 1.0).collect())).unwrap();
        let got = Op::PRelu.eval(&[Some(&x), Some(&s)], 1).unwrap().remove(0);
        // Reference: numpy-style broadcast of the slope, each product in f64 then rounded.
        let bc = sqil_ir::ops::Broadcast::new(&[&x.shape, &s.shape]).unwrap();
        let (xi, si) = (bc.indices(0), bc.indices(1));
        let (xv, sv) = (x.data.to_f32_vec(), s.data.to_f32_vec());
        let want: Vec<u32> = xi
            .iter()
            .zip(&si)
            .map(|(&i, &j)| {
                let v = xv[i] as f64;
                (if v < 0.0 { v * sv[j] as f64 } else { v }) as f32
            })
            .map(f32::to_bits)
            .collect();
        assert_eq!(bits(&got), want, "slope {sshape:?}");
    }
}

/// The f32 paths of the reductions (ReduceMean/Sum/Max over any axes, GlobalAveragePool) take the
/// same f64 steps in the same order as the general path: on an f32 tensor they equal the general
/// path on its f64 copy rounded to f32, with NaN, signed zeros and ties among the values.
#[test]
fn reduction_f32_paths_match_the_general_path() {
    use sqil_ir::ops::ReduceOp;
    let mut r = Rng::new(7);
    let shape = vec![2, 3, 5, 4];
    let x = Tensor::new(shape.clone(), Data::F32(data(&mut r, 120))).unwrap();
    let x64 = Tensor::new(shape, Data::F64(x.data.to_f32_vec().iter().map(|&v| v as f64).collect())).unwrap();
    let round = |t: &Tensor| -> Vec<u32> { t.data.to_f64_vec().iter().map(|&v| (v as f32).to_bits()).collect() };
    let canon = |v: Vec<u32>| -> Vec<u32> {
        v.into_iter().map(|b| if f32::from_bits(b).is_nan() { u32::MAX } else { b }).collect()
    };
    for op in [ReduceOp::Mean, ReduceOp::Sum, ReduceOp::Max] {
        for axes in [vec![1i64], vec![0, 2], vec![3], vec![-1, 1], vec![0, 1, 2, 3]] {
            for keepdims in [true, false] {
                let reduce = Op::Reduce { op, keepdims, noop_with_empty_axes: false };
                let ax = Tensor::new(vec![axes.len()], Data::I64(axes.clone())).unwrap();
                let fast = reduce.eval(&[Some(&x), Some(&ax)], 1).unwrap().remove(0);
                let general = reduce.eval(&[Some(&x64), Some(&ax)], 1).unwrap().remove(0);
                assert_eq!(fast.shape, general.shape);
                assert_eq!(canon(bits(&fast)), canon(round(&general)), "{op:?} over {axes:?}");
            }
        }
    }
    let fast = Op::GlobalAveragePool.eval(&[Some(&x)], 1).unwrap().remove(0);
    let general = Op::GlobalAveragePool.eval(&[Some(&x64)], 1).unwrap().remove(0);
    assert_eq!(canon(bits(&fast)), canon(round(&general)));
}

/// Transpose of the last two axes (tiled f32 copy) and of trailing runs give the same values as the
/// general gather (run on the same data as f64), for matrices smaller and larger than a tile.
#[test]
fn transpose_f32_paths_match_the_general_path() {
    let mut r = Rng::new(9);
    for (shape, perm) in [
        (vec![2, 3, 17, 33], vec![0, 1, 3, 2]),
        (vec![5, 7], vec![1, 0]),
        (vec![1, 40, 16], vec![0, 2, 1]),
        (vec![2, 0, 3], vec![0, 2, 1]),
        (vec![2, 5, 3, 8], vec![0, 2, 1, 3]),
        (vec![3, 4, 5], vec![2, 0, 1]),
    ] {
        let n: usize = shape.iter().product();
        let v = data(&mut r, n);
        let x = Tensor::new(shape.clone(), Data::F32(v.clone())).unwrap();
        let x64 = Tensor::new(shape.clone(), Data::F64(v.iter().map(|&a| a as f64).collect())).unwrap();
        let op = Op::Transpose { perm: Some(perm.clone()) };
        let fast = op.eval(&[Some(&x)], 1).unwrap().remove(0);
        let general = op.eval(&[Some(&x64)], 1).unwrap().remove(0);
        assert_eq!(fast.shape, general.shape, "{shape:?} {perm:?}");
        let want: Vec<u32> = general.data.to_f64_vec().iter().map(|&a| (a as f32).to_bits()).collect();
        assert_eq!(bits(&fast), want, "{shape:?} {perm:?}");
    }
}

/// Values across f32's range: the test data, magnitudes from subnormal to near overflow of both
/// signs, both infinities and zeros.
fn wide(r: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = data(r, n);
    for (i, e) in v.iter_mut().enumerate().filter(|(i, _)| i % 5 == 1) {
        let mag = 10f32.powf(r.unit() * 76.0 - 38.0) * if i % 2 == 0 { 1.0 } else { -1.0 };
        *e = mag;
    }
    v.extend([f32::INFINITY, f32::NEG_INFINITY, 1e-45, -1e-45, 3e38, -3e38, f32::MIN_POSITIVE, 0.0, -0.0]);
    v
}

fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{what} at {i}: {g:e} vs {w:e}");
    }
}

/// Sqrt and Reciprocal on f32 (the f32 operations) give the general path's bits (f64, rounded
/// once), and the profile calls them f32 kernels.
#[test]
fn sqrt_and_reciprocal_f32_paths_match_the_general_path() {
    use sqil_ir::ops::UnaryOp;
    let mut r = Rng::new(7);
    let v = wide(&mut r, 20_000);
    let x = Tensor::from_f32(vec![v.len()], v.clone()).unwrap();
    let x64 = Tensor::new(vec![v.len()], Data::F64(v.iter().map(|&e| e as f64).collect())).unwrap();
    for u in [UnaryOp::Sqrt, UnaryOp::Reciprocal] {
        let op = Op::Unary(u);
        assert_eq!(op.cpu_path(&[Some(&x)], 1), "f32 kernel");
        let fast = op.eval(&[Some(&x)], 1).unwrap().remove(0).data.to_f32_vec();
        let general: Vec<f32> =
            op.eval(&[Some(&x64)], 1).unwrap().remove(0).data.to_f64_vec().iter().map(|&e| e as f32).collect();
        same_bits(&fast, &general, u.def().name);
    }
}

/// Pow by a constant 1, 2 or 0.5 runs as f32 operations with the bits of libm's pow in f64
/// rounded once; another exponent, or one that widens the base's shape, stays on the general path.
#[test]
fn pow_by_one_two_and_a_half_matches_libm_pow() {
    let mut r = Rng::new(8);
    let v = wide(&mut r, 20_000);
    let x = Tensor::from_f32(vec![4, v.len() / 4], v[..v.len() / 4 * 4].to_vec()).unwrap();
    for (e, shape) in [(2.0f32, vec![]), (0.5, vec![1]), (1.0, vec![1, 1]), (2.0, vec![1, 1])] {
        let b = Tensor::from_f32(shape.clone(), vec![e]).unwrap();
        let op = Op::Binary(sqil_ir::ops::BinaryOp::Pow);
        assert_eq!(op.cpu_path(&[Some(&x), Some(&b)], 1), "f32 kernel", "{e} {shape:?}");
        let got = op.eval(&[Some(&x), Some(&b)], 1).unwrap().remove(0);
        assert_eq!(got.shape, x.shape);
        let want: Vec<f32> = x.data.to_f32_vec().iter().map(|&v| (v as f64).powf(e as f64) as f32).collect();
        same_bits(&got.data.to_f32_vec(), &want, &format!("pow {e}"));
    }
    for (e, shape) in [(3.0f32, vec![]), (2.0, vec![1, 1, 1])] {
        let b = Tensor::from_f32(shape, vec![e]).unwrap();
        assert_eq!(Op::Binary(sqil_ir::ops::BinaryOp::Pow).cpu_path(&[Some(&x), Some(&b)], 1), "reference (f64)");
    }
}

/// Where on f32 branches of the output's shape or one value selects directly, with the general
/// (broadcast index) path's bits; other shapes keep the general path.
#[test]
fn where_direct_path_matches_the_general_path() {
    let mut r = Rng::new(9);
    let n = 6 * 7;
    let cond = Tensor::new(vec![6, 7], Data::Bool((0..n).map(|i| i % 3 != 1).collect())).unwrap();
    let a = Tensor::from_f32(vec![6, 7], data(&mut r, n)).unwrap();
    let b = Tensor::from_f32(vec![6, 7], data(&mut r, n)).unwrap();
    let one = Tensor::from_f32(vec![1], vec![-0.0]).unwrap();
    let c1 = Tensor::new(vec![1, 1], Data::Bool(vec![false])).unwrap();
    let f64_of = |t: &Tensor| Tensor::new(t.shape.clone(), Data::F64(t.data.to_f64_vec())).unwrap();
    for (c, x, y) in [(&cond, &a, &b), (&cond, &one, &b), (&cond, &a, &one), (&c1, &a, &b)] {
        assert_eq!(Op::Where.cpu_path(&[Some(c), Some(x), Some(y)], 1), "data movement");
        let got = Op::Where.eval(&[Some(c), Some(x), Some(y)], 1).unwrap().remove(0);
        let general = Op::Where.eval(&[Some(c), Some(&f64_of(x)), Some(&f64_of(y))], 1).unwrap().remove(0);
        assert_eq!(got.shape, general.shape);
        let want: Vec<f32> = general.data.to_f64_vec().iter().map(|&e| e as f32).collect();
        same_bits(&got.data.to_f32_vec(), &want, "Where");
    }
    let row = Tensor::from_f32(vec![7], data(&mut r, 7)).unwrap();
    assert_eq!(Op::Where.cpu_path(&[Some(&cond), Some(&row), Some(&b)], 1), "reference (f64)");
}

/// BatchNormalization (inference) on f32 takes the same f64 operations per element as the
/// general path, without converting the input first: the same bits.
#[test]
fn batch_norm_f32_path_matches_the_general_path() {
    let mut r = Rng::new(10);
    let (n, c, inner) = (3, 5, 4 * 3);
    let x = Tensor::from_f32(vec![n, c, 4, 3], wide(&mut r, n * c * inner)[..n * c * inner].to_vec()).unwrap();
    let chan = |r: &mut Rng, lo: f32| Tensor::from_f32(vec![c], (0..c).map(|_| lo + r.unit() * 2.0).collect()).unwrap();
    let (scale, bias, mean, var) = (chan(&mut r, -1.0), chan(&mut r, -1.0), chan(&mut r, -1.0), chan(&mut r, 0.0));
    let op = Op::BatchNorm { epsilon: 1e-5, momentum: 0.9, training: false };
    let ins = |x: &Tensor| -> Vec<Tensor> { vec![x.clone(), scale.clone(), bias.clone(), mean.clone(), var.clone()] };
    let fast_in = ins(&x);
    let refs: Vec<Option<&Tensor>> = fast_in.iter().map(Some).collect();
    assert_eq!(op.cpu_path(&refs, 1), "f32 kernel");
    let got = op.eval(&refs, 1).unwrap().remove(0);
    let x64 = Tensor::new(x.shape.clone(), Data::F64(x.data.to_f64_vec())).unwrap();
    let gen_in = ins(&x64);
    let refs: Vec<Option<&Tensor>> = gen_in.iter().map(Some).collect();
    let general = op.eval(&refs, 1).unwrap().remove(0);
    let want: Vec<f32> = general.data.to_f64_vec().iter().map(|&e| e as f32).collect();
    same_bits(&got.data.to_f32_vec(), &want, "BatchNormalization");
}

/// AveragePool's f32 path (every output's chain advanced tap by tap) gives the general path's
/// bits, with and without counted padding, strides, dilations and ceil mode.
#[test]
fn average_pool_f32_path_matches_the_general_path() {
    let mut r = Rng::new(11);
    for (kernel, strides, pads, dil, ceil, count_pad) in [
        (vec![3, 3], vec![2, 2], vec![0, 0, 0, 0], vec![1, 1], false, false),
        (vec![2, 2], vec![2, 2], vec![0, 0, 0, 0], vec![1, 1], true, false),
        (vec![3, 3], vec![1, 1], vec![1, 1, 1, 1], vec![1, 1], false, true),
        (vec![3, 2], vec![2, 1], vec![1, 0, 0, 1], vec![2, 1], false, false),
    ] {
        let p = PoolAttrs {
            auto_pad: AutoPad::NotSet,
            ceil_mode: ceil,
            count_include_pad: count_pad,
            dilations: dil,
            kernel_shape: kernel,
            pads,
            strides,
            storage_order: 0,
        };
        let x =
            Tensor::new(vec![2, 3, 11, 9], Data::F32(wide(&mut r, 2 * 3 * 11 * 9)[..2 * 3 * 11 * 9].to_vec())).unwrap();
        let op = Op::AveragePool(p);
        assert_eq!(op.cpu_path(&[Some(&x)], 1), "f32 kernel");
        let fast = op.eval(&[Some(&x)], 1).unwrap().remove(0);
        let x64 = Tensor::new(x.shape.clone(), Data::F64(x.data.to_f64_vec())).unwrap();
        let general = op.eval(&[Some(&x64)], 1).unwrap().remove(0);
        assert_eq!(fast.shape, general.shape);
        let want: Vec<f32> = general.data.to_f64_vec().iter().map(|&e| e as f32).collect();
        same_bits(&fast.data.to_f32_vec(), &want, "AveragePool");
    }
}

/// QuantizeLinear and DequantizeLinear per tensor with an f32 scale (the runtime's path) give the
/// per-axis general path's values when every channel has that scale and zero point: int8 and
/// uint8, zero points at both ends, values past the range, halfway cases, NaN.
#[test]
fn per_tensor_quantize_linear_matches_the_general_path() {
    let mut r = Rng::new(12);
    let c = 6;
    let mut v = wide(&mut r, c * 500);
    v.truncate(c * 500);
    // Halfway between levels of 0.05.
    v.iter_mut().step_by(7).enumerate().for_each(|(i, e)| *e = (i as f32 - 40.0 + 0.5) * 0.05);
    let x = Tensor::from_f32(vec![500, c], v).unwrap();
    for (dt, z) in
        [(sqil_ir::DType::I8, -128i64), (sqil_ir::DType::I8, 5), (sqil_ir::DType::U8, 255), (sqil_ir::DType::U8, 0)]
    {
        let (s1, sc) =
            (Tensor::from_f32(vec![], vec![0.05]).unwrap(), Tensor::from_f32(vec![c], vec![0.05; c]).unwrap());
        let zt = |n: Vec<usize>| {
            Tensor::new(n.clone(), sqil_ir::Data::from_i64(dt, std::iter::repeat_n(z, n.iter().product()))).unwrap()
        };
        let (z1, zc) = (zt(vec![]), zt(vec![c]));
        let q = Op::QuantizeLinear { axis: 1, block_size: 0, output_dtype: None, saturate: true };
        assert_eq!(q.cpu_path(&[Some(&x), Some(&s1), Some(&z1)], 1), "f32 kernel");
        let fast = q.eval(&[Some(&x), Some(&s1), Some(&z1)], 1).unwrap().remove(0);
        let general = q.eval(&[Some(&x), Some(&sc), Some(&zc)], 1).unwrap().remove(0);
        assert_eq!(fast, general, "QuantizeLinear {dt:?} zero {z}");
        let d = Op::DequantizeLinear { axis: 1, block_size: 0 };
        assert_eq!(d.cpu_path(&[Some(&fast), Some(&s1), Some(&z1)], 1), "f32 kernel");
        let fast_d = d.eval(&[Some(&fast), Some(&s1), Some(&z1)], 1).unwrap().remove(0);
        let general_d = d.eval(&[Some(&general), Some(&sc), Some(&zc)], 1).unwrap().remove(0);
        same_bits(&fast_d.data.to_f32_vec(), &general_d.data.to_f32_vec(), "DequantizeLinear");
        assert_eq!(d.cpu_path(&[Some(&fast), Some(&sc), Some(&zc)], 1), "reference (f64)");
    }
}

/// Softmax and LogSoftmax on f32 (the row kernels; an axis that is not the innermost through a
/// transpose to rows and back) equal the general f64 loop on the same values rounded to f32, bit
/// for bit: every axis of a rank-4 tensor, the 2-D coercion, rows with NaN, infinities and ties.
#[test]
fn softmax_f32_paths_match_the_general_path() {
    let mut r = Rng::new(11);
    let shape = vec![2, 5, 3, 7];
    let mut v: Vec<f32> = data(&mut r, 210).iter().map(|a| a * 9.0).collect();
    v[20] = f32::INFINITY;
    v[41] = f32::NEG_INFINITY;
    let x = Tensor::new(shape.clone(), Data::F32(v.clone())).unwrap();
    let x64 = Tensor::new(shape, Data::F64(v.iter().map(|&a| a as f64).collect())).unwrap();
    let canon = |t: Vec<u32>| -> Vec<u32> {
        t.into_iter().map(|b| if f32::from_bits(b).is_nan() { u32::MAX } else { b }).collect()
    };
    for log in [false, true] {
        for axis in [-4i64, 1, 2, 3] {
            for coerce_2d in [false, true] {
                let op = if log { Op::LogSoftmax { axis, coerce_2d } } else { Op::Softmax { axis, coerce_2d } };
                assert_eq!(op.cpu_path(&[Some(&x)], 1), "f32 kernel");
                let fast = op.eval(&[Some(&x)], 1).unwrap().remove(0);
                let general = op.eval(&[Some(&x64)], 1).unwrap().remove(0);
                let want: Vec<u32> = general.data.to_f64_vec().iter().map(|&a| (a as f32).to_bits()).collect();
                assert_eq!(canon(bits(&fast)), canon(want), "log {log} axis {axis} coerce {coerce_2d}");
            }
        }
    }
}

/// Exp and Log on f32 (the screened vector forms) equal the general f64 path rounded to f32, bit
/// for bit, over values from subnormal to overflowing results (and zero, negative and NaN inputs
/// for Log), and take the f32 path.
#[test]
fn exp_and_log_f32_paths_match_the_general_path() {
    use sqil_ir::ops::UnaryOp;
    let mut r = Rng::new(12);
    let mut v: Vec<f32> = wide(&mut r, 300);
    v.extend((0..700).map(|_| (r.unit() * 2.0 - 1.0) * 100.0));
    let x = Tensor::new(vec![v.len()], Data::F32(v.clone())).unwrap();
    let x64 = Tensor::new(vec![v.len()], Data::F64(v.iter().map(|&a| a as f64).collect())).unwrap();
    let canon = |b: u32| if f32::from_bits(b).is_nan() { u32::MAX } else { b };
    for u in [UnaryOp::Exp, UnaryOp::Log] {
        let op = Op::Unary(u);
        assert_eq!(op.cpu_path(&[Some(&x)], 1), "f32 kernel");
        let fast = op.eval(&[Some(&x)], 1).unwrap().remove(0);
        let general = op.eval(&[Some(&x64)], 1).unwrap().remove(0);
        let want: Vec<u32> = general.data.to_f64_vec().iter().map(|&a| canon((a as f32).to_bits())).collect();
        assert_eq!(bits(&fast).into_iter().map(canon).collect::<Vec<_>>(), want, "{u:?}");
    }
}
