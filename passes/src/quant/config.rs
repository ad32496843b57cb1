//! The quantization config: what `insert-fake-quant` and the PTQ recipes do to each layer. It is
//! read from JSON or TOML (`QuantConfig::load`), from CLI flags, or from a pass spec such as
//! `insert-fake-quant(wbits=4 abits=8 group=64)`.

use serde::{Deserialize, Serialize};
use sqil_ir::{IrError, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// How weights share scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One scale for the whole weight.
    Tensor,
    /// One scale per output channel.
    Channel,
    /// One scale per output channel and per group of `group` entries along the reduction axis.
    Group,
}

/// How activation ranges are chosen from calibration data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActCalib {
    MinMax,
    Percentile,
    /// The clipping range that minimises the mean squared quantization error.
    Mse,
}

/// What happens to a policy's raw vector input (an observation read by a layer with no layer
/// before it: features whose ranges can differ by orders of magnitude).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawInput {
    /// Kept in float: the layers that read it run with float inputs (W4A16 for that layer).
    Float,
    /// Quantized like any activation (one scale per tensor).
    Quant,
    /// Quantized per tensor after per-feature scales folded into the layer's weights
    /// (SmoothQuant's migration, alpha 0.5: `x / s`, `W * s` with `s_f = sqrt(max|x_f| / max|W_f|)`).
    Scaled,
}

/// Per-layer overrides (by layer name, as `sqil inspect` prints it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    pub wbits: Option<u8>,
    /// 0 = keep this layer's input in float.
    pub abits: Option<u8>,
    /// Keep the whole layer in float.
    #[serde(default)]
    pub fp: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantConfig {
    /// Weight bits: 2, 3, 4 or 8 (stored signed).
    pub wbits: u8,
    /// Activation bits of each quantized layer's input: 4 or 8; `None` (or 16) keeps activations
    /// in float (weight-only quantization, "W4A16").
    pub abits: Option<u8>,
    pub granularity: Granularity,
    /// Group size along the reduction axis when `granularity` is `group` (32, 64, 128, ...).
    pub group: usize,
    /// Symmetric weights (zero point 0, scale = absmax / (2^(b-1) - 1)); else min-max with a zero point.
    pub weight_symmetric: bool,
    /// Symmetric activations; else asymmetric with a zero point.
    pub act_symmetric: bool,
    pub act_calib: ActCalib,
    /// The percentile (of |x| tails) for `act_calib = percentile`, e.g. 99.99.
    pub percentile: f64,
    /// Keep the first / last quantizable layer in float.
    pub keep_first: bool,
    pub keep_last: bool,
    /// Layers kept in float, by name.
    pub keep_fp: Vec<String>,
    /// The raw vector input (rank <= 3: `[B, obs]` or `[B, H, obs]`) of the first layers; image
    /// inputs are quantized either way (their pixels are 8-bit already). A per-layer `abits`
    /// override wins.
    pub raw_input: RawInput,
    pub layers: BTreeMap<String, LayerOverride>,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            wbits: 4,
            abits: Some(8),
            granularity: Granularity::Group,
            group: 64,
            weight_symmetric: true,
            act_symmetric: false,
            act_calib: ActCalib::MinMax,
            percentile: 99.99,
            keep_first: false,
            keep_last: false,
            keep_fp: vec![],
            raw_input: RawInput::Float,
            layers: BTreeMap::new(),
        }
    }
}

fn bad(msg: String) -> IrError {
    IrError::Invalid(msg)
}

impl QuantConfig {
    /// Reads a config from a `.json` or `.toml` file; unknown fields are errors.
    pub fn load(path: &Path) -> Result<QuantConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let mut cfg: QuantConfig = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?
        } else {
            serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?
        };
        // TOML has no null: float activations are written as 16 (or 0).
        if matches!(cfg.abits, Some(0 | 16)) {
            cfg.abits = None;
        }
        cfg.validate().map_err(|e| e.context(path.display().to_string()))?;
        Ok(cfg)
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        let wb = |b: u8, what: &str| {
            if [2, 3, 4, 8].contains(&b) {
                Ok(())
            } else {
                Err(bad(format!("{what}: {b} weight bits (supported: 2, 3, 4, 8)")))
            }
        };
        let ab = |b: Option<u8>, what: &str| match b {
            None | Some(4) | Some(8) => Ok(()),
            Some(b) => Err(bad(format!("{what}: {b} activation bits (supported: 4, 8, or float)"))),
        };
        wb(self.wbits, "wbits")?;
        ab(self.abits, "abits")?;
        if self.granularity == Granularity::Group && self.group == 0 {
            return Err(bad("group: must be > 0 with granularity `group`".into()));
        }
        if !(50.0..=100.0).contains(&self.percentile) {
            return Err(bad(format!("percentile: {} is not in [50, 100]", self.percentile)));
        }
        for (name, o) in &self.layers {
            if let Some(b) = o.wbits {
                wb(b, &format!("layers.{name}.wbits"))?;
            }
            ab(o.abits.filter(|&b| b != 0), &format!("layers.{name}.abits"))?;
        }
        Ok(())
    }

    /// Applies `key=value` settings separated by spaces or commas (the pass-spec and CLI form):
    /// wbits, abits (a number, or `float`/`16`), group (a number, `channel` or `tensor`), wsym,
    /// asym (true/false), calib (minmax/percentile/mse), percentile, keep_first, keep_last,
    /// raw_input (float/quant/scaled).
    pub fn apply_settings(&mut self, spec: &str) -> Result<()> {
        for kv in spec.split([' ', ',']).filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("quant setting `{kv}` is not key=value")))?;
            let num =
                |v: &str| v.parse::<u64>().map_err(|_| bad(format!("quant setting `{k}`: `{v}` is not a number")));
            let flag = |v: &str| match v {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(bad(format!("quant setting `{k}`: `{v}` is not true/false"))),
            };
            match k {
                "wbits" => self.wbits = num(v)? as u8,
                "abits" => self.abits = if v == "float" || v == "16" { None } else { Some(num(v)? as u8) },
                "group" => match v {
                    "channel" => self.granularity = Granularity::Channel,
                    "tensor" => self.granularity = Granularity::Tensor,
                    _ => {
                        self.granularity = Granularity::Group;
                        self.group = num(v)? as usize;
                    }
                },
                "wsym" => self.weight_symmetric = flag(v)?,
                "asym" => self.act_symmetric = flag(v)?,
                "calib" => {
                    self.act_calib = match v {
                        "minmax" => ActCalib::MinMax,
                        "percentile" => ActCalib::Percentile,
                        "mse" => ActCalib::Mse,
                        _ => return Err(bad(format!("calib: `{v}` (known: minmax, percentile, mse)"))),
                    }
                }
                "percentile" => {
                    self.percentile = v.parse().map_err(|_| bad(format!("percentile: `{v}` is not a number")))?
                }
                "keep_first" => self.keep_first = flag(v)?,
                "keep_last" => self.keep_last = flag(v)?,
                "raw_input" => {
                    self.raw_input = match v {
                        "float" => RawInput::Float,
                        "quant" => RawInput::Quant,
                        "scaled" => RawInput::Scaled,
                        _ => return Err(bad(format!("raw_input: `{v}` (known: float, quant, scaled)"))),
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "unknown quant setting `{k}` (known: wbits, abits, group, wsym, asym, calib, percentile, keep_first, keep_last, raw_input)"
                    )))
                }
            }
        }
        self.validate()
    }

    /// Weight bits of `layer`, or `None` if it stays in float.
    pub fn weight_bits(&self, layer: &str, first: bool, last: bool) -> Option<u8> {
        let o = self.layers.get(layer);
        if o.is_some_and(|o| o.fp) || self.keep_fp.iter().any(|n| n == layer) {
            return None;
        }
        if let Some(b) = o.and_then(|o| o.wbits) {
            return Some(b);
        }
        if (first && self.keep_first) || (last && self.keep_last) {
            return None;
        }
        Some(self.wbits)
    }

    /// Activation bits of `layer`'s input, or `None` for float.
    pub fn act_bits(&self, layer: &str) -> Option<u8> {
        match self.layers.get(layer).and_then(|o| o.abits) {
            Some(0) => None,
            Some(b) => Some(b),
            None => self.abits,
        }
    }

    /// Activation bits of `layer`'s input when that input is the policy's raw vector input
    /// (`raw`): float under `raw_input = float` unless the layer's own override says otherwise.
    pub fn act_bits_at(&self, layer: &str, raw: bool) -> Option<u8> {
        let explicit = self.layers.get(layer).and_then(|o| o.abits).is_some();
        if raw && !explicit && self.raw_input == RawInput::Float {
            return None;
        }
        self.act_bits(layer)
    }

    /// A short label such as `W4A8 g64` or `W3A16 per-channel`.
    pub fn label(&self) -> String {
        let a = self.abits.map_or("16".to_string(), |b| b.to_string());
        let g = match self.granularity {
            Granularity::Tensor => "per-tensor".to_string(),
            Granularity::Channel => "per-channel".to_string(),
            Granularity::Group => format!("g{}", self.group),
        };
        format!("W{}A{a} {g}", self.wbits)
    }
}
