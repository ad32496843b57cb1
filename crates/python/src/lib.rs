//! `import sqil`: run policies from Python with sqil's reference interpreter, so closed-loop
//! evaluation (tools/eval.py) can use sqil itself rather than a peer runtime.
//!
//! Built by `tools/build_binding.sh` into `tools/.binding/sqil.so`.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, ToPyArray};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use sqil_ir::interp::Interpreter;
use sqil_ir::{Data, Graph, Tensor};
use std::collections::HashMap;
use std::path::Path;

fn err(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A loaded policy graph.
#[pyclass(module = "sqil")]
struct Policy {
    graph: Graph,
}

#[pymethods]
impl Policy {
    /// Loads an ONNX model or IR text (`.sqil`).
    #[new]
    fn new(path: &str) -> PyResult<Policy> {
        let p = Path::new(path);
        let graph = if p.extension().is_some_and(|e| e == "sqil") {
            let text = std::fs::read_to_string(p).map_err(|e| err(format!("{path}: {e}")))?;
            sqil_ir::parse_graph(&text).map_err(|e| err(format!("{path}: {e}")))?
        } else {
            sqil_onnx::load_model(p).map_err(err)?
        };
        sqil_ir::verify(&graph).map_err(|e| err(format!("{path}: {e}")))?;
        Ok(Policy { graph })
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
        let mut feeds = HashMap::new();
        for (n, a) in names.into_iter().zip(&inputs) {
            let a = a.as_array();
            let t = Tensor::new(a.shape().to_vec(), Data::F32(a.iter().copied().collect())).map_err(err)?;
            feeds.insert(n, t);
        }
        let outs = py.detach(|| Interpreter::new(&self.graph).and_then(|i| i.run(&feeds))).map_err(err)?;
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

/// `sqil.load(path)`: a policy from an ONNX model (float or QDQ) or IR text (`.sqil`).
#[pyfunction]
fn load(path: &str) -> PyResult<Policy> {
    Policy::new(path)
}

#[pymodule]
fn sqil(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Policy>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
