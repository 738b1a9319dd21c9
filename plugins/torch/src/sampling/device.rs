//! Choosing every row's token of a step where the logits are (the GPU, or the CPU): the rows
//! are picked together in a few tensor operations, and only the chosen ids cross to the host,
//! in one copy (on a GPU, the step's one synchronisation). The arithmetic follows
//! [`super::candidates`] and [`super::draw`] step for step (f64 probabilities relative to the
//! row's maximum; the same candidate order; the same uniform from the row's generator), so a
//! seed gives the tokens the host path gives.

use tch::{Device, Kind, Tensor};

use super::{seen_tokens, Rng, SamplingParams};

/// How one row of a step is picked.
pub struct RowSampling<'a> {
    /// Its settings.
    pub params: &'a SamplingParams,
    /// The sequence so far (for the repetition penalty).
    pub history: &'a [i64],
    /// Its generator: one number is drawn from it when the row samples (none when greedy),
    /// as the host path draws.
    pub rng: &'a mut Rng,
}

/// The next token of each row of `logits` (`[rows, vocab]`, any floating dtype, on any
/// device), picked as [`super::sample`] picks it from the same row.
pub fn sample_rows(logits: &Tensor, rows: &mut [RowSampling]) -> Result<Vec<i64>, tch::TchError> {
    let size = logits.size();
    let (n, vocab) = match size[..] {
        [n, vocab] if n == rows.len() as i64 && vocab > 0 => (n, vocab),
        _ => {
            return Err(tch::TchError::Shape(format!(
                "sampling {} rows from logits of shape {size:?}",
                rows.len()
            )))
        }
    };
    let device = logits.device();
    let mut logits = logits.to_kind(Kind::Float);
    if rows.iter().any(|r| r.params.repetition_penalty != 1.0) {
        // A copy: the caller's logits stay as they were.
        logits = logits.copy();
        for (i, row) in rows.iter().enumerate() {
            penalize(&logits.get(i as i64), row, vocab, device);
        }
    }
    let mut chosen = logits.argmax(1, false);
    // Rows that sample, in two groups: those whose candidates are taken most likely first
    // (top-k or top-p) and those drawn over the vocabulary in index order, as the host does.
    let sorted: Vec<Option<bool>> = rows
        .iter()
        .map(|r| {
            let p = r.params;
            (!p.is_greedy() && vocab >= 2).then_some(p.ranks_candidates())
        })
        .collect();
    for mode in [false, true] {
        let group: Vec<i64> = (0..n)
            .filter(|&i| sorted[i as usize] == Some(mode))
            .collect();
        if group.is_empty() {
            continue;
        }
        let mut column = |f: &mut dyn FnMut(&mut RowSampling) -> f64| {
            let values: Vec<f64> = group.iter().map(|&i| f(&mut rows[i as usize])).collect();
            Tensor::from_slice(&values).view([-1, 1]).to_device(device)
        };
        let temperature = column(&mut |r| f64::from(r.params.temperature));
        let top_k = column(&mut |r| match r.params.top_k {
            0 => vocab as f64,
            k => (k as i64).min(vocab) as f64,
        });
        let top_p = column(&mut |r| match r.params.top_p < 1.0 {
            true => f64::from(r.params.top_p),
            // No cut: a total that rounds to 1 before the end must not drop the tail.
            false => f64::INFINITY,
        });
        // The uniforms, drawn in row order, one per sampling row, as the host draws them.
        let uniform = column(&mut |r| r.rng.next_f64());
        let index = Tensor::from_slice(&group).to_device(device);
        let rows_logits = logits.index_select(0, &index);
        let picked = match mode {
            true => pick_sorted(&rows_logits, &temperature, &top_k, &top_p, &uniform),
            false => {
                let probs = probabilities(&rows_logits, &temperature, None);
                draw(
                    &probs,
                    &uniform,
                    &Tensor::full([1], vocab - 1, (Kind::Int64, device)),
                )
            }
        };
        chosen = chosen.index_copy(0, &index, &picked);
    }
    Vec::<i64>::try_from(chosen.to_device(Device::Cpu))
}

/// CTRL's repetition penalty on one row (in place), over the distinct tokens of its history
/// that are in the vocabulary.
fn penalize(row: &Tensor, sampling: &RowSampling, vocab: i64, device: Device) {
    let penalty = f64::from(sampling.params.repetition_penalty);
    if penalty == 1.0 {
        return;
    }
    let seen = seen_tokens(sampling.history, vocab as usize);
    if seen.is_empty() {
        return;
    }
    let seen = Tensor::from_slice(&seen).to_device(device);
    let values = row.index_select(0, &seen);
    let penalized = (&values * penalty).where_self(&values.lt(0.0), &(&values / penalty));
    let mut row = row.shallow_clone();
    let _ = row.index_copy_(0, &seen, &penalized);
}

/// The probabilities of `logits` (`[rows, vocab]`) at `temperature` (`[rows, 1]`), in f64
/// relative to each row's maximum, zero outside `keep` and normalised over the rest.
fn probabilities(logits: &Tensor, temperature: &Tensor, keep: Option<&Tensor>) -> Tensor {
    let max = logits.amax(1, true);
    let mut probs = (logits - &max)
        .to_kind(Kind::Double)
        .divide(temperature)
        .exp();
    if let Some(keep) = keep {
        probs = probs * keep.to_kind(Kind::Double);
    }
    &probs / probs.sum_dim_intlist(1, true, Kind::Double)
}

/// The first candidate of each row of `probs` whose running total exceeds the row's `uniform`;
/// past the end (rounding), the row's `last` candidate, as the host falls back to its last.
fn draw(probs: &Tensor, uniform: &Tensor, last: &Tensor) -> Tensor {
    probs
        .cumsum(1, Kind::Double)
        .le_tensor(uniform)
        .sum_dim_intlist(1, false, Kind::Int64)
        .minimum(last)
}

/// One token per row of `logits` (`[rows, vocab]`, f32), the candidates most likely first:
/// the first `top_k`, then the nucleus of `top_p` (a candidate is kept while the total before
/// it is below p: the host keeps the first whose running total reaches p and stops).
fn pick_sorted(
    logits: &Tensor,
    temperature: &Tensor,
    top_k: &Tensor,
    top_p: &Tensor,
    uniform: &Tensor,
) -> Tensor {
    let vocab = logits.size()[1];
    let (logits, order) = logits.sort(1, true);
    let position = Tensor::arange(vocab, (Kind::Double, logits.device())).view([1, vocab]);
    let in_top_k = position.lt_tensor(top_k);
    let probs = probabilities(&logits, temperature, Some(&in_top_k));
    let before = probs.cumsum(1, Kind::Double) - &probs;
    let keep = in_top_k.logical_and(&before.lt_tensor(top_p));
    let probs = probabilities(&logits, temperature, Some(&keep));
    let last = (keep.sum_dim_intlist(1, false, Kind::Int64) - 1).clamp_min(0);
    let index = draw(&probs, uniform, &last);
    order.gather(1, &index.unsqueeze(1), false).squeeze_dim(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of random logits with assorted settings, picked on the device path and one by one
    /// on the host path from generators with the same seeds, give the same tokens.
    #[test]
    fn every_setting_picks_what_the_host_picks_for_the_same_seed() {
        tch::manual_seed(3);
        let vocab = 300;
        let settings = [
            SamplingParams::default(),
            SamplingParams {
                temperature: 0.8,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 1.3,
                top_k: 20,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_k: 50,
                top_p: 0.5,
                repetition_penalty: 1.3,
            },
            SamplingParams {
                repetition_penalty: 1.2,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: 1e-30,
                ..SamplingParams::default()
            },
        ];
        let histories: Vec<Vec<i64>> = (0..settings.len() as i64)
            .map(|i| vec![i, 7 * i + 1, 7 * i + 1, 299, 5000, -1])
            .collect();
        let mut device_rngs: Vec<Rng> = (0..settings.len() as u64).map(Rng::seeded).collect();
        let mut host_rngs = device_rngs.clone();
        let mut differing = 0;
        for step in 0..200 {
            // Spread out enough that top-p cuts and greedy maxima are clear of rounding.
            let logits =
                Tensor::randn([settings.len() as i64, vocab], (Kind::Float, Device::Cpu)) * 3.0;
            let mut rows: Vec<RowSampling> = settings
                .iter()
                .zip(&histories)
                .zip(device_rngs.iter_mut())
                .map(|((params, history), rng)| RowSampling {
                    params,
                    history,
                    rng,
                })
                .collect();
            let got = sample_rows(&logits, &mut rows).unwrap();
            let rows: Vec<Vec<f32>> = Vec::try_from(&logits).unwrap();
            for (i, mut row) in rows.into_iter().enumerate() {
                let want =
                    super::super::sample(&mut row, &settings[i], &histories[i], &mut host_rngs[i]);
                if got[i] != want {
                    differing += 1;
                    eprintln!("step {step}, row {i}: device {} host {want}", got[i]);
                }
            }
        }
        assert_eq!(differing, 0);
    }

    #[test]
    fn sampled_tokens_follow_the_distribution_and_stay_in_the_candidates() {
        // Two rows at once, the second limited to its top 2.
        let logits = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0, 1.0, 0.9, 0.8, 5.0, 0.1])
            .view([1, 9])
            .repeat([2, 1]);
        let flat = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        };
        let top2 = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..SamplingParams::default()
        };
        let (mut a, mut b) = (Rng::seeded(1), Rng::seeded(2));
        let mut counts = [0usize; 9];
        for _ in 0..4000 {
            let mut rows = [
                RowSampling {
                    params: &flat,
                    history: &[],
                    rng: &mut a,
                },
                RowSampling {
                    params: &top2,
                    history: &[],
                    rng: &mut b,
                },
            ];
            let got = sample_rows(&logits, &mut rows).unwrap();
            counts[got[0] as usize] += 1;
            assert!(got[1] == 7 || got[1] == 4, "{got:?}");
        }
        // Row 0: softmax of the logits; token 7 takes e^5 / (e^5 + e^1 + ...) of the draws.
        let row: Vec<f64> = [0.0f64, 0.0, 0.0, 0.0, 1.0, 0.9, 0.8, 5.0, 0.1]
            .iter()
            .map(|l| l.exp())
            .collect();
        let total: f64 = row.iter().sum();
        for (c, w) in counts.iter().zip(&row) {
            let (got, want) = (*c as f64 / 4000.0, w / total);
            assert!((got - want).abs() < 0.03, "{counts:?}");
        }
    }

    #[test]
    fn a_shape_that_does_not_match_the_rows_is_an_error() {
        let logits = Tensor::zeros([3, 5], (Kind::Float, Device::Cpu));
        let params = SamplingParams::default();
        let mut rng = Rng::seeded(0);
        let mut rows = [RowSampling {
            params: &params,
            history: &[],
            rng: &mut rng,
        }];
        assert!(sample_rows(&logits, &mut rows).is_err());
    }
}
