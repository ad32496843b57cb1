//! `insert-fake-quant(settings)`: places FakeQuant nodes per a [`QuantConfig`] given as
//! `key=value` settings (e.g. `insert-fake-quant(wbits=4 abits=8 group=64)`): weights get RTN
//! min-max scales, activations placeholder ranges (scale 1, zero 0) until calibration sets them.
//! Needs: constant weights (run after const-fold). Keeps: the graph's outputs' shapes and names.

use crate::quant::insert::{insert_act_quant, insert_weight_quant};
use crate::quant::QuantConfig;
use crate::{Pass, PassCtx};
use sqil_ir::{Graph, Result};
use std::collections::HashMap;

#[derive(Debug, Default, Clone)]
pub struct InsertFakeQuant {
    pub config: QuantConfig,
}

impl Pass for InsertFakeQuant {
    fn name(&self) -> &'static str {
        "insert-fake-quant"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCtx) -> Result<bool> {
        let w = insert_weight_quant(g, &self.config)?;
        let a = insert_act_quant(g, &self.config, &HashMap::new())?;
        cx.notes.push(format!(
            "{} quantized weights, {} quantized activations ({})",
            w.len(),
            a.len(),
            self.config.label()
        ));
        Ok(!w.is_empty() || !a.is_empty())
    }
}
