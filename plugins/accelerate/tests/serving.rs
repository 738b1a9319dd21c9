//! The accelerate handler as a library, on the random BLOOM, GPT-2 and Llama checkpoints of
//! `scripts/make_llm_fixtures.py` / `make_nlp_fixtures.py`: greedy text equal to transformers'
//! tokens with every layer in memory, half on disk and all on disk; a TorchServe-style archive
//! (`model/` + `setup_config.json`) planned by `max_memory`; bad settings refused by name.

mod common;

use std::path::{Path, PathBuf};

use common::{expected, generate, generated};

use cresset_plugin_accelerate::AccelerateHandler;
use cresset_plugin_api::sdk::testing::init_context;
use cresset_plugin_api::sdk::testing::step_instance;
use cresset_torch::decoder::DecoderConfig;
use cresset_torch::layers::HfConfig;
use serde_json::{json, Value};

/// A family's fixture: (name, its folder, the prompt, transformers' greedy text).
fn families() -> Vec<(&'static str, PathBuf, String, String, &'static str)> {
    let llm = expected("llm");
    let nlp = expected("nlp");
    let decode = |dir: &Path, ids: &Value| {
        let ids: Vec<u32> = ids
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect();
        cresset_torch::load_tokenizer(dir)
            .expect("tokenizer")
            .decode(&ids, true)
            .expect("decode")
    };
    let mut out = Vec::new();
    for (name, set, key, layer_prefix) in [
        ("bloom", "llm", "bloom-tiny", "transformer.h"),
        ("gpt2", "nlp", "gpt2", "transformer.h"),
        ("llama", "llm", "llama-gqa-untied", "model.layers"),
    ] {
        let spec = if set == "llm" { &llm[key] } else { &nlp[key] };
        let dir = generated(set).join(spec["dir"].as_str().expect("dir"));
        let want = decode(&dir, &spec["greedy_ids"]);
        let prompt = spec["prompt"].as_str().expect("prompt").to_owned();
        out.push((name, dir, prompt, want, layer_prefix));
    }
    out
}

/// A TorchServe-style archive folder: the checkpoint under `model/`.
fn archive(checkpoint: &Path) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let model = root.path().join("model");
    std::fs::create_dir_all(&model).expect("mkdir");
    for entry in std::fs::read_dir(checkpoint).expect("fixture") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, model.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    root
}

fn start(root: &Path, handler: Value) -> Result<AccelerateHandler, String> {
    let mut ctx = init_context(root, handler);
    ctx.model_config = json!({"batch_size": 2});
    ctx.model_version = "1.0".into();
    step_instance::<AccelerateHandler>(&ctx).map_err(|e| e.message.to_string())
}

#[test]
fn every_family_gives_transformers_text_in_memory_half_on_disk_and_all_on_disk() {
    for (name, dir, prompt, want, layer_prefix) in families() {
        let root = archive(&dir);
        let layers = HfConfig::read(&dir)
            .and_then(|c| DecoderConfig::from_hf(&c))
            .expect("config")
            .layers as usize;
        for on_disk in [0, layers / 2, layers] {
            // Everything on the CPU, then the last `on_disk` layers to disk.
            let mut map = serde_json::Map::new();
            map.insert(String::new(), json!("cpu"));
            for l in layers - on_disk..layers {
                map.insert(format!("{layer_prefix}.{l}"), json!("disk"));
            }
            let mut h = start(
                root.path(),
                json!({"device_map": map, "offload_folder": "offload", "max_length": 64}),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                h.model().offloaded_layers(),
                (layers - on_disk..layers).collect::<Vec<_>>(),
                "{name}"
            );
            assert_eq!(
                generate(&mut h, &prompt, 32),
                want,
                "{name} with {on_disk} of {layers} layers on disk"
            );
        }
    }
}

#[test]
fn torch_dtype_float64_gives_the_same_greedy_text() {
    // The reference handler's TORCH_DTYPES include float64; greedy text matches f32's.
    for (name, dir, prompt, want, _) in families() {
        let root = archive(&dir);
        let mut h = start(
            root.path(),
            json!({"torch_dtype": "float64", "max_length": 64}),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(h.model().kind(), cresset_torch::tch::Kind::Double, "{name}");
        assert_eq!(generate(&mut h, &prompt, 32), want, "{name}");
    }
}

#[test]
fn a_torchserve_style_bloom_archive_is_planned_by_max_memory() {
    let (_, dir, prompt, want, _) = families().remove(0);
    let root = archive(&dir);
    // A CPU budget that holds the embeddings, the first half of the layers and the final norm
    // (which never goes to disk), with the activations and the KV room of every layer (a layer
    // on disk still runs, and caches, on the CPU) at `max_length`: the rest must go to disk.
    let cfg = DecoderConfig::from_hf(&HfConfig::read(&dir).expect("config")).expect("config");
    let modules = cfg.modules(4);
    let headroom = cresset_plan::Headroom::for_sizes(
        (cfg.kv_heads * cfg.head_dim) as u64,
        cfg.hidden as u64,
        cfg.intermediate as u64,
        64,
        4,
    );
    let layers = cfg.layers as usize;
    let budget = headroom.activations
        + layers as u64 * headroom.per_layer
        + modules
            .iter()
            .filter(|m| m.layer.is_none_or(|l| l < layers / 2))
            .map(|m| m.bytes)
            .sum::<u64>();
    let setup = json!({
        "revision": "main",
        "max_memory": {"cpu": format!("{budget}B")},
        "low_cpu_mem_usage": true,
        "device_map": "auto",
        "offload_folder": "offload",
        "offload_state_dict": true,
        "torch_dtype": "float32",
        "max_length": 64
    });
    std::fs::write(root.path().join("setup_config.json"), setup.to_string()).expect("write");
    let mut h = start(root.path(), json!({})).expect("starts");
    assert_eq!(
        h.model().offloaded_layers(),
        (layers / 2..layers).collect::<Vec<_>>(),
        "the second half is on disk"
    );
    assert!(root.path().join("offload").is_dir());
    assert_eq!(generate(&mut h, &prompt, 32), want);
    // `[handler]` wins over setup_config.json: the archive's version as `revision`, bf16.
    let mut h = start(
        root.path(),
        json!({"revision": "1.0", "torch_dtype": "bfloat16", "device_map": {"": "cpu"}}),
    )
    .expect("bf16 starts");
    assert!(h.model().offloaded_layers().is_empty());
    assert!(!generate(&mut h, &prompt, 32).is_empty());
}

#[test]
fn bad_settings_are_refused_naming_the_field() {
    let (_, dir, ..) = families().remove(0);
    let root = archive(&dir);
    for (settings, field) in [
        (json!({"revision": "2.0"}), "revision"),
        // A typo is refused, naming the key it is closest to.
        (
            json!({"offload_state_dic": true}),
            "did you mean `offload_state_dict`?",
        ),
        (
            json!({"torch_dtype": "float32", "dtype": "bfloat16"}),
            "not both",
        ),
        (json!({"torch_dtype": "float8"}), "torch_dtype"),
        (json!({"max_length": 0}), "max_length"),
        (json!({"low_cpu_mem_usage": "yes"}), "low_cpu_mem_usage"),
        (
            json!({"device_map": {"transformer.h.99": "cpu", "": "cpu"}}),
            "transformer.h.99",
        ),
        (json!({"max_memory": {"cpu": "1KiB"}}), "offload_folder"),
        (
            json!({"offload_folder": "../outside", "device_map": "auto"}),
            "offload_folder",
        ),
    ]
    .into_iter()
    .chain(
        // A GPU budget where there is no GPU.
        (!cresset_torch::tch::Cuda::is_available()).then(|| {
            (
                json!({"max_memory": {"0": "1GiB", "cpu": "1GiB"}}),
                "usable GPU",
            )
        }),
    ) {
        let err = start(root.path(), settings.clone())
            .err()
            .unwrap_or_else(|| panic!("{settings} was accepted"));
        assert!(err.contains(field), "{settings}: {err}");
    }
    std::fs::write(root.path().join("setup_config.json"), "{not json").expect("write");
    let err = start(root.path(), json!({})).err().expect("refused");
    assert!(err.contains("setup_config.json"), "{err}");
}

#[test]
fn two_instances_of_a_model_offload_to_their_own_files() {
    let (_, dir, prompt, want, _) = families().remove(0);
    let root = archive(&dir);
    let settings = json!({"device_map": {"": "disk", "transformer.word_embeddings": "cpu",
        "transformer.word_embeddings_layernorm": "cpu", "transformer.ln_f": "cpu"},
        "offload_folder": "offload", "max_length": 64});
    let mut handlers = Vec::new();
    for index in 0..2 {
        let mut ctx = init_context(root.path(), settings.clone());
        ctx.assignment.index = index;
        handlers.push(
            step_instance::<AccelerateHandler>(&ctx).unwrap_or_else(|e| panic!("{}", e.message)),
        );
    }
    for index in 0..2 {
        assert!(root
            .path()
            .join(format!("offload/instance-{index}"))
            .is_dir());
    }
    // The second instance's load did not disturb the first's mapped files.
    for h in &mut handlers {
        assert_eq!(generate(h, &prompt, 32), want);
    }
}
