//! Explanations: integrated gradients of a class score with respect to the input embeddings
//! (Captum's `LayerIntegratedGradients`, as the reference handler's `explain`).

use cresset_plugin_api::PluginError;
use cresset_torch::tch::Tensor;
use cresset_torch::InferenceMode;
use serde_json::{json, Map, Value};

use crate::model::Network;
use crate::{input, NlpHandler, MAX_N_STEPS};

impl NlpHandler {
    pub(crate) fn explain_one(
        &self,
        text_field: &str,
        text: &str,
        options: &Map<String, Value>,
    ) -> Result<Value, PluginError> {
        let Network::Encoder(encoder) = &**self.network else {
            return Err(PluginError::unsupported(
                "explanations need an encoder model",
            ));
        };
        let encoding = self.model.encode_text(text_field, text)?;
        let (ids, types, mask) = self.model.batch_tensors(&[&encoding], self.device);
        let baseline_ids: Vec<i64> = encoding
            .get_ids()
            .iter()
            .zip(encoding.get_special_tokens_mask())
            .map(|(&id, &special)| {
                if special == 1 {
                    i64::from(id)
                } else {
                    self.model.pad_id
                }
            })
            .collect();
        let baseline = Tensor::from_slice(&baseline_ids)
            .view([1, baseline_ids.len() as i64])
            .to_device(self.device);
        let predicted = {
            let _mode = InferenceMode::enter();
            let out = encoder.forward(&ids, Some(&types), &mask);
            out.logits
                .map(|l| l.argmax(-1, false).int64_value(&[0]))
                .unwrap_or(0)
        };
        let target = match options.get("target") {
            None | Some(Value::Null) => predicted,
            Some(Value::String(label)) => {
                let known = &self.model.labels[..self
                    .model
                    .labels
                    .len()
                    .min(encoder.config.num_labels as usize)];
                known.iter().position(|l| l == label).ok_or_else(|| {
                    PluginError::invalid_input(format!(
                        "`target` {label:?} is not a label (labels: {})",
                        self.model.labels.join(", ")
                    ))
                })? as i64
            }
            Some(v) => v
                .as_u64()
                .filter(|&i| i < encoder.config.num_labels as u64)
                .map(|i| i as i64)
                .ok_or_else(|| {
                    PluginError::invalid_input(format!(
                        "`target` must be a label or a class index below {}. Given: {v}",
                        encoder.config.num_labels
                    ))
                })?,
        };
        let n_steps = input::opt_uint(options, "n_steps", MAX_N_STEPS)?
            .map(|n| n.max(1) as usize)
            .unwrap_or(self.model.settings.n_steps);
        let attribution = encoder
            .integrated_gradients(
                &ids,
                &baseline,
                Some(&types),
                &mask,
                target,
                n_steps,
                self.model.settings.explain_batch,
            )
            .map_err(PluginError::from)?;
        let total: f64 = attribution.per_token.iter().map(|&a| f64::from(a)).sum();
        let expected = attribution.at_input - attribution.at_baseline;
        Ok(json!({
            "tokens": encoding.get_tokens(),
            "attributions": attribution.per_token,
            "target": target,
            "label": self.model.label(target as usize),
            "n_steps": n_steps,
            "f_input": attribution.at_input,
            "f_baseline": attribution.at_baseline,
            "convergence_delta": total - expected,
        }))
    }
}
