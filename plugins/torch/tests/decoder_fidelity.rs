//! Fidelity of the decoder architectures and the GGUF reader against HuggingFace transformers:
//! small random Llama checkpoints (grouped-query attention; tied and untied embeddings; Llama 3
//! RoPE scaling), GGUF files written from one of them with llama.cpp's `gguf` package (Q8_0 and
//! Q4_1), a small random BLOOM (ALiBi), and the real SmolLM2-135M-Instruct GGUF, all made by
//! `scripts/make_llm_fixtures.py`.

mod common;

use std::path::PathBuf;

use common::{expected, fixtures, floats, ids, max_abs_diff, prompt_logits, tensor_floats, Case};

use cresset_torch::decoder::{fused_decode_calls, Decoder, KvReads, LayerTarget, LoadOptions};
use cresset_torch::gguf::{unpermute_qk, Gguf};
use cresset_torch::layers::HfConfig;
use cresset_torch::tch::{self, Device, Kind};
use cresset_torch::weights::Weights;

/// Greedy decoding of several prompts at once, each in its own cache slot: prefill each, then
/// decode all rows in one forward pass per step. Run twice, with the cache read exactly and
/// bucketed (as on a GPU: the masked stale positions must change nothing), which must agree.
fn greedy(model: &Decoder, prompts: &[Vec<i64>], steps: usize) -> Vec<Vec<i64>> {
    let exact = greedy_reading(model, prompts, steps, KvReads::Exact);
    let bucketed = greedy_reading(model, prompts, steps, KvReads::Bucketed);
    assert_eq!(exact, bucketed, "bucketed cache reads change the tokens");
    exact
}

fn greedy_reading(
    model: &Decoder,
    prompts: &[Vec<i64>],
    steps: usize,
    reads: KvReads,
) -> Vec<Vec<i64>> {
    let _guard = tch::no_grad_guard();
    let mut cache = model.new_cache(prompts.len(), 256);
    cache.reads = reads;
    let mut last: Vec<i64> = prompts
        .iter()
        .enumerate()
        .map(|(slot, p)| {
            let logits = model
                .forward(&[slot], &[p.clone()], &mut cache, true)
                .expect("prefill");
            logits.view([-1]).argmax(0, false).int64_value(&[])
        })
        .collect();
    let mut out: Vec<Vec<i64>> = last.iter().map(|&t| vec![t]).collect();
    let slots: Vec<usize> = (0..prompts.len()).collect();
    for _ in 1..steps {
        let tokens: Vec<Vec<i64>> = last.iter().map(|&t| vec![t]).collect();
        let logits = model
            .forward(&slots, &tokens, &mut cache, true)
            .expect("decode");
        last = (0..prompts.len() as i64)
            .map(|r| logits.get(r).view([-1]).argmax(0, false).int64_value(&[]))
            .collect();
        for (o, &t) in out.iter_mut().zip(&last) {
            o.push(t);
        }
    }
    out
}

#[test]
fn llama_logits_and_greedy_tokens_match_transformers() {
    let expected = expected("llm");
    for name in ["llama-gqa-tied", "llama-gqa-untied"] {
        let spec = &expected[name];
        let dir = fixtures("llm").join(spec["dir"].as_str().expect("dir"));
        let model = Decoder::load(
            &dir,
            &HfConfig::read(&dir).expect("config"),
            Kind::Float,
            Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let tokenizer = cresset_torch::load_tokenizer(&dir).expect("tokenizer");
        let prompt = ids(&spec["prompt_ids"]);
        let ours: Vec<i64> = tokenizer
            .encode(spec["prompt"].as_str().expect("prompt"), false)
            .expect("encode")
            .get_ids()
            .iter()
            .map(|&i| i64::from(i))
            .collect();
        assert_eq!(ours, prompt, "{name}: token ids");
        let diff = max_abs_diff(&prompt_logits(&model, &prompt), &floats(&spec["logits"]));
        assert!(diff <= 1e-4, "{name}: logits max abs diff {diff:e}");
        // Greedy, alone and batched with the shorter prompt (another length, another slot).
        let short = ids(&spec["batch"]["prompt_ids"]);
        let want = ids(&spec["greedy_ids"]);
        assert_eq!(
            greedy(&model, &[prompt.clone()], 32)[0],
            want,
            "{name}: greedy"
        );
        let both = greedy(&model, &[short, prompt], 32);
        assert_eq!(both[1], want, "{name}: greedy in a batch");
        assert_eq!(
            both[0],
            ids(&spec["batch"]["greedy_ids"]),
            "{name}: the other row"
        );
    }
}

#[test]
fn gguf_files_load_to_the_same_weights_within_quantization_error() {
    let expected = expected("llm");
    for spec in expected["gguf"].as_array().expect("gguf list") {
        let file = fixtures("llm").join(spec["file"].as_str().expect("file"));
        let gguf = Gguf::open(&file).expect("open gguf");
        let source = fixtures("llm").join(spec["source"].as_str().expect("source"));
        let config = HfConfig::read(&source).expect("config");
        let heads = config.usize("num_attention_heads").expect("heads");
        let kv_heads = config.usize("num_key_value_heads").expect("kv heads");
        // Our dequantization equals the gguf package's, value for value.
        let q = unpermute_qk(
            &gguf
                .tensor("blk.0.attn_q.weight", Kind::Float, Device::Cpu)
                .expect("q"),
            heads,
        );
        let diff = max_abs_diff(
            &tensor_floats(&q),
            &floats(&spec["dequantized"]["blk.0.attn_q.weight"]),
        );
        assert!(
            diff <= 1e-6,
            "{}: dequantized q differs by {diff:e}",
            spec["type"]
        );
        // Every tensor is within the error the gguf package's own dequantization has.
        let mut hf = Weights::load(&source, Kind::Float, Device::Cpu).expect("hf weights");
        let map = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
        ];
        let mut names: Vec<(String, String)> = map
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        for l in 0..config.usize("num_hidden_layers").expect("layers") {
            for (g, h) in [
                ("attn_norm", "input_layernorm"),
                ("ffn_norm", "post_attention_layernorm"),
                ("attn_q", "self_attn.q_proj"),
                ("attn_k", "self_attn.k_proj"),
                ("attn_v", "self_attn.v_proj"),
                ("attn_output", "self_attn.o_proj"),
                ("ffn_gate", "mlp.gate_proj"),
                ("ffn_up", "mlp.up_proj"),
                ("ffn_down", "mlp.down_proj"),
            ] {
                names.push((
                    format!("blk.{l}.{g}.weight"),
                    format!("model.layers.{l}.{h}.weight"),
                ));
            }
        }
        for (g, h) in names {
            let mut ours = gguf.tensor(&g, Kind::Float, Device::Cpu).expect("tensor");
            if g.contains("attn_q") {
                ours = unpermute_qk(&ours, heads);
            } else if g.contains("attn_k") {
                ours = unpermute_qk(&ours, kv_heads);
            }
            let theirs = hf.take(&h, &ours.size()).expect("hf tensor");
            let bound = spec["max_abs_error"][&h].as_f64().expect("bound");
            let diff = max_abs_diff(&tensor_floats(&ours), &tensor_floats(&theirs));
            assert!(
                diff <= bound + 1e-6,
                "{} {h}: {diff} > {bound}",
                spec["type"]
            );
        }
        // The whole model, as transformers loads the same file.
        let model = Decoder::load_gguf(&gguf, Kind::Float, Device::Cpu).expect("model");
        let prompt = ids(&expected["llama-gqa-tied"]["prompt_ids"]);
        let diff = max_abs_diff(&prompt_logits(&model, &prompt), &floats(&spec["logits"]));
        assert!(
            diff <= 1e-4,
            "{}: logits differ from transformers' by {diff:e}",
            spec["type"]
        );
        // Its own vocabulary gives the same ids as the checkpoint's tokenizer.
        let tokenizer = gguf.tokenizer().expect("gguf tokenizer");
        let text = expected["llama-gqa-tied"]["prompt"]
            .as_str()
            .expect("prompt");
        let ours: Vec<i64> = tokenizer
            .encode(text, false)
            .expect("encode")
            .get_ids()
            .iter()
            .map(|&i| i64::from(i))
            .collect();
        assert_eq!(ours, ids(&expected["llama-gqa-tied"]["prompt_ids"]));
    }
}

#[test]
fn real_smollm2_gguf_matches_transformers_and_knows_paris() {
    let expected = expected("llm");
    let spec = &expected["smollm2"];
    let path = PathBuf::from(
        std::env::var("CRESSET_CACHE").expect("CRESSET_CACHE is set by scripts/env.sh"),
    )
    .join("assets/smollm2")
    .join(spec["file"].as_str().expect("file"));
    let gguf = Gguf::open(&path).expect("open SmolLM2");
    let tokenizer = gguf
        .tokenizer()
        .expect("tokenizer from the GGUF vocabulary");
    for check in spec["tokenize_checks"].as_array().expect("checks") {
        let text = check["text"].as_str().expect("text");
        let ours: Vec<i64> = tokenizer
            .encode(text, false)
            .expect("encode")
            .get_ids()
            .iter()
            .map(|&i| i64::from(i))
            .collect();
        assert_eq!(ours, ids(&check["ids"]), "tokenizing {text:?}");
    }
    let prompt: Vec<i64> = tokenizer
        .encode(spec["chat_prompt"].as_str().expect("prompt"), false)
        .expect("encode")
        .get_ids()
        .iter()
        .map(|&i| i64::from(i))
        .collect();
    assert_eq!(prompt, ids(&spec["prompt_ids"]));
    let model = Decoder::load_gguf(&gguf, Kind::Float, Device::Cpu).expect("SmolLM2 loads");
    let mut cache = model.new_cache(1, 128);
    let logits =
        tch::no_grad(|| model.forward(&[0], &[prompt.clone()], &mut cache, true)).expect("forward");
    let diff = max_abs_diff(&tensor_floats(&logits), &floats(&spec["logits_last"]));
    assert!(diff <= 1e-4, "SmolLM2 last logits differ by {diff:e}");
    let want = ids(&spec["greedy_ids"]);
    let ours = greedy(&model, &[prompt], want.len());
    assert_eq!(ours[0], want, "greedy tokens");
    let text = tokenizer
        .decode(&want.iter().map(|&t| t as u32).collect::<Vec<_>>(), true)
        .expect("decode");
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn llama_runs_in_bf16_and_f16_close_to_f32() {
    let case = Case::new("llm", "llama-gqa-untied");
    let prompt = &case.prompt;
    let logits = |kind| {
        let model = Decoder::load(&case.dir, &case.config, kind, Device::Cpu).expect("load");
        let mut cache = model.new_cache(1, 64);
        let out = tch::no_grad(|| model.forward(&[0], &[prompt.clone()], &mut cache, true))
            .expect("forward");
        assert_eq!(out.kind(), kind, "computed in the asked dtype");
        tensor_floats(&out)
    };
    let full = logits(Kind::Float);
    let scale = full.iter().map(|x| x.abs()).fold(0.0, f64::max);
    for kind in [Kind::BFloat16, Kind::Half] {
        let diff = max_abs_diff(&logits(kind), &full);
        assert!(
            diff <= 0.05 * scale.max(1.0),
            "{kind:?}: max diff {diff} (scale {scale})"
        );
    }
}

/// The BLOOM fixture (llm) and the GPT-2 fixture (nlp): directory, config, prompt, the
/// expected logits (every position for BLOOM, the last for GPT-2) and greedy tokens.
fn other_families() -> Vec<(&'static str, PathBuf, Vec<i64>, Vec<f64>, bool, Vec<i64>)> {
    let llm = expected("llm");
    let nlp = expected("nlp");
    let bloom = &llm["bloom-tiny"];
    let gpt2 = &nlp["gpt2"];
    vec![
        (
            "bloom",
            fixtures("llm").join(bloom["dir"].as_str().expect("dir")),
            ids(&bloom["prompt_ids"]),
            floats(&bloom["logits"]),
            false,
            ids(&bloom["greedy_ids"]),
        ),
        (
            "gpt2",
            fixtures("nlp").join(gpt2["dir"].as_str().expect("dir")),
            ids(&gpt2["prompt_ids"]),
            floats(&gpt2["logits_last"]),
            true,
            ids(&gpt2["greedy_ids"]),
        ),
    ]
}

fn last_row(logits: &[f64], vocab: usize) -> Vec<f64> {
    logits[logits.len() - vocab..].to_vec()
}

#[test]
fn bloom_and_gpt2_logits_and_greedy_tokens_match_transformers() {
    for (name, dir, prompt, want, last_only, greedy_ids) in other_families() {
        let config = HfConfig::read(&dir).expect("config");
        let model = Decoder::load(&dir, &config, Kind::Float, Device::Cpu).expect("loads");
        let ours = prompt_logits(&model, &prompt);
        let vocab = model.config.vocab_size as usize;
        let ours = if last_only {
            last_row(&ours, vocab)
        } else {
            ours
        };
        let diff = max_abs_diff(&ours, &want);
        assert!(diff <= 1e-4, "{name}: logits max abs diff {diff:e}");
        let out = greedy(&model, &[prompt.clone()], 32);
        assert_eq!(out[0], greedy_ids, "{name}: greedy tokens");
    }
}

/// A decode step on the CPU runs its attention in one call (rotary, the cache write and the
/// attention: `decode_attention.cpp`); a prompt runs it op by op. Fed one token per step, in a
/// slot that is not the first, beside another sequence of another length, each step's logits
/// equal the prompt pass's logits at that position, within the f32 tolerance against
/// transformers (the op-by-op decode step, `CRESSET_FUSED_DECODE=0`, is 1.4e-5 off here, the
/// fused one 1.5e-5: summation order).
#[test]
fn decode_steps_give_the_prompt_passes_logits_at_every_position() {
    let _guard = tch::no_grad_guard();
    let llama = {
        let spec = &expected("llm")["llama-gqa-tied"];
        (
            "llama-gqa-tied",
            fixtures("llm").join(spec["dir"].as_str().expect("dir")),
            ids(&spec["prompt_ids"]),
        )
    };
    let gpt2 = other_families()
        .into_iter()
        .find(|f| f.0 == "gpt2")
        .map(|f| (f.0, f.1, f.2))
        .expect("gpt2");
    for (name, dir, prompt) in [llama, gpt2] {
        let model = Decoder::load(
            &dir,
            &HfConfig::read(&dir).expect("config"),
            Kind::Float,
            Device::Cpu,
        )
        .expect("loads");
        let vocab = model.config.vocab_size;
        let n = prompt.len() as i64;
        let whole = prompt_logits(&model, &prompt);
        let mut cache = model.new_cache(3, 64);
        let other: Vec<i64> = prompt.iter().rev().take(5).copied().collect();
        let _ = model
            .forward(&[0], std::slice::from_ref(&other), &mut cache, true)
            .expect("the other prompt");
        let _ = model
            .forward(&[2], &[prompt[..2].to_vec()], &mut cache, true)
            .expect("the first two tokens");
        let mut worst = 0f64;
        let fused_before = fused_decode_calls();
        for (i, &token) in prompt.iter().enumerate().skip(2) {
            let logits = model
                .forward(
                    &[2, 0],
                    &[vec![token], vec![other[i % 5]]],
                    &mut cache,
                    true,
                )
                .expect("a decode step");
            let ours = tensor_floats(&logits.get(0).view([-1]));
            let at = i * vocab as usize;
            worst = worst.max(max_abs_diff(&ours, &whole[at..at + vocab as usize]));
        }
        assert_eq!(cache.lens[2], n);
        // Every layer of every step took the fused call (none with it turned off).
        let off = std::env::var("CRESSET_FUSED_DECODE").is_ok_and(|v| v == "0");
        let want = if off {
            0
        } else {
            (n as u64 - 2) * model.config.layers as u64
        };
        assert_eq!(
            fused_decode_calls() - fused_before,
            want,
            "{name}: fused attention calls"
        );
        assert!(
            worst <= 1e-4,
            "{name}: decode steps' logits differ from the prompt's by {worst:e}"
        );
    }
}

#[test]
fn bloom_and_gpt2_shard_offload_and_load_layer_by_layer_to_the_same_output() {
    for (name, dir, prompt, _, _, greedy_ids) in other_families() {
        let config = HfConfig::read(&dir).expect("config");
        let whole = Decoder::load(&dir, &config, Kind::Float, Device::Cpu).expect("load");
        let reference = prompt_logits(&whole, &prompt);
        let layers = whole.config.layers as usize;
        for shards in [2, 3] {
            let model = Decoder::load(&dir, &config, Kind::Float, Device::Cpu)
                .expect("load")
                .shard(&vec![Device::Cpu; shards])
                .expect("shard");
            let diff = max_abs_diff(&prompt_logits(&model, &prompt), &reference);
            assert!(
                diff <= 1e-4,
                "{name}, {shards} shards: logits differ by {diff:e}"
            );
            assert_eq!(
                greedy(&model, &[prompt.clone()], 32)[0],
                greedy_ids,
                "{name}, {shards} shards"
            );
        }
        // Layer by layer, the second half written to disk as it is read.
        let folder = tempfile::tempdir().expect("offload folder");
        let mut opts = LoadOptions::new(Kind::Float, Device::Cpu);
        opts.low_cpu_mem_usage = true;
        opts.layers = (0..layers)
            .map(|l| {
                if l < layers / 2 {
                    LayerTarget::Device(Device::Cpu)
                } else {
                    LayerTarget::Disk
                }
            })
            .collect();
        opts.offload_folder = Some(folder.path().to_path_buf());
        let model = Decoder::load_with(&dir, &config, &opts).expect("load layer by layer");
        assert_eq!(
            model.offloaded_layers(),
            (layers / 2..layers).collect::<Vec<_>>()
        );
        let diff = max_abs_diff(&prompt_logits(&model, &prompt), &reference);
        assert!(
            diff <= 1e-5,
            "{name}, half on disk: logits differ by {diff:e}"
        );
        assert_eq!(
            greedy(&model, &[prompt.clone()], 32)[0],
            greedy_ids,
            "{name}, half on disk"
        );
    }
}

#[test]
fn layer_by_layer_loading_places_and_offloads_as_it_reads() {
    let case = Case::new("llm", "llama-gqa-untied");
    let (dir, config, prompt) = (&case.dir, &case.config, &case.prompt);
    let whole = case.load(Device::Cpu);
    let reference = prompt_logits(&whole, prompt);
    let layers = whole.config.layers as usize;
    let full = whole.resident_bytes();
    for low_cpu_mem_usage in [false, true] {
        let folder = tempfile::tempdir().expect("offload folder");
        let mut opts = LoadOptions::new(Kind::Float, Device::Cpu);
        opts.low_cpu_mem_usage = low_cpu_mem_usage;
        opts.layers = vec![LayerTarget::Disk; layers];
        opts.offload_folder = Some(folder.path().to_path_buf());
        let model = Decoder::load_with(&dir, &config, &opts).expect("load");
        assert_eq!(model.offloaded_layers(), (0..layers).collect::<Vec<_>>());
        // Only the embeddings, norms (the layers' too: 2 × hidden floats each) and head stay in
        // memory.
        let norms = (layers * 2 * model.config.hidden as usize * 4) as u64;
        let layer_bytes: u64 = model
            .modules()
            .iter()
            .filter(|m| m.layer.is_some())
            .map(|m| m.bytes)
            .sum();
        assert!(
            model.resident_bytes() <= full - layer_bytes + norms,
            "resident {} of {full} with {layer_bytes} offloaded",
            model.resident_bytes()
        );
        let diff = max_abs_diff(&prompt_logits(&model, &prompt), &reference);
        assert!(
            diff <= 1e-5,
            "low_cpu_mem_usage {low_cpu_mem_usage}: {diff:e}"
        );
        assert_eq!(
            std::fs::read_dir(folder.path()).expect("folder").count(),
            layers
        );
    }
    // A map to disk without a folder is refused.
    let mut opts = LoadOptions::new(Kind::Float, Device::Cpu);
    opts.layers = vec![LayerTarget::Disk; 1];
    let err = Decoder::load_with(&dir, &config, &opts)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("offload folder"), "{err}");
}

#[test]
fn tensor_parallel_shards_give_the_unsharded_output() {
    for name in ["llama-gqa-tied", "llama-gqa-untied"] {
        let case = Case::new("llm", name);
        let (spec, prompt) = (&case.spec, &case.prompt);
        let reference = prompt_logits(&case.load(Device::Cpu), prompt);
        for shards in [2, 3] {
            let model = case
                .load(Device::Cpu)
                .shard(&vec![Device::Cpu; shards])
                .expect("shard");
            assert_eq!(model.shards(), shards);
            let diff = max_abs_diff(&prompt_logits(&model, &prompt), &reference);
            assert!(
                diff <= 1e-4,
                "{name}, {shards} shards: logits differ by {diff:e}"
            );
            // Greedy tokens, batched, with the sharded KV cache.
            let short = ids(&spec["batch"]["prompt_ids"]);
            let both = greedy(&model, &[short, prompt.clone()], 32);
            assert_eq!(
                both[1],
                ids(&spec["greedy_ids"]),
                "{name}, {shards} shards: greedy"
            );
            assert_eq!(
                both[0],
                ids(&spec["batch"]["greedy_ids"]),
                "{name}, {shards} shards: batch row"
            );
        }
    }
}

#[test]
fn disk_offloaded_layers_give_the_in_memory_output() {
    let case = Case::new("llm", "llama-gqa-untied");
    let (spec, prompt) = (&case.spec, &case.prompt);
    let layers = case.config.usize("num_hidden_layers").expect("layers") as usize;
    let reference = prompt_logits(&case.load(Device::Cpu), prompt);
    let half: Vec<usize> = (layers / 2..layers).collect();
    let all: Vec<usize> = (0..layers).collect();
    for (what, offloaded) in [
        ("all in memory", Vec::new()),
        ("half on disk", half),
        ("all on disk", all),
    ] {
        let folder = tempfile::tempdir().expect("offload folder");
        let model = case
            .load(Device::Cpu)
            .offload_layers(&offloaded, folder.path())
            .expect("offload");
        assert_eq!(model.offloaded_layers(), offloaded, "{what}");
        let diff = max_abs_diff(&prompt_logits(&model, &prompt), &reference);
        assert!(diff <= 1e-5, "{what}: logits differ by {diff:e}");
        let both = greedy(&model, &[prompt.clone()], 32);
        assert_eq!(both[0], ids(&spec["greedy_ids"]), "{what}: greedy tokens");
    }
}

#[test]
fn the_planner_sizes_a_gguf_as_the_loaded_model_does() {
    for file in ["llama-gqa-tied.Q8_0.gguf", "llama-gqa-tied.Q4_1.gguf"] {
        let path = fixtures("llm").join(file);
        let (planned, config) = cresset_plan::modules_from_gguf(&path, 4).expect("plan");
        let model = Decoder::load_gguf(&Gguf::open(&path).expect("open"), Kind::Float, Device::Cpu)
            .expect("load");
        assert_eq!(planned, model.modules(), "{file}");
        assert_eq!(config["hidden_size"], model.config.hidden);
        assert_eq!(config["num_key_value_heads"], model.config.kv_heads);
    }
}

/// The GPU's ways of decoding, run on the CPU through the scheduler, give the CPU's tokens
/// (and transformers'): reads of the cache bucketed to a power of two, whose masked part holds
/// stale keys of earlier sequences in reused slots; and decode steps in repeating shapes (the
/// CUDA-graph path, eager here), where slots that do not decode ride along as idle rows and
/// every key of the cache is read.
#[test]
fn bucketed_reads_and_static_decode_steps_give_the_exact_tokens_and_transformers_ones() {
    let case = Case::new("llm", "llama-gqa-untied");
    let model = case.load(Device::Cpu);
    let want = ids(&case.spec["greedy_ids"]);
    let exact = case.scheduled(&model, KvReads::Exact, None);
    assert_eq!(exact[1], want, "transformers' greedy tokens");
    assert_eq!(exact[4], want, "the same prompt in a reused slot");
    assert_eq!(
        case.scheduled(&model, KvReads::Bucketed, None),
        exact,
        "bucketed reads change the tokens"
    );
    assert_eq!(
        case.scheduled(&model, KvReads::Exact, Some(false)),
        exact,
        "static decode steps change the tokens"
    );
}
