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
