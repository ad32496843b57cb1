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
