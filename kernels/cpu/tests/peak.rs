//! The ceiling probes measure something: positive, finite rates where the CPU has the
//! instructions, `None` where it has not.

#[test]
fn ceilings_are_measured_where_the_instructions_exist() {
    let (i8, f32) = (sqil_kernels_cpu::peak::int8_gmacs(), sqil_kernels_cpu::peak::f32_gmacs());
    #[cfg(target_arch = "x86_64")]
    {
        assert_eq!(i8.is_some(), std::is_x86_feature_detected!("avx2"));
        assert_eq!(f32.is_some(), std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"));
    }
    for v in [i8, f32].into_iter().flatten() {
        // Any core that has the instructions runs well over 1 G multiply-accumulates per second.
        assert!(v.is_finite() && v > 1.0, "ceiling {v} GMAC/s");
    }
}
