//! Property: printing a graph and parsing it back gives an equal graph (and the same text and
//! the same outputs), for random graphs.

use proptest::prelude::*;
use sqil_ir::interp::run;
use sqil_ir::testing::{bitwise_equal, random_graph};
use sqil_ir::{graphs_equal, parse_graph, print_graph, verify, PrintOptions};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn text_round_trip(seed in any::<u64>()) {
        let (g, feeds) = random_graph(seed);
        verify(&g).unwrap();
        let text = print_graph(&g, &PrintOptions::default()).unwrap();
        let back = parse_graph(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        verify(&back).unwrap();
        prop_assert!(graphs_equal(&g, &back).unwrap(), "graphs differ:\n{}", text);
        prop_assert_eq!(print_graph(&back, &PrintOptions::default()).unwrap(), text);
        prop_assert!(bitwise_equal(&run(&g, &feeds).unwrap(), &run(&back, &feeds).unwrap()));
        // The same with uniform constants printed as `{splat V}`.
        let splat = PrintOptions { splat: true, ..Default::default() };
        let text = print_graph(&g, &splat).unwrap();
        let back = parse_graph(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert!(graphs_equal(&g, &back).unwrap(), "splat graphs differ:\n{}", text);
    }
}

#[test]
fn splat_constants_print_compactly_and_parse_back() {
    let mut g = sqil_ir::Graph::new("g");
    let x = g.add_input(
        "x",
        sqil_ir::ValueType::new(sqil_ir::DType::F32, vec![sqil_ir::Dim::Known(1), sqil_ir::Dim::Known(4)]),
    );
    let z = g.add_const("z", sqil_ir::Tensor::zeros(sqil_ir::DType::F32, vec![1, 4]));
    let y = g.add_inferred("add", sqil_ir::Op::Binary(sqil_ir::ops::BinaryOp::Add), &[Some(x), Some(z)], "y").unwrap();
    g.outputs.push(y);
    let text = print_graph(&g, &PrintOptions { splat: true, ..Default::default() }).unwrap();
    assert!(text.contains("{splat 0.0}"), "{text}");
    assert!(graphs_equal(&g, &parse_graph(&text).unwrap()).unwrap());
}

#[test]
fn parse_errors_name_the_line() {
    let bad = "graph \"g\" (%x: f32[N,2]) -> (%y) {\n  %y = Relu(%nope) : f32[N,2]\n}\n";
    let e = parse_graph(bad).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("nope"), "{e}");
    let bad_attr = "graph \"g\" (%x: f32[N,2]) -> (%y) {\n  %y = Relu[alpah=1](%x) : f32[N,2]\n}\n";
    let e = parse_graph(bad_attr).unwrap_err().to_string();
    assert!(e.contains("alpah"), "{e}");
    let elided = "graph \"g\" () -> (%c) {\n  %c = Const[value=f32[2]{...}] : f32[2]\n}\n";
    assert!(parse_graph(elided).unwrap_err().to_string().contains("elided"));
}

#[test]
fn verifier_rejects_a_wrong_type() {
    let text = "graph \"g\" (%x: f32[N,2]) -> (%y) {\n  %y = Relu(%x) : f32[N,3]\n}\n";
    let g = parse_graph(text).unwrap();
    let e = verify(&g).unwrap_err().to_string();
    assert!(e.contains("Relu") && e.contains("f32[N,3]"), "{e}");
}
