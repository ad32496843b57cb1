//! Compiles the bundled hopper BC policy at build time with sqil as a library: GPTQ at W4A8
//! (groups of 64) calibrated on its sample states, planned for the CPU, printed as C99
//! (`sqil_driver::build::build_c`), compiled with the `cc` crate and linked into this crate; the
//! CPU artifact is written beside it for the test that checks the two agree.

use sqil_driver::quantize::{run_quantize, QuantizeArgs};
use sqil_passes::quant::{QuantConfig, Recipe};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../..");
    let model = root.join("testdata/policies/bc_hopper.onnx");
    let calib = root.join("testdata/policies/bc_hopper.input0.npy");
    for p in [&model, &calib] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fp = sqil_driver::load_model(&model)?;
    let mut cfg = QuantConfig::default();
    cfg.apply_settings("wbits=4,abits=8,group=64")?;
    let (sim, _, _) = run_quantize(&fp, &QuantizeArgs::in_memory(Recipe::Gptq, cfg, vec![calib.clone()], 256))?;
    let ir = out.join("hopper.sqil");
    std::fs::write(&ir, sqil_ir::print_graph(&sim, &Default::default())?)?;
    let c = out.join("c");
    let args = sqil_driver::build::BuildC { prefix: "hopper".into(), selftest: vec![], states: 0 };
    sqil_driver::build::build_c(&ir, &c, &args)?;
    cc::Build::new()
        .file(c.join("hopper.c"))
        .include(&c)
        .opt_level(2)
        .flag_if_supported("-std=c99")
        .compile("hopper_policy");
    println!("cargo:rustc-link-lib=m");
    let policy = sqil_driver::build::load_policy(&ir)?;
    let states = sqil_driver::npy::read(&calib)?.data.to_f32_vec();
    let want = policy.act(&states, states.len() / 15)?;
    let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    std::fs::write(out.join("states.bin"), le(&states))?;
    std::fs::write(out.join("want.bin"), le(&want))?;
    Ok(())
}
