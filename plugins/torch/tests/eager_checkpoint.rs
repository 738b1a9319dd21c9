//! Older HuggingFace checkpoints: `pytorch_model.bin` (one `torch.save` zip, or shards listed by
//! `pytorch_model.bin.index.json`), read without running pickle code. Each is written here by
//! the venv's torch from a fixture's transformers model (`torch.save(model.state_dict())`, as
//! transformers 4 saved them: tied weights share one storage, BERT's `position_ids` is an int64
//! buffer), then loaded next to the safetensors original: every tensor equal, bit for bit, and
//! the model's logits equal to transformers'. Hostile pickles written by the same torch (a
//! `__reduce__` that would run a shell command, a non-contiguous view) are refused, and the
//! command never runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{expected, fixtures, floats, ids, max_abs_diff, prompt_logits};
use cresset_torch::decoder::{Decoder, LoadOptions};
use cresset_torch::encoder::{Encoder, EncoderHead};
use cresset_torch::layers::HfConfig;
use cresset_torch::tch::{Device, Kind};
use cresset_torch::weights::{checkpoint_files, read_any_header, Weights};

fn python(script: &str, args: &[&Path]) {
    let venv = std::env::var("CRESSET_VENV").expect("CRESSET_VENV is set by scripts/env.sh");
    let out = Command::new(Path::new(&venv).join("bin/python"))
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run the venv's python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A copy of the fixture `set/name` with its weights as `pytorch_model.bin` (in `shards`
/// pieces) instead of `model.safetensors`.
fn as_pickled(set: &str, name: &str, shards: usize) -> (tempfile::TempDir, PathBuf) {
    let source = fixtures(set).join(name);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join(name);
    std::fs::create_dir(&out).expect("mkdir");
    for entry in std::fs::read_dir(&source).expect("read fixture") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if !file.starts_with("model.safetensors") {
            std::fs::copy(&path, out.join(&file)).expect("copy");
        }
    }
    python(
        r#"
import json, sys, torch, transformers
src, out, shards = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = transformers.AutoConfig.from_pretrained(src)
cls = getattr(transformers, config.architectures[0])
state = cls.from_pretrained(src).state_dict()
if shards == 1:
    torch.save(state, f"{out}/pytorch_model.bin")
else:
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, f"{out}/{file}")
        weight_map.update({n: file for n in part})
    json.dump({"metadata": {}, "weight_map": weight_map},
              open(f"{out}/pytorch_model.bin.index.json", "w"))
"#,
        &[&source, &out, Path::new(&shards.to_string())],
    );
    (dir, out)
}

/// Every tensor of the safetensors original equals the pickled one, bit for bit, whether the
/// pickled checkpoint is read up front or tensor by tensor.
fn same_tensors(original: &Path, pickled: &Path) {
    let mut shapes = std::collections::BTreeMap::new();
    for file in checkpoint_files(original).expect("files") {
        for (name, info) in read_any_header(&file).expect("header").tensors {
            shapes.insert(name, info.shape);
        }
    }
    let files = checkpoint_files(pickled).expect("pickled files");
    assert!(
        files
            .iter()
            .all(|f| f.extension().is_some_and(|x| x == "bin")),
        "{files:?}"
    );
    let mut want = Weights::load(original, Kind::Float, Device::Cpu).expect("safetensors");
    let mut loaded = Weights::load(pickled, Kind::Float, Device::Cpu).expect("pickled, load");
    let mut opened = Weights::open(pickled, Kind::Float, Device::Cpu).expect("pickled, open");
    for (name, shape) in &shapes {
        let want = want.take(name, shape).expect("original");
        for (how, got) in [
            ("load", loaded.take(name, shape)),
            ("open", opened.take(name, shape)),
        ] {
            let got = got.unwrap_or_else(|e| panic!("{how}: {e}"));
            assert_eq!(got.kind(), want.kind(), "{name}");
            assert!(
                got.equal(&want),
                "{}: `{name}` differs ({how})",
                pickled.display()
            );
        }
    }
}

#[test]
fn pickled_llama_bloom_and_gpt2_checkpoints_load_as_their_safetensors_do() {
    let expected = expected("llm");
    for (name, shards) in [("llama-gqa-tied", 1), ("llama-gqa-untied", 2)] {
        let (_tmp, dir) = as_pickled("llm", name, shards);
        same_tensors(&fixtures("llm").join(name), &dir);
        // The model itself, from the pickled files: transformers' logits.
        let model = Decoder::load(
            &dir,
            &HfConfig::read(&dir).expect("config"),
            Kind::Float,
            Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let spec = &expected[name];
        let diff = max_abs_diff(
            &prompt_logits(&model, &ids(&spec["prompt_ids"])),
            &floats(&spec["logits"]),
        );
        assert!(diff <= 1e-4, "{name}: logits max abs diff {diff:e}");
        // Layer by layer (the path device maps and quantization at load take).
        let opts = LoadOptions {
            low_cpu_mem_usage: true,
            ..LoadOptions::new(Kind::Float, Device::Cpu)
        };
        let lazily = Decoder::load_with(&dir, &HfConfig::read(&dir).expect("config"), &opts)
            .unwrap_or_else(|e| panic!("{name}, layer by layer: {e}"));
        let diff = max_abs_diff(
            &prompt_logits(&lazily, &ids(&spec["prompt_ids"])),
            &floats(&spec["logits"]),
        );
        assert!(
            diff <= 1e-4,
            "{name}, layer by layer: logits max abs diff {diff:e}"
        );
    }
    let (_tmp, dir) = as_pickled("llm", "bloom-tiny", 1);
    same_tensors(&fixtures("llm").join("bloom-tiny"), &dir);
    let (_tmp, dir) = as_pickled("nlp", "gpt2", 1);
    same_tensors(&fixtures("nlp").join("gpt2"), &dir);
}

#[test]
fn a_pickled_bert_classifier_loads_the_weights_of_its_safetensors() {
    // BERT's int64 `position_ids` buffer and its classifier head, from one pickle.
    let (_tmp, dir) = as_pickled("nlp", "bert-seq", 1);
    same_tensors(&fixtures("nlp").join("bert-seq"), &dir);
    let config = HfConfig::read(&dir).expect("config");
    Encoder::load(
        &dir,
        &config,
        EncoderHead::SequenceClassification,
        Kind::Float,
        Device::Cpu,
    )
    .expect("load the pickled BERT");
}

#[test]
fn hostile_pickles_are_refused_and_run_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("pwned");
    python(
        r#"
import os, sys, torch
out, marker = sys.argv[1], sys.argv[2]
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))
os.makedirs(f"{out}/shell", exist_ok=True)
torch.save({"w": torch.ones(2), "x": Payload()}, f"{out}/shell/pytorch_model.bin")
os.makedirs(f"{out}/view", exist_ok=True)
torch.save({"w": torch.arange(6.0).view(2, 3).t()}, f"{out}/view/pytorch_model.bin")
os.makedirs(f"{out}/legacy", exist_ok=True)
torch.save({"w": torch.ones(2)}, f"{out}/legacy/pytorch_model.bin", _use_new_zipfile_serialization=False)
"#,
        &[dir.path(), &marker],
    );
    for (case, needle) in [
        ("shell", "refuses the global `posix.system`"),
        ("view", "non-contiguous"),
        ("legacy", "legacy"),
    ] {
        let err = Weights::load(&dir.path().join(case), Kind::Float, Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{case}: loaded"));
        assert!(err.to_string().contains(needle), "{case}: {err}");
    }
    assert!(!marker.exists(), "the pickle's command ran");
}
