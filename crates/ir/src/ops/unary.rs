//! The element-wise functions of one float input, defined once: each op's IR / ONNX name, its
//! f64 semantics (the interpreter evaluates in f64 and rounds once to the value's type), its
//! derivative (the gradient pass), and its C and CUDA expressions. Adding an op is one entry in
//! [`unary_ops!`] below (plus its ONNX node tests in `testdata/onnx-node-tests.txt` and, for the
//! PyTorch peer, `tools/sqil_tools/onnx_torch.py`); every back end reads the table, so none can
//! miss it (docs/ir.md, "Adding an op").

/// One element-wise function of one input: everything a pass or back end needs to know.
#[derive(Clone, Copy, Debug)]
pub struct UnaryDef {
    pub op: UnaryOp,
    /// The IR text and ONNX op_type name.
    pub name: &'static str,
    /// Reference semantics in f64 (rounded once to the value's type by the interpreter).
    pub f: fn(f64) -> f64,
    /// The derivative `dy/dx` at `x`, in f64.
    pub df: fn(f64) -> f64,
    /// C99 expression of one f32 value: `{v}` is the float, `{d}` the same as double. With
    /// `libm`, computed through libm in double and rounded once, like the interpreter (libm
    /// functions may differ in the last bit: the C report does not promise bit-exactness);
    /// without, exact in f32.
    pub c: &'static str,
    pub libm: bool,
    /// CUDA expression of one f32 value `{a}`: in double and rounded once, like `f`, where it is
    /// not exact in f32.
    pub cuda: &'static str,
}

impl UnaryDef {
    /// The C expression on float variable `v`.
    pub fn c_expr(&self, v: &str) -> String {
        self.c.replace("{d}", &format!("(double){v}")).replace("{v}", v)
    }

    /// The CUDA expression on float operand `a`.
    pub fn cuda_expr(&self, a: &str) -> String {
        self.cuda.replace("{a}", a)
    }
}

// sqil's logistic function (`exp_nonpos` inside: the same bits on every CPU, and the f32 path
// of the CPU runtime vectorizes it exactly).
use sqil_kernels_cpu::generic::sigmoid;

// sqil's softplus: `max(x, 0) + log1p(e^-|x|)` from `exp_nonpos` and a series log1p (the same
// bits on every CPU; the CPU runtime's f32 path vectorizes it exactly).
use sqil_kernels_cpu::generic::softplus;

/// ONNX HardSwish: `x * max(0, min(1, x / 6 + 1 / 2))` (the definition lives with its vector
/// form in the kernels).
pub(crate) use sqil_kernels_cpu::generic::hard_swish;

macro_rules! unary_ops {
    ($($(#[$doc:meta])* $v:ident = $name:literal { f: $f:expr, df: $df:expr, c: $c:expr, libm: $libm:expr, cuda: $cuda:expr $(,)? }),* $(,)?) => {
        /// Element-wise functions of one float input (see [`UNARY_OPS`]).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum UnaryOp {
            $($(#[$doc])* $v),*
        }

        /// Every [`UnaryOp`] with its definition, in declaration order.
        pub const UNARY_OPS: &[UnaryDef] = &[
            $(UnaryDef { op: UnaryOp::$v, name: $name, f: $f, df: $df, c: $c, libm: $libm, cuda: $cuda }),*
        ];

        impl UnaryOp {
            /// This op's definition.
            pub fn def(self) -> &'static UnaryDef {
                &UNARY_OPS[self as usize]
            }
        }
    };
}

unary_ops! {
    Neg = "Neg" { f: |x| -x, df: |_| -1.0, c: "-{v}", libm: false, cuda: "-{a}" },
    Abs = "Abs" {
        f: f64::abs,
        df: |x| if x > 0.0 { 1.0 } else if x < 0.0 { -1.0 } else { 0.0 },
        c: "{v} < 0.0f ? -{v} : ({v} == 0.0f ? 0.0f : {v})",
        libm: false,
        cuda: "fabsf({a})",
    },
    /// `x < 0 ? 0 : x`: NaN and -0 pass.
    Relu = "Relu" {
        f: |x| if x < 0.0 { 0.0 } else { x },
        df: |x| if x > 0.0 { 1.0 } else { 0.0 },
        c: "{v} < 0.0f ? 0.0f : {v}",
        libm: false,
        cuda: "{a} < 0.0f ? 0.0f : {a}",
    },
    /// sqil's tanh (`exp_nonpos` inside; the CPU runtime's f32 path vectorizes it exactly).
    Tanh = "Tanh" { f: sqil_kernels_cpu::generic::tanh, df: |x| 1.0 - x.tanh().powi(2), c: "(float)tanh({d})", libm: true, cuda: "(float)sqil_tanh((double){a})" },
    Sigmoid = "Sigmoid" {
        f: sigmoid,
        df: |x| sigmoid(x) * (1.0 - sigmoid(x)),
        c: "(float)({v} >= 0.0f ? 1.0 / (1.0 + exp(-{d})) : exp({d}) / (1.0 + exp({d})))",
        libm: true,
        cuda: "(float)sqil_sigmoid((double){a})",
    },
    Softplus = "Softplus" {
        f: softplus,
        df: |x| 1.0 / (1.0 + (-x).exp()),
        c: "(float)(({v} > 0.0f ? {d} : 0.0) + log1p(exp(-fabs({d}))))",
        libm: true,
        cuda: "(float)sqil_softplus((double){a})",
    },
    Exp = "Exp" { f: f64::exp, df: f64::exp, c: "(float)exp({d})", libm: true, cuda: "(float)exp((double){a})" },
    Log = "Log" { f: f64::ln, df: |x| 1.0 / x, c: "(float)log({d})", libm: true, cuda: "(float)log((double){a})" },
    Sqrt = "Sqrt" { f: f64::sqrt, df: |x| 0.5 / x.sqrt(), c: "(float)sqrt({d})", libm: true, cuda: "(float)sqrt((double){a})" },
    Erf = "Erf" {
        f: libm::erf,
        df: |x| 2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp(),
        c: "(float)erf({d})",
        libm: true,
        cuda: "(float)erf((double){a})",
    },
    Reciprocal = "Reciprocal" { f: |x| 1.0 / x, df: |x| -1.0 / (x * x), c: "(float)(1.0 / {d})", libm: true, cuda: "(float)(1.0 / (double){a})" },
    /// `x * max(0, min(1, x / 6 + 1/2))` (MobileNetV3's activation).
    HardSwish = "HardSwish" {
        f: hard_swish,
        df: |x| if x < -3.0 { 0.0 } else if x > 3.0 { 1.0 } else { x / 3.0 + 0.5 },
        c: "(float)({d} * ({d} / 6.0 + 0.5 < 0.0 ? 0.0 : ({d} / 6.0 + 0.5 > 1.0 ? 1.0 : {d} / 6.0 + 0.5)))",
        libm: false,
        cuda: "(float)((double){a} * ((double){a} / 6.0 + 0.5 < 0.0 ? 0.0 : ((double){a} / 6.0 + 0.5 > 1.0 ? 1.0 : (double){a} / 6.0 + 0.5)))",
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_indexed_by_the_enum() {
        for (i, d) in UNARY_OPS.iter().enumerate() {
            assert_eq!(d.op as usize, i);
            assert_eq!(d.op.def().name, d.name);
        }
    }

    #[test]
    fn derivatives_match_finite_differences() {
        for d in UNARY_OPS {
            for x in [-2.3, -0.7, 0.4, 1.9] {
                let x: f64 = if matches!(d.op, UnaryOp::Log | UnaryOp::Sqrt) { f64::abs(x) } else { x };
                let h = 1e-6;
                let fd = ((d.f)(x + h) - (d.f)(x - h)) / (2.0 * h);
                assert!((fd - (d.df)(x)).abs() < 1e-5 * (1.0 + fd.abs()), "{} at {x}: {fd} vs {}", d.name, (d.df)(x));
            }
        }
    }
}
