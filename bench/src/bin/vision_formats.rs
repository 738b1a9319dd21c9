//! `cresset-bench-vision-formats`: one model in the three formats the `vision` handlers load,
//! side by side in one run: TorchScript (frozen and run through libtorch's
//! `optimize_for_inference`, the handler's default on the CPU; in f32, and in bf16 as `dtype =
//! "auto"` runs it on a CPU with native bf16), an AOTInductor package
//! (`torch._inductor.aoti_compile_and_package`, compiled for this machine by `make models`)
//! and ONNX (ONNX Runtime 1.31.1, from the pinned `onnxruntime` wheel). The models are the
//! vision fixtures' resnet18 and deeplabv3-mobilenet segmenter, all exported from the same
//! torchvision modules by `scripts/make_vision_fixtures.py`.
//!
//! Each format is loaded by the vision handler in this process with every core, and its
//! forward passes are timed on the same preprocessed photographs (batch 1 and batch 8), the
//! formats taking turns round by round so that the machine's drift falls on all of them.
//! Decoding and preprocessing are the same for every format and are left out. Results go to
//! the `vision-formats` section of `BENCHMARKS.md`. Run it with `make bench`.

use std::time::Instant;

use cresset_bench::{cli, machine, percentile, threads, write_section};
use cresset_e2e::repo_root;
use cresset_plugin_api::sdk::{testing, Handler};
use cresset_plugin_vision::VisionHandler;
use cresset_torch::tch::Tensor;
use serde_json::json;

/// (label, file, `handler.dtype`): the first is the baseline.
const FORMATS: [(&str, &str, &str); 4] = [
    ("TorchScript (optimized), f32", "model.pt", "float32"),
    ("TorchScript (optimized), bf16", "model.pt", "bfloat16"),
    ("AOTInductor", "model.pt2", "auto"),
    ("ONNX Runtime", "model.onnx", "auto"),
];

/// Rounds per case; the formats take turns within each.
const ROUNDS: usize = 5;

fn main() {
    let (quick, out) = cli();
    // Passes per format and round.
    let passes = if quick { 2 } else { 6 };
    let fixtures = repo_root().join("tests/fixtures/generated/vision");
    let cores = threads();
    let mut photos: Vec<_> = std::fs::read_dir(fixtures.join("photos"))
        .expect("run `make models` first")
        .map(|e| e.expect("photo").path())
        .collect();
    photos.sort();
    let mut table = String::from(
        "| model | format | batch 1 p50 ms | batch 8 p50 ms | images/s at batch 8 | vs TorchScript (batch 1 / batch 8) |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    for model in ["resnet18", "segmenter"] {
        let mut handlers: Vec<VisionHandler> = FORMATS
            .iter()
            .map(|(label, file, dtype)| {
                let mut ctx = testing::init_context(
                    fixtures.join(model),
                    json!({ "model_file": file, "dtype": dtype }),
                );
                ctx.assignment.intra_op_threads = cores as u32;
                ctx.model_config["batch_size"] = json!(8);
                VisionHandler::initialize(&ctx)
                    .unwrap_or_else(|e| panic!("{model}, {label}: {}", e.message))
            })
            .collect();
        let images: Vec<Tensor> = photos
            .iter()
            .cycle()
            .take(8)
            .map(|p| {
                handlers[0]
                    .prepare(&std::fs::read(p).expect("photo"))
                    .expect("prepare")
            })
            .collect();
        let refs: Vec<&Tensor> = images.iter().collect();
        // [format][batch index] -> pass times in ms.
        let mut times = vec![[Vec::new(), Vec::new()]; FORMATS.len()];
        let _threads = cresset_torch::threads::Batch::enter(cores as u32);
        for (b, batch) in [1usize, 8].into_iter().enumerate() {
            for h in handlers.iter_mut() {
                for _ in 0..3 {
                    h.forward(&refs[..batch]).expect("warm-up");
                }
            }
            for round in 0..ROUNDS {
                eprintln!(
                    "bench-vision-formats: {model}, batch {batch}, round {}",
                    round + 1
                );
                for (f, h) in handlers.iter_mut().enumerate() {
                    for _ in 0..passes {
                        let start = Instant::now();
                        h.forward(&refs[..batch]).expect("forward");
                        times[f][b].push(start.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
        }
        let p50 = |v: &Vec<f64>| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            percentile(&v, 50.0)
        };
        let base = [p50(&times[0][0]), p50(&times[0][1])];
        for (f, (label, ..)) in FORMATS.iter().enumerate() {
            let (one, eight) = (p50(&times[f][0]), p50(&times[f][1]));
            table.push_str(&format!(
                "| {model} | {label} | {one:.1} | {eight:.1} | {:.1} | {:.2}× / {:.2}× |\n",
                8000.0 / eight,
                base[0] / one,
                base[1] / eight
            ));
        }
    }
    let section = format!(
        "## Vision model formats: TorchScript, AOTInductor and ONNX Runtime\n\n\
         Machine: {}. One process, {cores} intra-op threads; the vision handler's forward \
         passes on preprocessed 224 × 224 photographs (decode and preprocessing, the same for \
         every format, left out); p50 over {ROUNDS} rounds in which the formats take turns, \
         after 3 warm-up passes each. The same random-weight torchvision modules exported by \
         `scripts/make_vision_fixtures.py`: TorchScript (`torch.jit.script`, frozen and \
         `optimize_for_inference` at load), AOTInductor (`torch.export` with a dynamic batch, \
         `aoti_compile_and_package` with `cpp.dynamic_threads`, torch 2.11.0) and ONNX (opset \
         17, ONNX Runtime 1.31.1, all graph optimizations). The bf16 row is the same \
         TorchScript file with `dtype = \"bfloat16\"` (weights and inputs in bf16, inputs \
         channels-last; what `auto` picks on a CPU with native bf16: this one {}). \
         \"vs TorchScript\" is against the f32 TorchScript row; above 1 is faster.\n\n{table}",
        machine(),
        if cresset_torch::layers::cpu_has_native_bf16() {
            "has it"
        } else {
            "has not"
        }
    );
    println!("{section}");
    write_section(&out, "vision-formats", &section).expect("write BENCHMARKS.md");
}
