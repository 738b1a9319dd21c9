//! BERT-family encoders (BERT, RoBERTa, DistilBERT) with their task heads, driven by a
//! HuggingFace `config.json` and checkpoint.
//!
//! All three are post-LayerNorm transformer encoders and differ only in embeddings, weight
//! names and classification heads, so one implementation serves them. Attention is libtorch's
//! fused `scaled_dot_product_attention` with the padding mask (our BetterTransformer).

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::decoder::{Linear, Norm};
use crate::layers::{merge_heads, split_heads, Activation, HfConfig};
use crate::weights::Weights;
use crate::ModelError;

/// The encoder family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderArch {
    /// `bert`: absolute positions, token types, pooler.
    Bert,
    /// `roberta` (also `xlm-roberta`, `camembert`): positions offset past the padding index.
    Roberta,
    /// `distilbert`: no token types, different weight names.
    DistilBert,
}

/// What sits on top of the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderHead {
    /// No head: hidden states (and sentence embeddings by mean pooling).
    Base,
    /// `*ForSequenceClassification`.
    SequenceClassification,
    /// `*ForTokenClassification`.
    TokenClassification,
    /// `*ForQuestionAnswering`.
    QuestionAnswering,
}

impl EncoderHead {
    /// The head an `architectures` entry names, with its family; `None` if it is not an
    /// encoder this crate has.
    pub fn from_architecture(name: &str) -> Option<(EncoderArch, Self)> {
        let (arch, rest) = [
            ("XLMRoberta", EncoderArch::Roberta),
            ("Camembert", EncoderArch::Roberta),
            ("Roberta", EncoderArch::Roberta),
            ("DistilBert", EncoderArch::DistilBert),
            ("Bert", EncoderArch::Bert),
        ]
        .into_iter()
        .find_map(|(prefix, arch)| name.strip_prefix(prefix).map(|rest| (arch, rest)))?;
        let head = match rest {
            "Model" => Self::Base,
            "ForSequenceClassification" => Self::SequenceClassification,
            "ForTokenClassification" => Self::TokenClassification,
            "ForQuestionAnswering" => Self::QuestionAnswering,
            _ => return None,
        };
        Some((arch, head))
    }
}

/// The sizes and options read from `config.json`.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Family.
    pub arch: EncoderArch,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden size.
    pub hidden: i64,
    /// Layers.
    pub layers: i64,
    /// Attention heads.
    pub heads: i64,
    /// Feed-forward size.
    pub intermediate: i64,
    /// Positions the model has embeddings for.
    pub max_positions: i64,
    /// Token types (0 for DistilBERT).
    pub type_vocab_size: i64,
    /// Layer norm epsilon.
    pub eps: f64,
    /// Feed-forward activation.
    pub act: Activation,
    /// Padding token id.
    pub pad_token_id: i64,
    /// Labels of the classification head (`num_labels` or the size of `id2label`).
    pub num_labels: i64,
}

impl EncoderConfig {
    /// Read from a parsed `config.json`.
    pub fn from_hf(config: &HfConfig) -> Result<Self, ModelError> {
        let model_type = config.opt_str("model_type")?.unwrap_or_default();
        let arch = match model_type {
            "bert" => EncoderArch::Bert,
            "roberta" | "xlm-roberta" | "camembert" => EncoderArch::Roberta,
            "distilbert" => EncoderArch::DistilBert,
            other => {
                return Err(ModelError::Config(format!(
                    "model_type {other:?} is not an encoder Cresset has (bert, roberta, distilbert)"
                )))
            }
        };
        let num_labels = match config.id2label() {
            Some(labels) => labels.len() as i64,
            None => config.opt_usize("num_labels")?.unwrap_or(2),
        };
        // transformers' defaults: RoBERTa pads with 1, the others with 0.
        let default_pad = i64::from(arch == EncoderArch::Roberta);
        let pad_token_id = config
            .token_ids("pad_token_id")?
            .first()
            .copied()
            .unwrap_or(default_pad);
        if arch == EncoderArch::DistilBert {
            let act = config.opt_str("activation")?.unwrap_or("gelu");
            return Ok(Self {
                arch,
                vocab_size: config.usize("vocab_size")?,
                hidden: config.usize("dim")?,
                layers: config.usize("n_layers")?,
                heads: config.usize("n_heads")?,
                intermediate: config.usize("hidden_dim")?,
                max_positions: config.usize("max_position_embeddings")?,
                type_vocab_size: 0,
                eps: 1e-12,
                act: Activation::parse(act)?,
                pad_token_id,
                num_labels,
            });
        }
        match config.opt_str("position_embedding_type")? {
            None | Some("absolute") => {}
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "position_embedding_type {other:?} is not supported (only \"absolute\")"
                )))
            }
        }
        let act = config.opt_str("hidden_act")?.unwrap_or("gelu");
        Ok(Self {
            arch,
            vocab_size: config.usize("vocab_size")?,
            hidden: config.usize("hidden_size")?,
            layers: config.usize("num_hidden_layers")?,
            heads: config.usize("num_attention_heads")?,
            intermediate: config.usize("intermediate_size")?,
            max_positions: config.usize("max_position_embeddings")?,
            type_vocab_size: config.opt_usize("type_vocab_size")?.unwrap_or(2),
            eps: config.opt_f64("layer_norm_eps")?.unwrap_or(1e-12),
            act: Activation::parse(act)?,
            pad_token_id,
            num_labels,
        })
    }

    /// The longest input the position embeddings allow (RoBERTa spends `pad + 1` of them).
    pub fn max_input_len(&self) -> i64 {
        match self.arch {
            EncoderArch::Roberta => self.max_positions - self.pad_token_id - 1,
            _ => self.max_positions,
        }
    }
}

struct Layer {
    /// Query, key and value projections fused into one `[3 × hidden, hidden]` matmul.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    ff_in: Linear,
    ff_out: Linear,
    ff_norm: Norm,
}

enum Head {
    Base,
    /// BERT: pooler (dense + tanh on the first token), then the classifier.
    BertSequence {
        pooler: Linear,
        classifier: Linear,
    },
    /// RoBERTa: dense + tanh on the first token, then out_proj.
    RobertaSequence {
        dense: Linear,
        out_proj: Linear,
    },
    /// DistilBERT: pre_classifier + ReLU on the first token, then the classifier.
    DistilSequence {
        pre: Linear,
        classifier: Linear,
    },
    /// A linear layer on every token (token classification, and QA with 2 outputs).
    PerToken(Linear),
}

/// What a forward pass gives.
pub struct EncoderOutput {
    /// `[batch, seq, hidden]`.
    pub hidden: Tensor,
    /// The head's output: `[batch, labels]` for sequence classification, `[batch, seq, labels]`
    /// for token classification, `[batch, seq, 2]` for QA (start, end); `None` for the base.
    pub logits: Option<Tensor>,
}

/// A loaded encoder with its head.
pub struct Encoder {
    /// Its configuration.
    pub config: EncoderConfig,
    /// Its head.
    pub head_kind: EncoderHead,
    word: Tensor,
    position: Tensor,
    token_type: Option<Tensor>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    head: Head,
    device: Device,
    kind: Kind,
}

impl Encoder {
    /// Load from a checkpoint directory (`config.json` + safetensors) for the given head.
    pub fn load(
        dir: &Path,
        config: &HfConfig,
        head: EncoderHead,
        kind: Kind,
        device: Device,
    ) -> Result<Self, ModelError> {
        let cfg = EncoderConfig::from_hf(config)?;
        if cfg.hidden % cfg.heads != 0 {
            return Err(ModelError::Config(format!(
                "hidden size {} is not a multiple of the {} attention heads",
                cfg.hidden, cfg.heads
            )));
        }
        let mut w = Weights::load(dir, kind, device)?;
        let family = match cfg.arch {
            EncoderArch::Bert => "bert",
            EncoderArch::Roberta => "roberta",
            EncoderArch::DistilBert => "distilbert",
        };
        // Task checkpoints nest the encoder under the family name; bare models do not.
        let base = if w.contains(&format!("{family}.embeddings.word_embeddings.weight")) {
            format!("{family}.")
        } else {
            String::new()
        };
        let (h, i) = (cfg.hidden, cfg.intermediate);
        let word = w.take(
            &format!("{base}embeddings.word_embeddings.weight"),
            &[cfg.vocab_size, h],
        )?;
        let position = w.take(
            &format!("{base}embeddings.position_embeddings.weight"),
            &[cfg.max_positions, h],
        )?;
        let token_type = if cfg.type_vocab_size > 0 {
            Some(w.take(
                &format!("{base}embeddings.token_type_embeddings.weight"),
                &[cfg.type_vocab_size, h],
            )?)
        } else {
            None
        };
        let embed_norm =
            Norm::load_layer_norm(&mut w, &format!("{base}embeddings.LayerNorm"), h, cfg.eps)?;
        let mut layers = Vec::new();
        for l in 0..cfg.layers {
            let layer = if cfg.arch == EncoderArch::DistilBert {
                let p = format!("{base}transformer.layer.{l}");
                Layer {
                    qkv: Linear::fuse(&[
                        Linear::load(&mut w, &format!("{p}.attention.q_lin"), h, h)?,
                        Linear::load(&mut w, &format!("{p}.attention.k_lin"), h, h)?,
                        Linear::load(&mut w, &format!("{p}.attention.v_lin"), h, h)?,
                    ]),
                    attn_out: Linear::load(&mut w, &format!("{p}.attention.out_lin"), h, h)?,
                    attn_norm: Norm::load_layer_norm(
                        &mut w,
                        &format!("{p}.sa_layer_norm"),
                        h,
                        cfg.eps,
                    )?,
                    ff_in: Linear::load(&mut w, &format!("{p}.ffn.lin1"), h, i)?,
                    ff_out: Linear::load(&mut w, &format!("{p}.ffn.lin2"), i, h)?,
                    ff_norm: Norm::load_layer_norm(
                        &mut w,
                        &format!("{p}.output_layer_norm"),
                        h,
                        cfg.eps,
                    )?,
                }
            } else {
                let p = format!("{base}encoder.layer.{l}");
                Layer {
                    qkv: Linear::fuse(&[
                        Linear::load(&mut w, &format!("{p}.attention.self.query"), h, h)?,
                        Linear::load(&mut w, &format!("{p}.attention.self.key"), h, h)?,
                        Linear::load(&mut w, &format!("{p}.attention.self.value"), h, h)?,
                    ]),
                    attn_out: Linear::load(&mut w, &format!("{p}.attention.output.dense"), h, h)?,
                    attn_norm: Norm::load_layer_norm(
                        &mut w,
                        &format!("{p}.attention.output.LayerNorm"),
                        h,
                        cfg.eps,
                    )?,
                    ff_in: Linear::load(&mut w, &format!("{p}.intermediate.dense"), h, i)?,
                    ff_out: Linear::load(&mut w, &format!("{p}.output.dense"), i, h)?,
                    ff_norm: Norm::load_layer_norm(
                        &mut w,
                        &format!("{p}.output.LayerNorm"),
                        h,
                        cfg.eps,
                    )?,
                }
            };
            layers.push(layer);
        }
        let n = cfg.num_labels;
        let head_weights = match (head, cfg.arch) {
            (EncoderHead::Base, _) => Head::Base,
            (EncoderHead::SequenceClassification, EncoderArch::Bert) => Head::BertSequence {
                pooler: Linear::load(&mut w, &format!("{base}pooler.dense"), h, h)?,
                classifier: Linear::load(&mut w, "classifier", h, n)?,
            },
            (EncoderHead::SequenceClassification, EncoderArch::Roberta) => Head::RobertaSequence {
                dense: Linear::load(&mut w, "classifier.dense", h, h)?,
                out_proj: Linear::load(&mut w, "classifier.out_proj", h, n)?,
            },
            (EncoderHead::SequenceClassification, EncoderArch::DistilBert) => {
                Head::DistilSequence {
                    pre: Linear::load(&mut w, "pre_classifier", h, h)?,
                    classifier: Linear::load(&mut w, "classifier", h, n)?,
                }
            }
            (EncoderHead::TokenClassification, _) => {
                Head::PerToken(Linear::load(&mut w, "classifier", h, n)?)
            }
            (EncoderHead::QuestionAnswering, _) => {
                Head::PerToken(Linear::load(&mut w, "qa_outputs", h, 2)?)
            }
        };
        Ok(Self {
            config: cfg,
            head_kind: head,
            word,
            position,
            token_type,
            embed_norm,
            layers,
            head: head_weights,
            device,
            kind,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The floating dtype of the weights.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The embedding layer's output (word + position + token type, then LayerNorm):
    /// `[batch, seq, hidden]`. This is the layer explanations attribute to.
    pub fn embed(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>) -> Tensor {
        let seq = input_ids.size()[1];
        let positions = match self.config.arch {
            EncoderArch::Roberta => {
                // Positions count real tokens from pad + 1; padding keeps the pad index.
                let pad = self.config.pad_token_id;
                let mask = input_ids.ne(pad).to_kind(Kind::Int64);
                mask.cumsum(1, Kind::Int64) * &mask + pad
            }
            _ => Tensor::arange(seq, (Kind::Int64, input_ids.device())).unsqueeze(0),
        };
        let mut x = Tensor::embedding(&self.word, input_ids, -1, false, false)
            + Tensor::embedding(&self.position, &positions, -1, false, false);
        if let Some(table) = &self.token_type {
            // A model with one token type (RoBERTa) ignores the tokenizer's pair type ids.
            let max_type = self.config.type_vocab_size - 1;
            x = match token_type_ids {
                Some(types) if max_type > 0 => {
                    x + Tensor::embedding(table, &types.clamp(0, max_type), -1, false, false)
                }
                _ => x + table.get(0),
            };
        }
        self.embed_norm.forward(&x)
    }

    /// The encoder stack and head from the embedding layer's output. `attention_mask` is
    /// `[batch, seq]`, 1 for real tokens.
    pub fn forward_embedded(&self, embedded: &Tensor, attention_mask: &Tensor) -> EncoderOutput {
        let heads = self.config.heads;
        // [b, 1, 1, s]: true where a key may be attended to.
        let mask = attention_mask.ne(0).unsqueeze(1).unsqueeze(1);
        let mut x = embedded.shallow_clone();
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x).split(self.config.hidden, -1);
            let q = split_heads(&qkv[0], heads);
            let k = split_heads(&qkv[1], heads);
            let v = split_heads(&qkv[2], heads);
            let attn = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(&mask),
                0.0,
                false,
                None,
                false,
            );
            let attn = layer.attn_out.forward(&merge_heads(&attn));
            x = layer.attn_norm.forward(&(attn + &x));
            let ff = layer
                .ff_out
                .forward(&self.config.act.forward(&layer.ff_in.forward(&x)));
            x = layer.ff_norm.forward(&(ff + &x));
        }
        let first = || x.select(1, 0);
        let logits = match &self.head {
            Head::Base => None,
            Head::BertSequence { pooler, classifier } => {
                Some(classifier.forward(&pooler.forward(&first()).tanh()))
            }
            Head::RobertaSequence { dense, out_proj } => {
                Some(out_proj.forward(&dense.forward(&first()).tanh()))
            }
            Head::DistilSequence { pre, classifier } => {
                Some(classifier.forward(&pre.forward(&first()).relu()))
            }
            Head::PerToken(linear) => Some(linear.forward(&x)),
        };
        EncoderOutput { hidden: x, logits }
    }

    /// A full forward pass. `input_ids` and `attention_mask` are `[batch, seq]` int64 on the
    /// model's device.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
    ) -> EncoderOutput {
        let embedded = self.embed(input_ids, token_type_ids);
        self.forward_embedded(&embedded, attention_mask)
    }
}

/// Sentence embeddings as sentence-transformers makes them: the mean of the hidden states over
/// real tokens, L2-normalised. `hidden` is `[b, s, h]`, `attention_mask` `[b, s]`; returns
/// `[b, h]` in f32.
pub fn mean_pool_normalized(hidden: &Tensor, attention_mask: &Tensor) -> Tensor {
    let hidden = hidden.to_kind(Kind::Float);
    let mask = attention_mask.to_kind(Kind::Float).unsqueeze(-1);
    let summed = (&hidden * &mask).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let counts = mask
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        .clamp_min(1e-9);
    let mean = summed / counts;
    let norm = mean
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12);
    mean / norm
}

/// Gauss–Legendre nodes on [0, 1] and their weights (summing to 1), as Captum's default
/// integration method uses.
pub fn gauss_legendre(n: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // Newton's method on P_n from Tricomi's initial guess.
        let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
        let mut derivative = 1.0;
        for _ in 0..100 {
            let (mut p0, mut p1) = (1.0f64, x);
            for k in 2..=n {
                let k = k as f64;
                let p2 = ((2.0 * k - 1.0) * x * p1 - (k - 1.0) * p0) / k;
                p0 = p1;
                p1 = p2;
            }
            let pn = if n == 0 { 1.0 } else { p1 };
            let pn_1 = if n == 0 { 0.0 } else { p0 };
            derivative = n as f64 * (x * pn - pn_1) / (x * x - 1.0);
            let step = pn / derivative;
            x -= step;
            if step.abs() < 1e-15 {
                break;
            }
        }
        let weight = 2.0 / ((1.0 - x * x) * derivative * derivative);
        // Map [-1, 1] to [0, 1].
        out.push(((1.0 - x) / 2.0, weight / 2.0));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// Layer Integrated Gradients over the embedding layer's output, for one input.
pub struct Attribution {
    /// Per-token attributions (summed over the hidden dimension).
    pub per_token: Vec<f32>,
    /// The head's output for the target at the input, f(x).
    pub at_input: f64,
    /// The same at the baseline, f(x').
    pub at_baseline: f64,
}

impl Encoder {
    /// Integrated gradients of `target` (a class index of a sequence-classification head)
    /// with respect to the embedding layer's output, from the embedding of `baseline_ids` to
    /// that of `input_ids` (both `[1, seq]`), with `n_steps` Gauss–Legendre steps run in
    /// chunks of `chunk` rows. Runs with autograd: call it outside inference mode.
    #[allow(clippy::too_many_arguments)]
    pub fn integrated_gradients(
        &self,
        input_ids: &Tensor,
        baseline_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
        target: i64,
        n_steps: usize,
        chunk: usize,
    ) -> Result<Attribution, ModelError> {
        if !matches!(self.head_kind, EncoderHead::SequenceClassification) {
            return Err(ModelError::Unsupported(
                "explanations are available for sequence classification".into(),
            ));
        }
        let target_of = |out: EncoderOutput| -> Result<Tensor, ModelError> {
            let logits = out
                .logits
                .ok_or_else(|| ModelError::Unsupported("the model has no head".into()))?;
            Ok(logits.to_kind(Kind::Float).select(1, target))
        };
        let (x, x0) = tch::no_grad(|| {
            (
                self.embed(input_ids, token_type_ids),
                self.embed(baseline_ids, token_type_ids),
            )
        });
        let (at_input, at_baseline) = tch::no_grad(|| -> Result<(f64, f64), ModelError> {
            let fx = target_of(self.forward_embedded(&x, attention_mask))?;
            let fb = target_of(self.forward_embedded(&x0, attention_mask))?;
            Ok((fx.double_value(&[0]), fb.double_value(&[0])))
        })?;
        let diff = &x - &x0;
        let nodes = gauss_legendre(n_steps.max(1));
        let mut total_grad = Tensor::zeros_like(&x).to_kind(Kind::Float);
        for part in nodes.chunks(chunk.max(1)) {
            let rows = part.len() as i64;
            let alphas: Vec<f32> = part.iter().map(|(a, _)| *a as f32).collect();
            let weights: Vec<f32> = part.iter().map(|(_, w)| *w as f32).collect();
            let alphas = Tensor::from_slice(&alphas)
                .to_device(self.device)
                .to_kind(self.kind)
                .view([rows, 1, 1]);
            let weights = Tensor::from_slice(&weights).to_device(self.device);
            let scaled = (&x0 + &alphas * &diff).detach().set_requires_grad(true);
            let mask = attention_mask.expand([rows, -1], false);
            let out = target_of(self.forward_embedded(&scaled, &mask))?;
            (out * weights).sum(Kind::Float).backward();
            let grad = scaled.grad().to_kind(Kind::Float);
            total_grad += grad.sum_dim_intlist([0i64].as_slice(), true, Kind::Float);
        }
        let attributions = (diff.to_kind(Kind::Float) * total_grad)
            .sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
            .squeeze_dim(0)
            .to_device(Device::Cpu);
        let per_token = Vec::<f32>::try_from(&attributions)?;
        Ok(Attribution {
            per_token,
            at_input,
            at_baseline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_legendre_integrates_polynomials_exactly() {
        let nodes = gauss_legendre(5);
        let total: f64 = nodes.iter().map(|(_, w)| w).sum();
        assert!((total - 1.0).abs() < 1e-12);
        // ∫0^1 x^7 dx = 1/8, exact for 5 nodes (degree ≤ 9).
        let integral: f64 = nodes.iter().map(|(x, w)| w * x.powi(7)).sum();
        assert!((integral - 0.125).abs() < 1e-12, "{integral}");
        assert!(nodes.iter().all(|(x, _)| *x > 0.0 && *x < 1.0));
    }

    #[test]
    fn architectures_map_to_heads() {
        assert_eq!(
            EncoderHead::from_architecture("BertForTokenClassification"),
            Some((EncoderArch::Bert, EncoderHead::TokenClassification))
        );
        assert_eq!(
            EncoderHead::from_architecture("DistilBertForQuestionAnswering"),
            Some((EncoderArch::DistilBert, EncoderHead::QuestionAnswering))
        );
        assert_eq!(
            EncoderHead::from_architecture("XLMRobertaModel"),
            Some((EncoderArch::Roberta, EncoderHead::Base))
        );
        assert_eq!(EncoderHead::from_architecture("BertForMaskedLM"), None);
        assert_eq!(EncoderHead::from_architecture("GPT2LMHeadModel"), None);
    }
}
