//! CUDA checks, behind the `gpu` feature (`cargo test --release -p cresset-torch --features gpu
//! --test gpu` on a machine with a GPU): the Llama fixture on `cuda:0` against the CPU,
//! tensor parallelism with 2 shards on `cuda:0` against the unsharded CPU model, and device maps
//! split between `cuda:0`, the CPU and disk, for every decoder family; decoding on `cuda:0`
//! with bucketed cache reads, sampling on the device and decode steps replayed as CUDA graphs
//! against transformers' tokens.
#![cfg(feature = "gpu")]

mod common;

use common::{ids, max_abs_diff, prompt_logits, Case};
use cresset_torch::decoder::{Decoder, KvReads, LayerTarget, LoadOptions};
use cresset_torch::tch::{self, Device, Kind};

#[test]
fn llama_on_cuda_matches_the_cpu_and_tp_shards_on_cuda_match_too() {
    assert!(
        tch::Cuda::is_available(),
        "the gpu feature needs a CUDA device"
    );
    let case = Case::new("llm", "llama-gqa-untied");
    let prompt = &case.prompt;
    let cpu = prompt_logits(&case.load(Device::Cpu), prompt);
    let gpu = case.load(Device::Cuda(0));
    let diff = max_abs_diff(&prompt_logits(&gpu, prompt), &cpu);
    assert!(diff <= 1e-3, "cuda vs cpu: {diff:e}");
    let sharded = case
        .load(Device::Cuda(0))
        .shard(&[Device::Cuda(0), Device::Cuda(0)])
        .expect("shard");
    let diff = max_abs_diff(&prompt_logits(&sharded, &prompt), &cpu);
    assert!(diff <= 1e-3, "2 shards on cuda:0 vs cpu: {diff:e}");
}

#[test]
fn device_maps_split_between_cuda_cpu_and_disk_match_the_cpu() {
    assert!(
        tch::Cuda::is_available(),
        "the gpu feature needs a CUDA device"
    );
    for (set, name) in [
        ("llm", "llama-gqa-untied"),
        ("llm", "bloom-tiny"),
        ("nlp", "gpt2"),
    ] {
        let case = Case::new(set, name);
        let (dir, config, prompt) = (&case.dir, &case.config, &case.prompt);
        let whole = case.load(Device::Cpu);
        let cpu = prompt_logits(&whole, prompt);
        let layers = whole.config.layers as usize;
        // First layers on cuda:0 (with the embeddings), then the CPU, the last one on disk.
        let folder = tempfile::tempdir().expect("offload folder");
        let mut opts = LoadOptions::new(Kind::Float, Device::Cuda(0));
        opts.low_cpu_mem_usage = true;
        opts.layers = (0..layers)
            .map(|l| match l {
                l if l + 1 == layers => LayerTarget::Disk,
                l if l < layers / 2 => LayerTarget::Device(Device::Cuda(0)),
                _ => LayerTarget::Device(Device::Cpu),
            })
            .collect();
        opts.offload_folder = Some(folder.path().to_path_buf());
        opts.head = Some(Device::Cpu);
        let split = Decoder::load_with(&dir, &config, &opts).expect("split");
        assert_eq!(split.layer_devices()[0], Device::Cuda(0));
        let diff = max_abs_diff(&prompt_logits(&split, &prompt), &cpu);
        assert!(diff <= 1e-3, "{name}: split map vs cpu: {diff:e}");
    }
}

#[test]
fn decoding_on_cuda_with_bucketed_reads_and_cuda_graphs_gives_transformers_tokens() {
    assert!(
        tch::Cuda::is_available(),
        "the gpu feature needs a CUDA device"
    );
    let case = Case::new("llm", "llama-gqa-untied");
    let model = case.load(Device::Cuda(0));
    let want = ids(&case.spec["greedy_ids"]);
    let dynamic = case.scheduled(&model, KvReads::Bucketed, None);
    assert_eq!(dynamic[1], want, "bucketed reads on cuda:0");
    assert_eq!(dynamic[4], want, "the same prompt in a reused slot");
    // Captured at warm-up, one graph per bucket (1, 2 and 3 rows), replayed each step.
    let graphed = case.scheduled(&model, KvReads::Bucketed, Some(true));
    assert_eq!(graphed, dynamic, "CUDA graphs change the tokens");
}
