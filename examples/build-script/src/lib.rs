//! The hopper BC policy, compiled by sqil when this crate builds (see build.rs), as a safe Rust
//! function over the generated C99: 15 observations in, 3 actions out, no allocation.

mod ffi {
    extern "C" {
        pub fn hopper_act(input0: *const f32, output0: *mut f32);
    }
}

/// Observation width of the compiled policy.
pub const OBS: usize = 15;
/// Action width of the compiled policy.
pub const ACT: usize = 3;

/// One state's actions from the 4-bit policy compiled at build time.
pub fn act(obs: &[f32; OBS]) -> [f32; ACT] {
    let mut out = [0f32; ACT];
    // SAFETY: the generated `hopper_act` reads OBS floats and writes ACT floats (hopper.h), and
    // uses only its static buffers.
    unsafe { ffi::hopper_act(obs.as_ptr(), out.as_mut_ptr()) };
    out
}

/// The policy's sample states and the CPU runtime's actions for them, computed when this crate
/// was built (little-endian f32; see build.rs).
pub const STATES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/states.bin"));
pub const RUNTIME_ACTIONS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/want.bin"));
