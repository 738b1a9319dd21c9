//! Probe: SmolLM2 from its GGUF, dense and quantized, f32 and bf16: resident bytes, greedy
//! decode speed of one sequence, and top-1 agreement with the dense f32 model under teacher
//! forcing. `cargo run --release -p cresset-torch --example quant_probe -- FILE.gguf [THREADS]
//! [LABEL-PREFIX [TOKENS [ROWS]]]`: only the variants whose label starts with the prefix,
//! decoding TOKENS tokens (64; more for a profile, as `perf record` takes it: see
//! BENCHMARKS.md) for ROWS sequences at once (1; the decode rate is then their aggregate).

use std::time::Instant;

use cresset_torch::decoder::{Decoder, LoadOptions};
use cresset_torch::gguf::Gguf;
use cresset_torch::tch::{self, Device, Kind, Tensor};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("a GGUF file");
    let threads: i32 = args
        .next()
        .map(|t| t.parse().expect("threads"))
        .unwrap_or(2);
    let only = args.next().unwrap_or_default();
    let tokens: usize = args
        .next()
        .map(|t| t.parse().expect("tokens"))
        .unwrap_or(64);
    let rows: usize = args.next().map(|t| t.parse().expect("rows")).unwrap_or(1);
    tch::set_num_threads(threads);
    let gguf = Gguf::open(std::path::Path::new(&path)).expect("open");
    let tokenizer = gguf.tokenizer().expect("tokenizer");
    let text = "The capital of France is Paris. It is known for the Eiffel Tower, museums such as the Louvre, cafes, and the river Seine, which flows through the city. ".repeat(4);
    let ids: Vec<i64> = tokenizer
        .encode(text.as_str(), false)
        .expect("encode")
        .get_ids()
        .iter()
        .map(|&i| i64::from(i))
        .collect();
    let ids = &ids[..ids.len().min(256)];
    let _guard = tch::no_grad_guard();
    let mut reference: Option<Tensor> = None;
    for (label, kind, quant) in [
        ("dense f32", Kind::Float, false),
        ("dense bf16", Kind::BFloat16, false),
        ("gguf int4, f32 activations", Kind::Float, true),
        ("gguf int4, bf16 activations", Kind::BFloat16, true),
    ] {
        if !label.starts_with(only.as_str()) {
            continue;
        }
        let mut opts = LoadOptions::new(kind, Device::Cpu);
        opts.keep_gguf_quantization = quant;
        opts.low_cpu_mem_usage = true;
        let started = Instant::now();
        let model = Decoder::load_gguf_with(&gguf, &opts).expect("load");
        let load_s = started.elapsed().as_secs_f64();
        // Teacher forcing over the text.
        let mut cache = model.new_cache(1, 1024);
        let logits = model
            .forward(&[0], &[ids.to_vec()], &mut cache, false)
            .expect("forward");
        let top = logits.squeeze_dim(0).argmax(-1, false);
        let agreement = match &reference {
            None => {
                reference = Some(top.shallow_clone());
                1.0
            }
            Some(r) => top
                .eq_tensor(r)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]),
        };
        // Greedy decode of `tokens` tokens after a short prompt, for `rows` sequences at once.
        let mut cache = model.new_cache(rows, 512);
        let slots: Vec<usize> = (0..rows).collect();
        let prompts: Vec<Vec<i64>> = (0..rows).map(|r| ids[r..r + 10].to_vec()).collect();
        let logits = model
            .forward(&slots, &prompts, &mut cache, true)
            .expect("prefill");
        let argmax = |logits: &Tensor| -> Vec<Vec<i64>> {
            let top = logits.reshape([rows as i64, -1]).argmax(1, false);
            Vec::<i64>::try_from(&top)
                .expect("ids")
                .into_iter()
                .map(|t| vec![t])
                .collect()
        };
        let mut next = argmax(&logits);
        let started = Instant::now();
        for _ in 0..tokens {
            let logits = model
                .forward(&slots, &next, &mut cache, true)
                .expect("decode");
            next = argmax(&logits);
        }
        let tps = (tokens * rows) as f64 / started.elapsed().as_secs_f64();
        println!(
            "{label:30} load {load_s:5.2} s, weights {:6.1} MiB, top-1 agreement {:6.2}%, decode {tps:6.1} tokens/s",
            model.resident_bytes() as f64 / (1 << 20) as f64,
            agreement * 100.0
        );
    }
}
