//! Forward passes: every sequence of a batch of requests in as few encoder passes as the token
//! budget allows.

use cresset_plugin_api::PluginError;
use cresset_torch::tch::{Device, Kind, Tensor};
use cresset_torch::tokenizers::Encoding;
use cresset_torch::InferenceMode;

use crate::model::Network;
use crate::NlpHandler;

impl NlpHandler {
    /// Forward passes over every sequence, as few as the token budget allows (one for any usual
    /// batch); returns `(logits, hidden, mask)` on the CPU in f32, rows in order, padded to the
    /// longest sequence.
    pub(crate) fn run_encoder_chunked(
        &mut self,
        encodings: &[&Encoding],
    ) -> Result<(Option<Tensor>, Tensor, Tensor), PluginError> {
        let width = encodings.iter().map(|e| e.len()).max().unwrap_or(1).max(1) as i64;
        let mut logits = Vec::new();
        let mut hidden = Vec::new();
        let mut masks = Vec::new();
        let mut start = 0;
        while start < encodings.len() {
            let mut end = start + 1;
            let mut longest = encodings[start].len();
            while end < encodings.len() {
                let len = longest.max(encodings[end].len());
                if len * (end + 1 - start) > self.model.settings.max_batch_tokens {
                    break;
                }
                longest = len;
                end += 1;
            }
            let (l, h, m) = self.run_encoder(&encodings[start..end])?;
            self.count_pass();
            // Pad each chunk's rows to the overall longest so that the chunks stack.
            let pad = width - h.size()[1];
            if let Some(l) = l {
                logits.push(if l.dim() == 3 {
                    l.constant_pad_nd([0, 0, 0, pad])
                } else {
                    l
                });
            }
            hidden.push(h.constant_pad_nd([0, 0, 0, pad]));
            masks.push(m.constant_pad_nd([0, pad]));
            start = end;
        }
        let logits = (!logits.is_empty()).then(|| Tensor::cat(&logits, 0));
        Ok((logits, Tensor::cat(&hidden, 0), Tensor::cat(&masks, 0)))
    }

    /// One forward pass over these sequences; returns `(logits, hidden, mask)` on the CPU in f32.
    fn run_encoder(
        &self,
        encodings: &[&Encoding],
    ) -> Result<(Option<Tensor>, Tensor, Tensor), PluginError> {
        let Network::Encoder(encoder) = &**self.network else {
            return Err(PluginError::internal("encoder task without an encoder"));
        };
        let (ids, types, mask) = self.model.batch_tensors(encodings, self.device);
        let _mode = InferenceMode::enter();
        let out = encoder.forward(&ids, Some(&types), &mask);
        let cpu = |t: Tensor| t.to_kind(Kind::Float).to_device(Device::Cpu);
        Ok((
            out.logits.map(cpu),
            cpu(out.hidden),
            mask.to_device(Device::Cpu),
        ))
    }
}
