//! The C linked at build time gives the CPU runtime's actions (computed by the same build from
//! the same quantized policy) bit for bit, on the policy's sample states.

use sqil_example_build_script::{act, ACT, OBS, RUNTIME_ACTIONS, STATES};

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn build_time_c_matches_the_runtime_bit_for_bit() {
    let (states, want) = (floats(STATES), floats(RUNTIME_ACTIONS));
    assert_eq!(states.len() / OBS, want.len() / ACT, "one action row per state");
    assert!(states.len() / OBS >= 8, "{} states", states.len() / OBS);
    for (row, w) in states.chunks(OBS).zip(want.chunks(ACT)) {
        let got = act(row.try_into().unwrap());
        assert_eq!(got.map(f32::to_bits).to_vec(), w.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }
}
