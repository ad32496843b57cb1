//! `sqil._sqil`, the extension module of the `sqil` Python package (crates/python/python/sqil):
//! every command of the `sqil` command line (`_run`: the same parser, defaults, checks and
//! messages, run with the GIL released), and policies that act from Python with sqil's reference
//! interpreter (ONNX, IR text) or a compiled CPU artifact (`policy.bin`) on the runtime's int4
//! kernels, so closed-loop evaluation (tools/eval.py) can use sqil itself.
//!
//! `pip install ./crates/python` builds the package (maturin); `tools/build_binding.sh` builds it
//! into `tools/.binding/sqil/` for the repository's own tools.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, ToPyArray};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use sqil_ir::interp::Interpreter;
use sqil_ir::{Data, Graph, Tensor};
use sqil_runtime::Execute;
use std::collections::HashMap;
use std::path::Path;

fn err(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A loaded policy: its graph, and for a compiled artifact the runtime plan that runs it.
#[pyclass(module = "sqil")]
struct Policy {
    graph: Graph,
    plan: Option<sqil_runtime::Plan>,
}

#[pymethods]
impl Policy {
    /// Loads an ONNX model, IR text (`.sqil`) or a compiled CPU artifact (by its magic bytes).
    #[new]
    fn new(path: &str) -> PyResult<Policy> {
        let p = Path::new(path);
        if sqil_runtime::artifact::is_artifact(p) {
            let (graph, plan) = sqil_runtime::load_artifact(p).map_err(err)?;
            return Ok(Policy { graph, plan: Some(plan) });
        }
        let graph = if p.extension().is_some_and(|e| e == "sqil") {
            let text = std::fs::read_to_string(p).map_err(|e| err(format!("{path}: {e}")))?;
            sqil_ir::parse_graph(&text).map_err(|e| err(format!("{path}: {e}")))?
        } else {
            sqil_onnx::load_model(p).map_err(err)?
        };
        sqil_ir::verify_input(&graph).map_err(|e| err(format!("{path}: {e}")))?;
        Ok(Policy { graph, plan: None })
    }

    #[getter]
    fn input_names(&self) -> Vec<String> {
        self.graph.inputs.iter().map(|&i| self.graph.node(i).outputs[0].name.clone()).collect()
    }

    /// Declared shape of input `k`: an int per known dimension, None for symbolic ones.
    fn input_shape(&self, k: usize) -> PyResult<Vec<Option<usize>>> {
        let n = *self.graph.inputs.get(k).ok_or_else(|| err(format!("the policy has no input {k}")))?;
        Ok(self.graph.node(n).outputs[0].ty.shape.iter().map(|d| d.known()).collect())
    }

    /// True when the policy runs on the compiled CPU runtime (an artifact), not the interpreter.
    #[getter]
    fn compiled(&self) -> bool {
        self.plan.is_some()
    }

    #[getter]
    fn output_names(&self) -> Vec<String> {
        self.graph.outputs.iter().map(|&v| self.graph.value(v).name.clone()).collect()
    }

    /// Runs the policy on float32 arrays (one per input, in order); returns every output.
    #[pyo3(signature = (*inputs))]
    fn run<'py>(
        &self,
        py: Python<'py>,
        inputs: Vec<PyReadonlyArrayDyn<'py, f32>>,
    ) -> PyResult<Vec<Bound<'py, PyArrayDyn<f32>>>> {
        let names = self.input_names();
        if inputs.len() != names.len() {
            return Err(err(format!(
                "the policy takes {} input(s) ({}), {} given",
                names.len(),
                names.join(", "),
                inputs.len()
            )));
        }
        let mut tensors = vec![];
        for a in &inputs {
            let a = a.as_array();
            tensors.push(Tensor::new(a.shape().to_vec(), Data::F32(a.iter().copied().collect())).map_err(err)?);
        }
        let outs = match &self.plan {
            Some(plan) => py.detach(|| plan.run(&tensors, 1)).map_err(err)?,
            None => {
                let feeds: HashMap<String, Tensor> = names.into_iter().zip(tensors).collect();
                py.detach(|| Interpreter::new(&self.graph).and_then(|i| i.run(&feeds))).map_err(err)?
            }
        };
        outs.into_iter()
            .map(|t| {
                let v = t.data.to_f32_vec();
                let a = numpy::ndarray::ArrayD::from_shape_vec(t.shape.clone(), v).map_err(err)?;
                Ok(a.to_pyarray(py))
            })
            .collect()
    }

    /// `policy(obs)` or `policy(image, proprio)`: the first output for a batch of inputs.
    #[pyo3(signature = (*inputs))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        inputs: Vec<PyReadonlyArrayDyn<'py, f32>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let mut outs = self.run(py, inputs)?;
        Ok(outs.remove(0))
    }

    /// The first output for a batch of observations (a float32 array for the first input).
    fn act<'py>(&self, py: Python<'py>, obs: PyReadonlyArrayDyn<'py, f32>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let mut outs = self.run(py, vec![obs])?;
        Ok(outs.remove(0))
    }
}

/// `sqil.load(path)`: a policy from an ONNX model (float or QDQ), IR text (`.sqil`) or a compiled
/// CPU artifact (`policy.bin`).
#[pyfunction]
fn load(path: &str) -> PyResult<Policy> {
    Policy::new(path)
}

/// Runs one `sqil` command (`args` without the program name) with the GIL released; a failure
/// raises ValueError with sqil's message.
#[pyfunction]
fn _run(py: Python<'_>, args: Vec<String>) -> PyResult<()> {
    py.detach(|| sqil_cli::run_args(args)).map_err(err)
}

/// Sets (or with None removes) the callback that receives `(phase, done, total)` from sqil's long
/// steps (SIS, GPTQ over the layers, the PTQ candidates, fine-tuning) while a command runs. An
/// exception in the callback is reported as unraisable and does not stop the command.
#[pyfunction]
#[pyo3(signature = (callback=None))]
fn _set_progress(callback: Option<Py<PyAny>>) {
    let hook = callback.map(|cb| -> sqil_ir::progress::Hook {
        Box::new(move |phase: &str, done: u64, total: u64| {
            Python::attach(|py| {
                if let Err(e) = cb.call1(py, (phase, done, total)) {
                    e.write_unraisable(py, None);
                }
            });
        })
    });
    sqil_ir::progress::set_hook(hook);
}

#[pymodule]
fn _sqil(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Policy>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(_run, m)?)?;
    m.add_function(wrap_pyfunction!(_set_progress, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
