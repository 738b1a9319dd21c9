//! CUDA checks, behind the `gpu` feature (`cargo test --release -p cresset-torch --features gpu
//! --test gpu` on a machine with a GPU): the Llama fixture on `cuda:0` against the CPU, and
//! tensor parallelism with 2 shards on `cuda:0` against the unsharded CPU model.
#![cfg(feature = "gpu")]

mod common;

use common::{expected, fixtures, ids, max_abs_diff, prompt_logits};
use cresset_torch::decoder::Decoder;
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
