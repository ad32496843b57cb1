//! Fine-tuning of quantized policies: the trainable graph (parameters as inputs, the QRD loss,
//! the backward graph from the `grad` pass), the state-importance score (SIS), AdamW with a
//! cosine schedule, multi-threaded steps, atomic checkpoints.

pub mod hessian;
pub mod model;
pub mod optim;
pub mod sis;
pub mod trainer;
