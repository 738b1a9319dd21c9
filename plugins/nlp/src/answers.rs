//! Model outputs to answers: class scores, entities, and answer spans found across a context's
//! windows.

use cresset_torch::tokenizers::Encoding;
use serde_json::{json, Map, Value};

use crate::model::NlpModel;
use crate::tasks::{group_entities, pick_answer, softmax, top_spans, Candidate, TokenPrediction};

/// One QA pair after tokenization: the context and its windows.
pub(crate) struct QaItem {
    pub context: Vec<char>,
    pub windows: Vec<Encoding>,
}

impl NlpModel {
    pub(crate) fn classify(&self, logits: &[f32]) -> Value {
        let probs: Vec<f64> = if self.settings.multi_label || logits.len() == 1 {
            logits
                .iter()
                .map(|&l| 1.0 / (1.0 + (-f64::from(l)).exp()))
                .collect()
        } else {
            softmax(logits)
        };
        let best = probs
            .iter()
            .enumerate()
            .fold(0, |b, (i, p)| if *p > probs[b] { i } else { b });
        let scores: Map<String, Value> = probs
            .iter()
            .enumerate()
            .map(|(i, p)| (self.label(i), json!(p)))
            .collect();
        if self.settings.torchserve_format {
            // The reference handler answers the predicted label.
            return json!(self.label(best));
        }
        json!({"label": self.label(best), "score": probs[best], "scores": scores})
    }

    pub(crate) fn entities(&self, encoding: &Encoding, logits: &[Vec<f32>], text: &str) -> Value {
        let specials = encoding.get_special_tokens_mask();
        let offsets = encoding.get_offsets();
        let tokens: Vec<TokenPrediction> = logits
            .iter()
            .enumerate()
            .filter(|(i, _)| specials.get(*i) == Some(&0))
            .filter_map(|(i, row)| {
                let probs = softmax(row);
                let label = probs
                    .iter()
                    .enumerate()
                    .fold(0, |b, (j, p)| if *p > probs[b] { j } else { b });
                let (start, end) = *offsets.get(i)?;
                Some(TokenPrediction {
                    label,
                    score: probs[label],
                    start,
                    end,
                })
            })
            .collect();
        let chars: Vec<char> = text.chars().collect();
        json!(group_entities(&tokens, &self.labels, &chars))
    }

    pub(crate) fn answer(
        &self,
        item: &QaItem,
        rows: &[(Vec<f32>, Vec<f32>)],
        handle_impossible: bool,
    ) -> Value {
        // As the pipeline: each window proposes its best spans (12 for one answer, since
        // snapping to words can merge some); spans giving the same text (ignoring case) add
        // their scores; the best total wins, unless the null answer beats it.
        let mut answers: Vec<Candidate> = Vec::new();
        let mut null_score = f64::INFINITY;
        for (window, (start, end)) in item.windows.iter().zip(rows) {
            let allowed: Vec<bool> = window
                .get_sequence_ids()
                .iter()
                .zip(window.get_ids())
                .map(|(seq, id)| *seq == Some(1) || Some(*id) == self.cls_id)
                .collect();
            let n = window.len();
            let (spans, null) = top_spans(
                &start[..n],
                &end[..n],
                &allowed,
                self.settings.max_answer_len,
                12,
            );
            null_score = null_score.min(null);
            for span in spans {
                let word_chars = window
                    .token_to_word(span.start)
                    .zip(window.token_to_word(span.end))
                    .and_then(|((_, ws), (_, we))| {
                        Some((
                            window.word_to_chars(ws, 1)?.0,
                            window.word_to_chars(we, 1)?.1,
                        ))
                    });
                let offsets = window.get_offsets();
                let Some((s, e)) = word_chars
                    .or_else(|| Some((offsets.get(span.start)?.0, offsets.get(span.end)?.1)))
                else {
                    continue;
                };
                let text: String = item
                    .context
                    .get(s..e.max(s))
                    .map(|c| c.iter().collect())
                    .unwrap_or_default();
                answers.push(Candidate {
                    score: span.score,
                    start: s,
                    end: e,
                    text,
                });
            }
        }
        match pick_answer(answers, null_score, handle_impossible) {
            Some(a) => {
                json!({"answer": a.text, "score": a.score, "start": a.start, "end": a.end, "has_answer": !a.text.is_empty()})
            }
            _ => json!({
                "answer": "",
                "score": if null_score.is_finite() { null_score } else { 0.0 },
                "start": 0,
                "end": 0,
                "has_answer": false
            }),
        }
    }
}
