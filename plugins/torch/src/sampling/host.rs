//! Choosing tokens on the host, one row of logits at a time: what speculative decoding uses (it
//! needs whole distributions), and the reference the device path ([`super::device`]) is
//! tested against.

use super::{seen_tokens, Rng, SamplingParams};

/// The index of the largest value (the first on ties, as torch.argmax).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// The tokens that may come next and their probabilities, most likely first, after the
/// repetition penalty, temperature, top-k and top-p (greedy: the argmax alone). `history` is
/// the sequence so far (prompt and generated tokens). `logits` is modified in place.
pub fn candidates(
    logits: &mut [f32],
    params: &SamplingParams,
    history: &[i64],
) -> (Vec<usize>, Vec<f64>) {
    if params.repetition_penalty != 1.0 {
        let penalty = params.repetition_penalty;
        for token in seen_tokens(history, logits.len()) {
            let l = &mut logits[token as usize];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
    if params.is_greedy() || logits.len() < 2 {
        return (vec![argmax(logits)], vec![1.0]);
    }
    let t = f64::from(params.temperature);
    // Candidates, most likely first: the top k found without sorting the whole vocabulary,
    // and the rest sorted only when top-p needs the order.
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    if params.top_k > 0 && params.top_k < order.len() {
        order.select_nth_unstable_by(params.top_k - 1, by_logit);
        order.truncate(params.top_k);
    }
    if params.ranks_candidates() {
        order.sort_unstable_by(by_logit);
    }
    let max = order
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max);
    // In f64 and relative to the maximum, so that a tiny temperature tends to greedy instead of
    // overflowing.
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (f64::from(logits[i] - max) / t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= f64::from(params.top_p) {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    (order, probs)
}

/// Draw from candidates.
pub fn draw(order: &[usize], probs: &[f64], rng: &mut Rng) -> i64 {
    let mut u = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return order[i] as i64;
        }
        u -= p;
    }
    order.last().copied().unwrap_or(0) as i64
}

/// Pick the next token from one row of logits (see [`candidates`]).
pub fn sample(logits: &mut [f32], params: &SamplingParams, history: &[i64], rng: &mut Rng) -> i64 {
    let (order, probs) = candidates(logits, params, history);
    draw(&order, &probs, rng)
}

/// The full next-token distribution over the vocabulary (zero outside the candidates).
pub fn distribution(logits: &mut [f32], params: &SamplingParams, history: &[i64]) -> Vec<f64> {
    let (order, probs) = candidates(logits, params, history);
    let mut full = vec![0.0; logits.len()];
    for (&i, &p) in order.iter().zip(&probs) {
        full[i] = p;
    }
    full
}

/// Speculative sampling's rule for one drafted token `d` (Leviathan et al., 2023): accept it
/// with probability min(1, p(d) / q(d)); otherwise return a replacement drawn from the residual
/// max(0, p − q), renormalised. `p` is the target's distribution, `q` the draft's. The tokens
/// that come out are distributed as the target's. Greedy distributions (one-hot) reduce to
/// "accept when the draft picked the target's argmax, else take the argmax".
pub fn accept_or_replace(d: usize, p: &[f64], q: &[f64], rng: &mut Rng) -> Result<(), i64> {
    let (pd, qd) = (
        p.get(d).copied().unwrap_or(0.0),
        q.get(d).copied().unwrap_or(0.0),
    );
    if qd > 0.0 && rng.next_f64() < (pd / qd).min(1.0) {
        return Ok(());
    }
    let residual: Vec<f64> = p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
    let total: f64 = residual.iter().sum();
    let (weights, total) = if total > 0.0 {
        (residual, total)
    } else {
        (p.to_vec(), p.iter().sum())
    };
    let mut u = rng.next_f64() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return Err(i as i64);
        }
        u -= w;
    }
    Err(weights.iter().rposition(|w| *w > 0.0).unwrap_or(0) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_penalty_can_change_it() {
        let mut logits = vec![0.1, 3.0, 2.9];
        assert_eq!(
            sample(
                &mut logits,
                &SamplingParams::default(),
                &[],
                &mut Rng::seeded(1)
            ),
            1
        );
        let params = SamplingParams {
            repetition_penalty: 1.2,
            ..SamplingParams::default()
        };
        let mut logits = vec![0.1, 3.0, 2.9];
        assert_eq!(sample(&mut logits, &params, &[1], &mut Rng::seeded(1)), 2);
    }

    #[test]
    fn seeds_reproduce_and_top_k_limits_the_choice() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..SamplingParams::default()
        };
        let logits = vec![1.0, 0.9, 0.8, 5.0, 0.1];
        let draw = |seed| {
            let mut rng = Rng::seeded(seed);
            (0..50)
                .map(|_| sample(&mut logits.clone(), &params, &[], &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(draw(7).iter().all(|t| *t == 3 || *t == 0));
        let flat = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        };
        let mut rng = Rng::seeded(3);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[sample(&mut vec![0.0; 4], &flat, &[], &mut rng) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }

    #[test]
    fn a_tiny_temperature_behaves_like_greedy() {
        let params = SamplingParams {
            temperature: 1e-40,
            ..SamplingParams::default()
        };
        let mut rng = Rng::seeded(5);
        for _ in 0..50 {
            assert_eq!(
                sample(&mut vec![0.5, 2.0, -1.0, 1.9], &params, &[], &mut rng),
                1
            );
        }
    }

    #[test]
    fn speculative_sampling_gives_the_targets_distribution() {
        // Target p and a quite different draft q over four tokens.
        let p = [0.5, 0.3, 0.15, 0.05];
        let q = [0.1, 0.2, 0.3, 0.4];
        let mut rng = Rng::seeded(11);
        let mut counts = [0usize; 4];
        let n = 40_000;
        for _ in 0..n {
            // Draw from the draft, then apply the rule.
            let mut u = rng.next_f64();
            let mut d = 3;
            for (i, w) in q.iter().enumerate() {
                if u < *w {
                    d = i;
                    break;
                }
                u -= w;
            }
            let token = match accept_or_replace(d, &p, &q, &mut rng) {
                Ok(()) => d,
                Err(t) => t as usize,
            };
            counts[token] += 1;
        }
        for (c, want) in counts.iter().zip(p) {
            let got = *c as f64 / n as f64;
            assert!((got - want).abs() < 0.01, "{counts:?} vs {p:?}");
        }
        // Greedy: accept exactly the argmax.
        let one = |i: usize| {
            let mut v = vec![0.0; 4];
            v[i] = 1.0;
            v
        };
        assert_eq!(accept_or_replace(2, &one(2), &one(2), &mut rng), Ok(()));
        assert_eq!(accept_or_replace(1, &one(2), &one(1), &mut rng), Err(2));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..SamplingParams::default()
        };
        let mut rng = Rng::seeded(9);
        for _ in 0..100 {
            assert_eq!(
                sample(&mut vec![0.0, 4.0, 0.0, 0.0], &params, &[], &mut rng),
                1
            );
        }
    }
}
