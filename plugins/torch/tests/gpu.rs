//! CUDA checks, behind the `gpu` feature (`cargo test --release -p cresset-torch --features gpu
//! --test gpu` on a machine with a GPU): the Llama fixture on `cuda:0` against the CPU,
//! tensor parallelism with 2 shards on `cuda:0` against the unsharded CPU model, and device maps
//! split between `cuda:0`, the CPU and disk, for every decoder family.
#![cfg(feature = "gpu")]

mod common;

use common::{expected, fixtures, ids, max_abs_diff, prompt_logits};
use cresset_torch::decoder::{Decoder, LayerTarget, LoadOptions};
use cresset_torch::layers::HfConfig;
use cresset_torch::tch::{self, Device, Kind};

#[test]
fn llama_on_cuda_matches_the_cpu_and_tp_shards_on_cuda_match_too() {
    assert!(
        tch::Cuda::is_available(),
        "the gpu feature needs a CUDA device"
    );
    let expected = expected("llm");
    let spec = &expected["llama-gqa-untied"];
    let dir = fixtures("llm").join(spec["dir"].as_str().expect("dir"));
    let config = HfConfig::read(&dir).expect("config");
    let prompt = ids(&spec["prompt_ids"]);
    let cpu = prompt_logits(
        &Decoder::load(&dir, &config, Kind::Float, Device::Cpu).expect("cpu"),
        &prompt,
    );
    let gpu = Decoder::load(&dir, &config, Kind::Float, Device::Cuda(0)).expect("cuda");
    let diff = max_abs_diff(&prompt_logits(&gpu, &prompt), &cpu);
    assert!(diff <= 1e-3, "cuda vs cpu: {diff:e}");
    let sharded = Decoder::load(&dir, &config, Kind::Float, Device::Cuda(0))
        .expect("cuda")
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
    let llm = expected("llm");
    let nlp = expected("nlp");
    for (set, spec) in [
        ("llm", &llm["llama-gqa-untied"]),
        ("llm", &llm["bloom-tiny"]),
        ("nlp", &nlp["gpt2"]),
    ] {
        let dir = fixtures(set).join(spec["dir"].as_str().expect("dir"));
        let config = HfConfig::read(&dir).expect("config");
        let prompt = ids(&spec["prompt_ids"]);
        let whole = Decoder::load(&dir, &config, Kind::Float, Device::Cpu).expect("cpu");
        let cpu = prompt_logits(&whole, &prompt);
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
        assert!(diff <= 1e-3, "{}: split map vs cpu: {diff:e}", spec["dir"]);
    }
}
