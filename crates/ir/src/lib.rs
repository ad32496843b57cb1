//! sqil's graph IR: the one representation that import, every pass, training (the backward
//! graph is IR too), the reference interpreter and code generation share.

pub mod attrs;
pub mod dtype;
pub mod error;
pub mod graph;
pub mod interp;
pub mod io;
pub mod lowered;
pub mod ops;
pub mod par;
pub mod pool;
pub mod progress;
pub mod shape;
pub mod tensor;
pub mod testing;
pub mod text;
pub mod verify;

pub use attrs::{Attr, AttrMap};
pub use dtype::DType;
pub use error::{IrError, Result};
pub use graph::{graphs_equal, Edge, Graph, Node, NodeId, Value, ValueRef};
pub use io::{fnv1a, write_atomic, FNV1A_START};
pub use ops::Op;
pub use shape::{Dim, ValueType};
pub use tensor::{Data, Tensor};
pub use text::{parse_graph, print_graph, PrintOptions};
pub use verify::{verify, verify_input};
