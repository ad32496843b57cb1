//! Prints the compiled policy's actions for one state: `cargo run -p sqil-example-build-script`.

fn main() {
    let obs = [0.1f32; sqil_example_build_script::OBS];
    println!("actions {:?}", sqil_example_build_script::act(&obs));
}
