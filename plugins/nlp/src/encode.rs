//! Requests to token ids: texts, question/context pairs cut into windows, generation prompts
//! with their options, and padded batches.

use cresset_plugin_api::PluginError;
use cresset_torch::generation::GenerationRequest;
use cresset_torch::sampling::SamplingParams;
use cresset_torch::tch::{Device, Tensor};
use cresset_torch::tokenizers::{Encoding, PostProcessor, TruncationDirection};
use serde_json::{Map, Value};

use crate::input;
use crate::model::NlpModel;
use crate::MAX_WINDOWS;

impl NlpModel {
    pub(crate) fn encode_text(&self, field: &str, text: &str) -> Result<Encoding, PluginError> {
        let encoding = self
            .tokenizer
            .encode_char_offsets(text, true)
            .map_err(|e| PluginError::invalid_input(format!("cannot tokenize `{field}`: {e}")))?;
        let max = self.settings.max_length;
        if encoding.len() > max {
            return Err(PluginError::invalid_input(format!(
                "`{field}` is {} tokens long; max_length is {max} (set `handler.truncation = true` to cut it)",
                encoding.len()
            )));
        }
        Ok(encoding)
    }

    /// Tokenize a question with its context, cutting a long context into overlapping windows
    /// of at most `max_length` tokens that share `doc_stride` context tokens (as HuggingFace's
    /// `truncation="only_second"` with `stride` does). The windows are built here from the
    /// context's own truncation, then the pair template, because tokenizers 0.23.2 merges the
    /// overflow of a truncated pair differently from its Python release.
    pub(crate) fn encode_pair(
        &self,
        field: &str,
        question: &str,
        context: &str,
    ) -> Result<Vec<Encoding>, PluginError> {
        // Each sequence is encoded without the post-processor, which runs once, on the pair.
        let tokenize = |text: &str| {
            self.bare_tokenizer
                .encode_char_offsets(text, false)
                .map_err(|e| PluginError::invalid_input(format!("cannot tokenize `{field}`: {e}")))
        };
        let question_enc = tokenize(question)?;
        let mut context_enc = tokenize(context)?;
        let added = self
            .tokenizer
            .get_post_processor()
            .map(|p| p.added_tokens(true))
            .unwrap_or(0);
        let max = self.settings.max_length;
        let room = max.saturating_sub(added + question_enc.len());
        if room == 0 || (context_enc.len() > room && room <= self.settings.doc_stride) {
            return Err(PluginError::invalid_input(format!(
                "`{field}`: the question is {} tokens long, which leaves no room for the context \
                 within max_length {max} (with doc_stride {})",
                question_enc.len(),
                self.settings.doc_stride
            )));
        }
        context_enc.truncate(room, self.settings.doc_stride, TruncationDirection::Right);
        let mut pieces = context_enc.take_overflowing();
        pieces.insert(0, context_enc);
        if pieces.len() > MAX_WINDOWS {
            return Err(PluginError::invalid_input(format!(
                "`{field}`: the context needs {} windows; the most is {MAX_WINDOWS}",
                pieces.len()
            )));
        }
        pieces
            .into_iter()
            .map(|piece| {
                self.tokenizer
                    .post_process(question_enc.clone(), Some(piece), true)
                    .map_err(|e| PluginError::internal(format!("tokenizer: {e}")))
            })
            .collect()
    }

    pub(crate) fn generation_request(
        &self,
        field: &str,
        prompt: &str,
        options: &Map<String, Value>,
    ) -> Result<GenerationRequest, PluginError> {
        let context = self.context;
        let ids: Vec<i64> = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| PluginError::invalid_input(format!("cannot tokenize `{field}`: {e}")))?
            .get_ids()
            .iter()
            .map(|&i| i64::from(i))
            .collect();
        let max_new = input::opt_uint(options, "max_new_tokens", context)?
            .map(|n| n as usize)
            .unwrap_or(self.settings.max_new_tokens);
        if ids.is_empty() {
            return Err(PluginError::invalid_input(format!(
                "`{field}` has no tokens"
            )));
        }
        if (ids.len() + max_new) as u64 > context {
            return Err(PluginError::invalid_input(format!(
                "`{field}` is {} tokens long; with max_new_tokens {max_new} that exceeds the \
                 model's context of {context} tokens",
                ids.len()
            )));
        }
        // Sampling when asked for (`do_sample`), or implied by a sampling parameter; greedy
        // otherwise, and always when `do_sample` is false or `temperature` is 0.
        let do_sample = input::opt_bool(options, "do_sample")?;
        let temperature = input::opt_f64(options, "temperature", 0.0, 100.0)?;
        let top_k = input::opt_uint(options, "top_k", 1 << 20)?.unwrap_or(0) as usize;
        let top_p = input::opt_f64(options, "top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
        let implied = temperature.is_some() || top_k > 0 || top_p < 1.0;
        let temperature = match do_sample {
            Some(false) => 0.0,
            _ if do_sample == Some(true) || implied => temperature.unwrap_or(1.0),
            _ => 0.0,
        };
        let sampling = SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p,
            repetition_penalty: input::opt_f64(options, "repetition_penalty", 0.01, 100.0)?
                .unwrap_or(1.0) as f32,
        };
        Ok(GenerationRequest {
            prompt: ids,
            max_new_tokens: max_new,
            sampling,
            seed: input::opt_uint(options, "seed", u64::MAX)?,
            stop_ids: self.eos_ids.clone(),
        })
    }

    /// Pad a list of encodings into `[n, longest]` id, type and mask tensors on the device.
    pub(crate) fn batch_tensors(
        &self,
        encodings: &[&Encoding],
        device: Device,
    ) -> (Tensor, Tensor, Tensor) {
        let longest = encodings.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
        let n = encodings.len();
        let mut ids = vec![self.pad_id; n * longest];
        let mut types = vec![0i64; n * longest];
        let mut mask = vec![0i64; n * longest];
        for (row, e) in encodings.iter().enumerate() {
            for (j, ((&id, &ty), &m)) in e
                .get_ids()
                .iter()
                .zip(e.get_type_ids())
                .zip(e.get_attention_mask())
                .enumerate()
            {
                ids[row * longest + j] = i64::from(id);
                types[row * longest + j] = i64::from(ty);
                mask[row * longest + j] = i64::from(m);
            }
        }
        let shape = [n as i64, longest as i64];
        let make = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
        (make(&ids), make(&types), make(&mask))
    }
}
