//! Attribute values, shared by the ONNX importer and the text parser: both build an
//! [`AttrMap`] and hand it to [`crate::ops::Op::from_attrs`], so defaults live in one place.

use crate::dtype::DType;
use crate::error::{IrError, Result};
use crate::tensor::Tensor;
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Str(String),
    DType(DType),
    Tensor(Tensor),
}

/// Named attributes of one node, with typed getters that name the attribute on error.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttrMap(pub BTreeMap<String, Attr>);

impl AttrMap {
    pub fn new() -> AttrMap {
        AttrMap::default()
    }

    pub fn insert(&mut self, k: impl Into<String>, v: Attr) {
        self.0.insert(k.into(), v);
    }

    pub fn contains(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }

    fn wrong(&self, k: &str, want: &str) -> IrError {
        IrError::Invalid(format!("attribute `{k}`: expected {want}, got {:?}", self.0[k]))
    }

    pub fn int(&self, k: &str, default: i64) -> Result<i64> {
        self.opt_int(k).map(|v| v.unwrap_or(default))
    }

    pub fn opt_int(&self, k: &str) -> Result<Option<i64>> {
        match self.0.get(k) {
            None => Ok(None),
            Some(Attr::Int(v)) => Ok(Some(*v)),
            Some(_) => Err(self.wrong(k, "an int")),
        }
    }

    pub fn float(&self, k: &str, default: f32) -> Result<f32> {
        match self.0.get(k) {
            None => Ok(default),
            Some(Attr::Float(v)) => Ok(*v),
            Some(Attr::Int(v)) => Ok(*v as f32),
            Some(_) => Err(self.wrong(k, "a float")),
        }
    }

    pub fn opt_ints(&self, k: &str) -> Result<Option<Vec<i64>>> {
        match self.0.get(k) {
            None => Ok(None),
            Some(Attr::Ints(v)) => Ok(Some(v.clone())),
            Some(Attr::Floats(v)) if v.is_empty() => Ok(Some(vec![])),
            Some(_) => Err(self.wrong(k, "a list of ints")),
        }
    }

    pub fn ints(&self, k: &str) -> Result<Vec<i64>> {
        Ok(self.opt_ints(k)?.unwrap_or_default())
    }

    pub fn opt_floats(&self, k: &str) -> Result<Option<Vec<f32>>> {
        match self.0.get(k) {
            None => Ok(None),
            Some(Attr::Floats(v)) => Ok(Some(v.clone())),
            Some(Attr::Ints(v)) if v.is_empty() => Ok(Some(vec![])),
            Some(_) => Err(self.wrong(k, "a list of floats")),
        }
    }

    pub fn string(&self, k: &str, default: &str) -> Result<String> {
        match self.0.get(k) {
            None => Ok(default.to_string()),
            Some(Attr::Str(s)) => Ok(s.clone()),
            Some(_) => Err(self.wrong(k, "a string")),
        }
    }

    pub fn opt_dtype(&self, k: &str) -> Result<Option<DType>> {
        match self.0.get(k) {
            None => Ok(None),
            Some(Attr::DType(d)) => Ok(Some(*d)),
            Some(_) => Err(self.wrong(k, "a dtype")),
        }
    }

    pub fn opt_tensor(&self, k: &str) -> Result<Option<Tensor>> {
        match self.0.get(k) {
            None => Ok(None),
            Some(Attr::Tensor(t)) => Ok(Some(t.clone())),
            Some(_) => Err(self.wrong(k, "a tensor")),
        }
    }

    /// Errors if any attribute is not in `known` (catches typos in hand-written IR).
    pub fn check_known(&self, op: &str, known: &[&str]) -> Result<()> {
        for k in self.0.keys() {
            if !known.contains(&k.as_str()) {
                return Err(IrError::Invalid(format!("{op}: unknown attribute `{k}`")));
            }
        }
        Ok(())
    }
}
