//! `sqil build --target cuda` without a GPU: the standalone `.cu` for an MLP policy holds each
//! kernel once, one launch per lowered step, the weights and the self-test data; policies with
//! steps the GPU path lacks are refused with the step named. (nvcc builds and runs these files
//! on the GPU machine: docs/cuda.md.)

use sqil::quantize::{run_quantize, QuantizeArgs};
use sqil_passes::quant::{QuantConfig, Recipe};
use sqil_runtime::Policy;
use std::path::PathBuf;

fn quantized(name: &str) -> Policy {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/policies");
    let fp = sqil::load_model(&dir.join(format!("{name}.onnx"))).unwrap();
    let calib: Vec<PathBuf> = (0..fp.inputs.len()).map(|i| dir.join(format!("{name}.input{i}.npy"))).collect();
    let mut config = QuantConfig::default();
    config.apply_settings("wbits=4,abits=8,group=64").unwrap();
    let qa = QuantizeArgs::in_memory(Recipe::Rtn, config, calib, 64);
    Policy::from_graph(&run_quantize(&fp, &qa).unwrap().0).unwrap()
}

#[test]
fn standalone_cu_for_an_mlp_policy() {
    let p = quantized("bc_hopper");
    let l = sqil_cuda::policy::lower(&p).unwrap();
    let states = vec![vec![0.5f32; 15]];
    let want = vec![p.act(&states[0], 1).unwrap()];
    let src = sqil_codegen::cuda::emit_cu(&p, &states, &want, 0.02).unwrap();
    assert_eq!(src.matches("extern \"C\" __global__ void __launch_bounds__(128) sqil_q4_gemv_b##B(").count(), 1);
    assert_eq!(src.matches("<<<").count(), l.steps.len(), "one launch per step");
    // Sub on the fp32 observation, Div, then three int4 layers each behind its activation quantizer.
    assert_eq!(l.steps.len(), 8);
    assert_eq!(src.matches("sqil_q4_gemv_b1<<<").count(), 3);
    assert!(src.contains("cudaStreamBeginCapture") && src.contains("cudaGraphLaunch"));
    assert!(src.contains("#define STATES 1") && src.contains("static const float ST_OUT[3]"));
}

#[test]
fn unsupported_steps_are_named() {
    let e = sqil_cuda::policy::lower(&quantized("transformer")).err().expect("the transformer is not lowered yet");
    assert!(e.contains("step `"), "{e}");
}
