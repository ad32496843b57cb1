//! Quantization recipes and config: the quantizer matches the IR's FakeQuant bit for bit, GPTQ
//! and MSE clipping beat plain rounding on their objectives, calibration methods order as
//! they should, configs load from JSON and TOML with errors that name the field, and the
//! whole `quantize` keeps the graph verifying and its FakeQuant lowering bit-exact.

use sqil_ir::interp::run;
use sqil_ir::testing::Rng;
use sqil_ir::{Graph, Op, Tensor, ValueType};
use sqil_passes::quant::calibrate::calibrate;
use sqil_passes::quant::layers::{find_layers, WeightView};
use sqil_passes::quant::weights::{gptq, round_to_nearest, simulated, Quantizer};
use sqil_passes::quant::{quantize, ActCalib, QuantConfig, Recipe};
use sqil_passes::{PassCtx, PassManager};
use std::collections::HashMap;

fn mlp(r: &mut Rng, k: usize, n: usize) -> Graph {
    let mut g = Graph::new("mlp");
    let x = g.add_input(
        "x",
        ValueType::new(sqil_ir::DType::F32, vec![sqil_ir::Dim::Sym("N".into()), sqil_ir::Dim::Known(k)]),
    );
    let w = g.add_const("w", r.tensor(vec![n, k], 0.5));
    let b = g.add_const("b", r.tensor(vec![n], 0.1));
    let op = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
    let h = g.add_inferred("fc", op, &[Some(x), Some(w), Some(b)], "h").unwrap();
    let y = g.add_inferred("act", Op::Unary(sqil_ir::ops::UnaryOp::Tanh), &[Some(h)], "y").unwrap();
    g.outputs.push(y);
    g
}

/// Correlated inputs (a low-rank mix plus noise), as real layer inputs are.
fn inputs(r: &mut Rng, rows: usize, k: usize) -> Vec<f32> {
    let basis: Vec<f32> = (0..3 * k).map(|_| r.unit()).collect();
    let mut out = Vec::with_capacity(rows * k);
    for _ in 0..rows {
        let c = [r.unit() * 2.0, r.unit(), r.unit() * 0.5];
        for j in 0..k {
            out.push(c[0] * basis[j] + c[1] * basis[k + j] + c[2] * basis[2 * k + j] + r.unit() * 0.05);
        }
    }
    out
}

#[test]
fn quantizer_matches_fake_quant_op() {
    let mut r = Rng::new(7);
    let x = r.tensor(vec![5, 8], 3.0);
    for (bits, s, z) in [(4u8, 0.37f32, 0.0f32), (3, 0.11, -2.0), (8, 0.013, 5.0), (2, 0.9, 1.0)] {
        let q = Quantizer { bits, symmetric: z == 0.0 };
        let op = Op::FakeQuant { bits, signed: true, axis: 0, block_size: 0 };
        let out = op.eval(&[Some(&x), Some(&Tensor::scalar_f32(s)), Some(&Tensor::scalar_f32(z))], 1).unwrap();
        let want: Vec<f32> = x.data.to_f32_vec().iter().map(|&v| q.fq(v, s, z)).collect();
        assert_eq!(out[0].data.to_f32_vec(), want, "{bits} bits");
    }
}

#[test]
fn gptq_and_mse_beat_round_to_nearest() {
    let mut r = Rng::new(11);
    let (k, n, rows) = (64, 16, 512);
    let g = mlp(&mut r, k, n);
    let layer = &find_layers(&g).unwrap()[0];
    let cfg =
        QuantConfig { wbits: 3, granularity: sqil_passes::quant::Granularity::Group, group: 32, ..Default::default() };
    let view = WeightView::new(layer, g.const_value(layer.w).unwrap(), &cfg).unwrap();
    let x = inputs(&mut r, rows, k);
    let q = Quantizer { bits: 3, symmetric: true };
    let out_err = |w: &[f32]| -> f64 {
        let mut e = 0.0;
        for row in 0..rows {
            for o in 0..n {
                let y: f32 = (0..k).map(|j| x[row * k + j] * view.w[o * k + j]).sum();
                let yq: f32 = (0..k).map(|j| x[row * k + j] * w[o * k + j]).sum();
                e += ((y - yq) as f64).powi(2);
            }
        }
        e
    };
    let rtn = round_to_nearest(&view, q, false);
    let mse = round_to_nearest(&view, q, true);
    let gp = gptq(&view, q, &x, rows, false).unwrap();
    let (e_rtn, e_gptq) = (out_err(&simulated(&view, q, &rtn)), out_err(&simulated(&view, q, &gp)));
    assert!(e_gptq < 0.8 * e_rtn, "gptq {e_gptq} vs rtn {e_rtn}");
    let werr = |w: &[f32]| view.w.iter().zip(w).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
    assert!(werr(&simulated(&view, q, &mse)) <= werr(&simulated(&view, q, &rtn)));
    // GPTQ's stored values are on its grid: FakeQuant leaves them unchanged.
    assert_eq!(simulated(&view, q, &gp), gp.w);
}

#[test]
fn calibration_methods_order() {
    let mut r = Rng::new(3);
    let mut x: Vec<f32> = (0..20000).map(|_| r.unit()).collect();
    x[17] = 40.0; // one outlier
    let q = Quantizer { bits: 8, symmetric: false };
    let (s_mm, _) = calibrate(&x, q, ActCalib::MinMax, 99.99);
    let (s_p, _) = calibrate(&x, q, ActCalib::Percentile, 99.9);
    let (s_mse, _) = calibrate(&x, q, ActCalib::Mse, 99.99);
    assert!(s_p < s_mm / 5.0, "percentile ignores the outlier: {s_p} vs {s_mm}");
    assert!(s_mse <= s_mm);
}

#[test]
fn config_loads_json_and_toml_and_names_bad_fields() {
    let dir = std::env::temp_dir().join(format!("sqil-qcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let j = dir.join("q.json");
    std::fs::write(&j, r#"{"wbits": 3, "abits": null, "granularity": "channel", "layers": {"fc": {"wbits": 8}}}"#)
        .unwrap();
    let c = QuantConfig::load(&j).unwrap();
    assert_eq!(
        (c.wbits, c.abits, c.weight_bits("fc", false, false), c.weight_bits("other", false, false)),
        (3, None, Some(8), Some(3))
    );
    let t = dir.join("q.toml");
    std::fs::write(&t, "wbits = 2\nabits = 4\nkeep_first = true\n").unwrap();
    let c = QuantConfig::load(&t).unwrap();
    assert_eq!((c.wbits, c.abits, c.weight_bits("a", true, false)), (2, Some(4), None));
    std::fs::write(&j, r#"{"wbitz": 3}"#).unwrap();
    let e = QuantConfig::load(&j).unwrap_err().to_string();
    assert!(e.contains("q.json") && e.contains("wbitz"), "{e}");
    std::fs::write(&j, r#"{"wbits": 5}"#).unwrap();
    assert!(QuantConfig::load(&j).unwrap_err().to_string().contains("wbits: 5"));
    let mut c = QuantConfig::default();
    assert!(c.apply_settings("group=channel,abits=float,calib=mse").is_ok());
    assert!(c.apply_settings("bits=4").unwrap_err().to_string().contains("unknown quant setting `bits`"));
}

#[test]
fn quantize_then_lower_is_bit_exact() {
    let mut r = Rng::new(5);
    let g = mlp(&mut r, 24, 8);
    let x = r.tensor(vec![64, 24], 1.5);
    let feeds = vec![HashMap::from([("x".to_string(), x.clone())])];
    for recipe in Recipe::ALL {
        for cfg in
            ["wbits=4 abits=8 group=8", "wbits=3 abits=4 group=channel wsym=false", "wbits=8 abits=float group=tensor"]
        {
            let mut c = QuantConfig::default();
            c.apply_settings(cfg).unwrap();
            let (sim, report) = quantize(&g, &c, recipe, &feeds).unwrap();
            sqil_ir::verify(&sim).unwrap();
            assert!(report.action_mse > 0.0 && report.action_mse < 0.1, "{recipe:?} {cfg}: {}", report.action_mse);
            let mut low = sim.clone();
            PassManager::from_names(&["lower-quant", "dce"]).unwrap().run(&mut low, &mut PassCtx::default()).unwrap();
            assert!(!low.g.node_indices().any(|n| matches!(low.node(n).op, Op::FakeQuant { .. })));
            let f = HashMap::from([("x".to_string(), x.clone())]);
            assert!(
                sqil_ir::testing::bitwise_equal(&run(&sim, &f).unwrap(), &run(&low, &f).unwrap()),
                "{recipe:?} {cfg}"
            );
        }
    }
}

/// The input FakeQuants of a quantized graph: (the value they read, bits).
fn act_quants(g: &Graph) -> Vec<(String, u8)> {
    g.topo_order()
        .unwrap()
        .into_iter()
        .filter_map(|n| match g.node(n).op {
            Op::FakeQuant { bits, .. } => {
                let x = g.inputs_of(n)[0].unwrap();
                g.const_value(x).is_none().then(|| (g.value(x).name.clone(), bits))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn the_raw_vector_input_stays_float_unless_asked() {
    let mut r = Rng::new(11);
    let mut g = mlp(&mut r, 6, 4);
    // A second layer reads the first's output: its input is not raw.
    let w2 = g.add_const("w2", r.tensor(vec![3, 4], 0.5));
    let op = Op::Gemm { alpha: 1.0, beta: 0.0, trans_a: false, trans_b: true };
    let y2 = g.add_inferred("fc2", op, &[Some(g.outputs[0]), Some(w2), None], "y2").unwrap();
    g.outputs = vec![y2];
    let x = Tensor::from_f32(vec![32, 6], inputs(&mut r, 32, 6)).unwrap();
    let calib = vec![HashMap::from([("x".to_string(), x)])];
    let (sim, rep) = quantize(&g, &QuantConfig::default(), Recipe::Rtn, &calib).unwrap();
    assert_eq!(act_quants(&sim), vec![("y".to_string(), 8)]);
    assert_eq!(rep.layers.iter().map(|l| l.abits).collect::<Vec<_>>(), vec![None, Some(8)]);
    let mut cfg = QuantConfig::default();
    cfg.apply_settings("raw_input=quant").unwrap();
    let (sim, _) = quantize(&g, &cfg, Recipe::Rtn, &calib).unwrap();
    assert_eq!(act_quants(&sim), vec![("x".to_string(), 8), ("y".to_string(), 8)]);
    // A layer's own override wins over the default.
    let mut cfg = QuantConfig::default();
    cfg.layers.insert("fc".into(), sqil_passes::quant::config::LayerOverride { abits: Some(4), ..Default::default() });
    let (sim, _) = quantize(&g, &cfg, Recipe::Rtn, &calib).unwrap();
    assert_eq!(act_quants(&sim), vec![("x".to_string(), 4), ("y".to_string(), 8)]);
    assert!(cfg.clone().apply_settings("raw_input=maybe").is_err());
}

#[test]
fn per_feature_scales_rescue_a_raw_input_of_mixed_ranges() {
    // Features spanning four orders of magnitude: one 8-bit scale per tensor rounds the small
    // ones to zero; per-feature scales folded into the weights keep them.
    let mut r = Rng::new(5);
    let g = mlp(&mut r, 6, 8);
    let ranges = [100.0f32, 0.01, 1.0, 30.0, 0.05, 3.0];
    let x: Vec<f32> = (0..256 * 6).map(|i| r.unit() * ranges[i % 6]).collect();
    let calib = vec![HashMap::from([("x".to_string(), Tensor::from_f32(vec![256, 6], x).unwrap())])];
    let mse = |setting: &str| {
        let mut cfg = QuantConfig::default();
        cfg.apply_settings(&format!("wbits=8,abits=8,group=channel,raw_input={setting}")).unwrap();
        let (sim, rep) = quantize(&g, &cfg, Recipe::Rtn, &calib).unwrap();
        (rep.action_mse, sim)
    };
    let (quant, _) = mse("quant");
    let (scaled, sim) = mse("scaled");
    let (float, _) = mse("float");
    assert!(scaled < quant / 2.0, "scaled {scaled} vs per-tensor {quant}");
    assert!(float <= scaled, "float {float} vs scaled {scaled}");
    // The input is divided by the factors in front of an 8-bit quantizer.
    assert_eq!(act_quants(&sim), vec![("fc.awq.x".to_string(), 8)]);
}

/// A convolution's input rows for GPTQ / AWQ (one row per image and output position, the taps
/// of every input channel) are read straight from the images at the positions kept, equal to
/// the convolution's definition with padding, strides and dilations, all rows or a spread.
#[test]
fn conv_input_rows_follow_the_definition() {
    use sqil_passes::quant::layers::input_matrix;
    let mut r = Rng::new(7);
    let (c, h, w, m, kh, kw) = (2usize, 7usize, 6usize, 3usize, 3usize, 2usize);
    let ws: Vec<String> =
        r.tensor(vec![m, c, kh, kw], 1.0).data.to_f32_vec().iter().map(|v| format!("{v:?}")).collect();
    let src = format!(
        "graph \"g\" (%x: f32[N,{c},{h},{w}]) -> (%y) {{\n  %w = Const[value=f32[{m},{c},{kh},{kw}]{{{}}}] : f32[{m},{c},{kh},{kw}]\n  \
         %y = Conv[auto_pad=\"NOTSET\", dilations=[2,1], group=1, kernel_shape=[{kh},{kw}], pads=[1,0,2,1], strides=[2,1]](%x, %w) @\"conv\" : f32[N,{m},3,6]\n}}\n",
        ws.join(", ")
    );
    let g = sqil_ir::parse_graph(&src).unwrap();
    let layer = find_layers(&g).unwrap().remove(0);
    let n = 3;
    let x = r.tensor(vec![n, c, h, w], 1.0);
    let xv = x.data.to_f32_vec();
    let (oh, ow) = ((h + 1 + 2 - (2 * (kh - 1) + 1)) / 2 + 1, (w + 1 - kw) + 1);
    let k = c * kh * kw;
    let mut want = vec![];
    for img in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let (iy, ix) = ((oy * 2 + ky * 2) as isize - 1, (ox + kx) as isize);
                            let inside = iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < w;
                            want.push(if inside {
                                xv[((img * c + ch) * h + iy as usize) * w + ix as usize]
                            } else {
                                0.0
                            });
                        }
                    }
                }
            }
        }
    }
    let total = n * oh * ow;
    let (rows, got) = input_matrix(&g, &layer, &x, 10_000).unwrap();
    assert_eq!((rows, got.len()), (total, want.len()));
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    let (rows, got) = input_matrix(&g, &layer, &x, 7).unwrap();
    assert_eq!(rows, 7);
    for (j, row) in got.chunks(k).enumerate() {
        let src = j * total / 7;
        assert_eq!(row, &want[src * k..(src + 1) * k], "kept row {j} (row {src})");
    }
}
