//! Turning logits into answers, as HuggingFace pipelines do: label scores, entity grouping
//! (`aggregation_strategy="simple"`) and extractive-QA span selection.

use serde::Serialize;

/// Softmax in f64 (stable).
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits.iter().map(|l| f64::from(l - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / total).collect()
}

/// One token of a text, as token classification sees it.
#[derive(Debug, Clone)]
pub struct TokenPrediction {
    /// The label index with the highest probability.
    pub label: usize,
    /// Its probability.
    pub score: f64,
    /// Character span in the text.
    pub start: usize,
    /// End of the character span (exclusive).
    pub end: usize,
}

/// An entity found in a text.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entity {
    /// The entity type (the label without its `B-`/`I-` prefix).
    pub label: String,
    /// The mean probability of its tokens.
    pub score: f64,
    /// The text it covers.
    pub word: String,
    /// Character start.
    pub start: usize,
    /// Character end (exclusive).
    pub end: usize,
}

fn split_tag(label: &str) -> (bool, &str) {
    // (begins an entity, tag); a label without a prefix continues like `I-`.
    if let Some(tag) = label.strip_prefix("B-") {
        (true, tag)
    } else if let Some(tag) = label.strip_prefix("I-") {
        (false, tag)
    } else {
        (false, label)
    }
}

/// Group per-token predictions into entities (HuggingFace's "simple" aggregation): consecutive
/// tokens with the same tag join unless the later one is a `B-`; the group's score is the mean
/// of its tokens'; groups tagged `O` are dropped. `labels` maps indices to names; `chars` is
/// the text as characters, for the words. An entity's `word` is the text it spans (HuggingFace
/// re-joins the tokens instead, which lower-cases for uncased vocabularies).
pub fn group_entities(
    tokens: &[TokenPrediction],
    labels: &[String],
    chars: &[char],
) -> Vec<Entity> {
    let name = |i: usize| labels.get(i).map(String::as_str).unwrap_or("O");
    let mut groups: Vec<Vec<&TokenPrediction>> = Vec::new();
    for token in tokens {
        let (begins, tag) = split_tag(name(token.label));
        let joins = groups.last().and_then(|g| g.last()).is_some_and(|last| {
            let (_, last_tag) = split_tag(name(last.label));
            last_tag == tag && !begins
        });
        match groups.last_mut() {
            Some(group) if joins => group.push(token),
            _ => groups.push(vec![token]),
        }
    }
    groups
        .into_iter()
        .filter_map(|group| {
            let first = group.first()?;
            let last = group.last()?;
            let (_, tag) = split_tag(name(first.label));
            if tag == "O" {
                return None;
            }
            let score = group.iter().map(|t| t.score).sum::<f64>() / group.len() as f64;
            let word: String = chars
                .get(first.start..last.end.max(first.start).min(chars.len()))
                .map(|c| c.iter().collect())
                .unwrap_or_default();
            Some(Entity {
                label: tag.to_owned(),
                score,
                word,
                start: first.start,
                end: last.end,
            })
        })
        .collect()
}

/// One window's best span, as token indices, with its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    /// First token.
    pub start: usize,
    /// Last token (inclusive).
    pub end: usize,
    /// P(start) × P(end).
    pub score: f64,
}

/// The `k` best answer spans of one window, as HuggingFace's question-answering pipeline
/// finds them. `allowed[i]` is true for context tokens and the CLS token; other positions are
/// masked out before the softmax. Candidates are ranked first and filtered after, as the
/// pipeline does, so fewer than `k` may come back. Also returns the null score
/// P(start = CLS) × P(end = CLS).
pub fn top_spans(
    start_logits: &[f32],
    end_logits: &[f32],
    allowed: &[bool],
    max_answer_len: usize,
    k: usize,
) -> (Vec<Span>, f64) {
    let masked = |logits: &[f32]| -> Vec<f32> {
        logits
            .iter()
            .zip(allowed)
            .map(|(l, ok)| if *ok { *l } else { -10000.0 })
            .collect()
    };
    let mut p_start = softmax(&masked(start_logits));
    let mut p_end = softmax(&masked(end_logits));
    let null = p_start.first().copied().unwrap_or(0.0) * p_end.first().copied().unwrap_or(0.0);
    if let (Some(s), Some(e)) = (p_start.first_mut(), p_end.first_mut()) {
        *s = 0.0;
        *e = 0.0;
    }
    let mut candidates: Vec<Span> = Vec::new();
    for s in 0..p_start.len() {
        let last = (s + max_answer_len.max(1) - 1).min(p_end.len().saturating_sub(1));
        for e in s..=last {
            candidates.push(Span {
                start: s,
                end: e,
                score: p_start[s] * p_end[e],
            });
        }
    }
    // Highest first; ties keep the pipeline's row-major order.
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    candidates.truncate(k);
    // The pipeline's filter also lets position 0 through (its score is 0 by now).
    let ok = |i: usize| i == 0 || allowed.get(i) == Some(&true);
    candidates.retain(|c| ok(c.start) && ok(c.end));
    (candidates, null)
}

/// A candidate answer: a character span of the context and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// P(start) × P(end), summed over spans with the same text.
    pub score: f64,
    /// Character start.
    pub start: usize,
    /// Character end (exclusive).
    pub end: usize,
    /// The context's text there.
    pub text: String,
}

/// The answer the pipeline gives from every window's candidates: spans with the same text
/// (ignoring case) add their scores, the highest total wins (the first on ties), and with
/// `handle_impossible` the null answer wins when its score is higher. `None` means no answer.
pub fn pick_answer(
    candidates: Vec<Candidate>,
    null_score: f64,
    handle_impossible: bool,
) -> Option<Candidate> {
    let mut merged: Vec<Candidate> = Vec::new();
    for c in candidates {
        match merged
            .iter_mut()
            .find(|m| m.text.to_lowercase() == c.text.to_lowercase())
        {
            Some(same) => same.score += c.score,
            None => merged.push(c),
        }
    }
    let best = merged
        .into_iter()
        .fold(None::<Candidate>, |best, c| match best {
            Some(b) if b.score >= c.score => Some(b),
            _ => Some(c),
        })?;
    (!(handle_impossible && null_score > best.score)).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
            .map(String::from)
            .to_vec()
    }

    fn tok(label: usize, score: f64, start: usize, end: usize) -> TokenPrediction {
        TokenPrediction {
            label,
            score,
            start,
            end,
        }
    }

    #[test]
    fn entities_group_like_the_simple_strategy() {
        let text: Vec<char> = "John Smith lives in New York".chars().collect();
        let tokens = [
            tok(1, 0.9, 0, 4),
            tok(2, 0.7, 5, 10),
            tok(0, 0.99, 11, 16),
            tok(0, 0.99, 17, 19),
            tok(3, 0.8, 20, 23),
            tok(4, 0.6, 24, 28),
        ];
        let entities = group_entities(&tokens, &labels(), &text);
        assert_eq!(entities.len(), 2);
        assert_eq!(entities[0].word, "John Smith");
        assert_eq!((entities[0].start, entities[0].end), (0, 10));
        assert!((entities[0].score - 0.8).abs() < 1e-12);
        assert_eq!(entities[1].label, "LOC");
        assert_eq!(entities[1].word, "New York");
        // A B- tag always starts a new entity, even after the same tag.
        let split = group_entities(&[tok(1, 0.5, 0, 4), tok(1, 0.5, 5, 10)], &labels(), &text);
        assert_eq!(split.len(), 2);
    }

    #[test]
    fn answers_merge_by_text_and_the_null_answer_can_win() {
        let c = |score, start, text: &str| Candidate {
            score,
            start,
            end: start + text.len(),
            text: text.into(),
        };
        // Two windows proposing "Paris" (in different case) outscore one "Lyon".
        let picked = pick_answer(
            vec![c(0.3, 10, "Paris"), c(0.4, 40, "Lyon"), c(0.2, 10, "paris")],
            0.1,
            true,
        );
        assert_eq!(
            picked.map(|a| (a.text, a.start)),
            Some(("Paris".into(), 10))
        );
        // A higher null score wins only when impossible answers are allowed.
        assert_eq!(pick_answer(vec![c(0.3, 0, "x")], 0.5, true), None);
        assert!(pick_answer(vec![c(0.3, 0, "x")], 0.5, false).is_some());
        assert_eq!(pick_answer(Vec::new(), 0.5, false), None);
    }

    #[test]
    fn span_selection_respects_context_and_length() {
        // Token 0 is CLS, 1..3 question, 4..9 context.
        let allowed = [
            true, false, false, false, true, true, true, true, true, true,
        ];
        let mut start = vec![0.0f32; 10];
        let mut end = vec![0.0f32; 10];
        start[2] = 9.0; // inside the question: masked out
        start[5] = 5.0;
        end[7] = 5.0;
        let (spans, _) = top_spans(&start, &end, &allowed, 15, 12);
        assert_eq!((spans[0].start, spans[0].end), (5, 7));
        assert!(spans.iter().all(|s| allowed[s.start] && allowed[s.end]));
        assert!(spans.windows(2).all(|w| w[0].score >= w[1].score));
        let (spans, _) = top_spans(&start, &end, &allowed, 2, 12);
        assert!(spans.iter().all(|s| s.end - s.start < 2));
        // A window whose CLS dominates scores a high null score.
        let mut cls = vec![0.0f32; 10];
        cls[0] = 20.0;
        let (_, null) = top_spans(&cls, &cls, &allowed, 15, 12);
        assert!(null > 0.99);
    }
}
