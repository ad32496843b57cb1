//! The C linked at build time gives the CPU runtime's actions on the artifact of the same build,
//! bit for bit, on the policy's sample states.

#[test]
fn build_time_c_matches_the_runtime_bit_for_bit() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let x: ndarray::Array2<f32> = ndarray_npy::read_npy(root.join("testdata/policies/bc_hopper.input0.npy")).unwrap();
    let v: Vec<f32> = x.iter().copied().collect();
    let policy = sqil_runtime::Policy::load(std::path::Path::new(sqil_example_build_script::ARTIFACT)).unwrap();
    let mut states = 0;
    for row in v.chunks(sqil_example_build_script::OBS) {
        let obs: [f32; 15] = row.try_into().unwrap();
        let got = sqil_example_build_script::act(&obs);
        let want = policy.act(row, 1).unwrap();
        assert_eq!(got.map(f32::to_bits).to_vec(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        states += 1;
    }
    assert!(states >= 8, "{states} states");
}
