//! Bit allocation under a budget: a multiple-choice knapsack. Each layer picks exactly one
//! option (a bit width with a cost and a predicted error); the total error is minimised subject
//! to the total cost staying within the budget.
//!
//! Solved exactly by dynamic programming over the budget in integer cost units. Costs that are
//! not integer multiples of the unit are rounded *up* and the budget *down*, so a returned
//! allocation never exceeds the budget; with integer costs (bits x params) and a unit that
//! divides them, the DP is exact (tested against brute force).

use sqil_ir::{IrError, Result};

/// One choice for one layer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Choice {
    pub label: String,
    /// In budget units (bits, bytes or seconds), before discretisation.
    pub cost: f64,
    /// Predicted error (sensitivity) if this choice is taken.
    pub error: f64,
}

/// The chosen option per layer, with totals.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Allocation {
    pub picks: Vec<usize>,
    pub cost: f64,
    pub error: f64,
}

/// Cells of the DP table per layer at most: a budget is discretised to this many units unless
/// the costs' common divisor allows an exact, smaller table.
pub const MAX_CELLS: usize = 1 << 16;

/// The allocation with the least total error whose total cost is at most `budget`, or an error
/// naming the cheapest possible total when none fits.
pub fn allocate(layers: &[Vec<Choice>], budget: f64) -> Result<Allocation> {
    if layers.iter().any(|c| c.is_empty()) {
        return Err(IrError::Invalid("allocate: a layer has no choices".into()));
    }
    let min: f64 = layers.iter().map(|c| c.iter().map(|x| x.cost).fold(f64::INFINITY, f64::min)).sum();
    if min > budget * (1.0 + 1e-12) {
        return Err(IrError::Invalid(format!("budget {budget} is below the cheapest allocation ({min})")));
    }
    let unit = unit_for(layers, budget);
    let cells = (budget / unit + 1e-9).floor() as usize;
    let icost = |c: f64| (c / unit - 1e-9).ceil().max(0.0) as usize;
    // best[c]: least error of the layers so far with integer cost exactly <= c; pick tables for
    // backtracking.
    let inf = f64::INFINITY;
    let mut best = vec![0f64; cells + 1];
    let mut picks: Vec<Vec<u16>> = Vec::with_capacity(layers.len());
    for choices in layers {
        let mut next = vec![inf; cells + 1];
        let mut pick = vec![u16::MAX; cells + 1];
        for (k, ch) in choices.iter().enumerate() {
            let w = icost(ch.cost);
            for c in w..=cells {
                let v = best[c - w] + ch.error;
                if v < next[c] {
                    next[c] = v;
                    pick[c] = k as u16;
                }
            }
        }
        best = next;
        picks.push(pick);
    }
    if !best[cells].is_finite() {
        return Err(IrError::Invalid(format!(
            "budget {budget} cannot be met once costs are rounded to units of {unit}"
        )));
    }
    let mut c = cells;
    let mut out = vec![0usize; layers.len()];
    for (l, choices) in layers.iter().enumerate().rev() {
        let k = picks[l][c] as usize;
        out[l] = k;
        c -= icost(choices[k].cost);
    }
    Ok(summarise(layers, out))
}

/// Totals of an allocation.
pub fn summarise(layers: &[Vec<Choice>], picks: Vec<usize>) -> Allocation {
    let cost = picks.iter().zip(layers).map(|(&k, c)| c[k].cost).sum();
    let error = picks.iter().zip(layers).map(|(&k, c)| c[k].error).sum();
    Allocation { picks, cost, error }
}

/// The DP unit: the greatest common divisor of the (integer) costs and the budget when that keeps
/// the table within [`MAX_CELLS`], else `budget / MAX_CELLS` (costs then round up).
fn unit_for(layers: &[Vec<Choice>], budget: f64) -> f64 {
    let all_int = layers.iter().flatten().all(|c| c.cost.fract() == 0.0 && c.cost < 1e15) && budget >= 1.0;
    if all_int {
        let g = layers.iter().flatten().fold(0u64, |g, c| gcd(g, c.cost as u64));
        if g > 0 && budget / (g as f64) <= MAX_CELLS as f64 {
            return g as f64;
        }
    }
    budget / MAX_CELLS as f64
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Budget against predicted error: the optimal allocation at `points` budgets spread evenly
/// between the cheapest and the most expensive total.
pub fn pareto(layers: &[Vec<Choice>], points: usize) -> Vec<Allocation> {
    let lo: f64 = layers.iter().map(|c| c.iter().map(|x| x.cost).fold(f64::INFINITY, f64::min)).sum();
    let hi: f64 = layers.iter().map(|c| c.iter().map(|x| x.cost).fold(0f64, f64::max)).sum();
    let mut out: Vec<Allocation> = vec![];
    for i in 0..points.max(2) {
        let b = lo + (hi - lo) * i as f64 / (points.max(2) - 1) as f64;
        if let Ok(a) = allocate(layers, b) {
            if out.last().is_none_or(|p| p.picks != a.picks) {
                out.push(a);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqil_ir::testing::Rng;

    fn random_instance(r: &mut Rng) -> Vec<Vec<Choice>> {
        let layers = 1 + r.below(5);
        (0..layers)
            .map(|_| {
                let params = 1 + r.below(40) as u64;
                let opts = 1 + r.below(4);
                (0..opts)
                    .map(|k| Choice {
                        label: format!("{k}"),
                        cost: (params * [2, 3, 4, 8][k]) as f64,
                        error: r.unit() as f64 * 10.0 / (k + 1) as f64,
                    })
                    .collect()
            })
            .collect()
    }

    fn brute_force(layers: &[Vec<Choice>], budget: f64) -> Option<f64> {
        let mut best: Option<f64> = None;
        let mut idx = vec![0usize; layers.len()];
        loop {
            let a = summarise(layers, idx.clone());
            if a.cost <= budget && best.is_none_or(|b| a.error < b) {
                best = Some(a.error);
            }
            let mut d = 0;
            loop {
                if d == layers.len() {
                    return best;
                }
                idx[d] += 1;
                if idx[d] < layers[d].len() {
                    break;
                }
                idx[d] = 0;
                d += 1;
            }
        }
    }

    #[test]
    fn dp_matches_brute_force_and_never_exceeds_the_budget() {
        let mut r = Rng::new(7);
        for _ in 0..400 {
            let layers = random_instance(&mut r);
            let lo: f64 = layers.iter().map(|c| c[0].cost).sum();
            let hi: f64 = layers.iter().map(|c| c.last().unwrap().cost).sum();
            let budget = (lo + (hi - lo) * r.unit() as f64).floor();
            match (allocate(&layers, budget), brute_force(&layers, budget)) {
                (Ok(a), Some(b)) => {
                    assert!(a.cost <= budget, "cost {} over budget {budget}", a.cost);
                    assert!((a.error - b).abs() <= 1e-9 * b.abs().max(1.0), "dp {} vs brute force {b}", a.error);
                }
                (Err(_), None) => {}
                (a, b) => panic!("dp {a:?} vs brute force {b:?} at budget {budget}"),
            }
        }
    }

    #[test]
    fn fractional_costs_round_up_and_stay_within_budget() {
        let mut r = Rng::new(3);
        for _ in 0..200 {
            let mut layers = random_instance(&mut r);
            layers.iter_mut().flatten().for_each(|c| c.cost *= 1.37e-3);
            let lo: f64 = layers.iter().map(|c| c[0].cost).sum();
            let hi: f64 = layers.iter().map(|c| c.last().unwrap().cost).sum();
            let budget = lo + (hi - lo) * r.unit() as f64;
            if let Ok(a) = allocate(&layers, budget) {
                assert!(a.cost <= budget * (1.0 + 1e-12), "cost {} over budget {budget}", a.cost);
                // Rounding can cost optimality, but only within one unit per layer.
                if let Some(b) = brute_force(&layers, budget - layers.len() as f64 * budget / MAX_CELLS as f64) {
                    assert!(a.error <= b + 1e-9, "dp {} worse than brute force at a tighter budget {b}", a.error);
                }
            }
        }
    }

    #[test]
    fn an_impossible_budget_is_an_error_naming_the_minimum() {
        let layers = vec![vec![Choice { label: "2".into(), cost: 20.0, error: 1.0 }]];
        let e = allocate(&layers, 10.0).unwrap_err().to_string();
        assert!(e.contains("cheapest allocation (20)"), "{e}");
    }
}
