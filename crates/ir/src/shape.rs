//! Value types: element type plus a shape whose dimensions may be symbolic (`N` for the batch).

use crate::dtype::DType;
use std::fmt;

/// One dimension of a value's shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(usize),
    /// A named dimension fixed only at run time, such as the batch size `N`.
    Sym(String),
    /// A dimension no rule could determine.
    Unknown,
}

impl Dim {
    pub fn known(&self) -> Option<usize> {
        match self {
            Dim::Known(n) => Some(*n),
            _ => None,
        }
    }

    /// Multidirectional (numpy) broadcast of two dimensions; `None` if they cannot broadcast.
    pub fn broadcast(&self, other: &Dim) -> Option<Dim> {
        use Dim::*;
        Some(match (self, other) {
            (Known(a), Known(b)) if a == b => Known(*a),
            (Known(1), d) | (d, Known(1)) => d.clone(),
            (Known(_), Known(_)) => return None,
            (Known(a), _) | (_, Known(a)) => Known(*a),
            (Sym(a), Sym(b)) if a == b => Sym(a.clone()),
            _ => Unknown,
        })
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) if is_ident(s) => f.write_str(s),
            Dim::Sym(s) => write!(f, "{s:?}"),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// True for names the text format prints without quotes.
pub fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// The type of an IR value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ValueType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl ValueType {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> ValueType {
        ValueType { dtype, shape }
    }

    /// A fully known type.
    pub fn fixed(dtype: DType, shape: &[usize]) -> ValueType {
        ValueType { dtype, shape: shape.iter().map(|&n| Dim::Known(n)).collect() }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The concrete shape, if every dimension is known.
    pub fn known_shape(&self) -> Option<Vec<usize>> {
        self.shape.iter().map(Dim::known).collect()
    }

    /// True if a tensor of this dtype and concrete shape is an instance of this type.
    pub fn admits(&self, dtype: DType, shape: &[usize]) -> bool {
        self.dtype == dtype
            && self.shape.len() == shape.len()
            && self.shape.iter().zip(shape).all(|(d, &n)| d.known().is_none_or(|k| k == n))
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Broadcast of several shapes (numpy rules); `None` if incompatible.
pub fn broadcast_dims(shapes: &[&[Dim]]) -> Option<Vec<Dim>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![Dim::Known(1); rank];
    for s in shapes {
        let off = rank - s.len();
        for (i, d) in s.iter().enumerate() {
            out[off + i] = out[off + i].broadcast(d)?;
        }
    }
    Some(out)
}

/// Broadcast of concrete shapes; `None` if incompatible.
pub fn broadcast_shapes(shapes: &[&[usize]]) -> Option<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let off = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[off + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return None;
            }
        }
    }
    Some(out)
}
