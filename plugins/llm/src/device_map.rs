//! Where a model's layers go: everything on the instance's device, or, with Accelerate's
//! settings, a device map planned by `cresset-plan` (GPUs, the CPU, disk) before any weight is
//! read.

use cresset_plugin_api::sdk::{settings, InitContext};
use cresset_plugin_api::PluginError;
use cresset_torch::decoder::{DecoderConfig, LayerTarget, LoadOptions};
use cresset_torch::tch::{Device, Kind};
use serde_json::Value;

use crate::config::HandlerKeys;

/// How to load, from the handler settings: everything on the instance's device, or, with
/// Accelerate's keys (`device_map`, `max_memory`, `offload_folder`), each decoder layer where
/// `cresset-plan` puts it (GPUs, CPU, disk) under the budgets, with headroom for the KV cache
/// at `max_length`. The embeddings, final norm and head stay on the instance's device.
/// `low_cpu_mem_usage` (default: on with a device map, as in transformers) or
/// `offload_state_dict` read the weights layer by layer, placing or offloading each layer
/// before the next is read.
pub fn load_options(
    ctx: &InitContext,
    keys: &HandlerKeys,
    cfg: &DecoderConfig,
    kind: Kind,
    device: Device,
) -> Result<LoadOptions, PluginError> {
    use cresset_plan::{Budgets, Headroom, Placement};
    let mapped =
        keys.device_map.is_some() || keys.max_memory.is_some() || keys.offload_folder.is_some();
    let mut opts = LoadOptions::new(kind, device);
    opts.low_cpu_mem_usage =
        keys.low_cpu_mem_usage.unwrap_or(mapped) || keys.offload_state_dict.unwrap_or(false);
    if !mapped {
        return Ok(opts);
    }
    let plan_err = |e: cresset_plan::PlanError| PluginError::invalid_input(e.to_string());
    let folder = keys
        .offload_folder
        .as_deref()
        .map(|rel| settings::path_inside(&ctx.model_dir, "offload_folder", rel))
        .transpose()?;
    let budgets = Budgets::from_max_memory(
        keys.max_memory.as_ref().unwrap_or(&Value::Null),
        u64::MAX / 4,
        folder.is_some(),
    )
    .map_err(plan_err)?;
    let modules = cfg.modules(kind.elt_size_in_bytes());
    let max_length = settings::within("max_length", keys.max_length, 2048, 1 << 22)? as u64;
    let headroom = Headroom::for_sizes(
        (cfg.kv_heads * cfg.head_dim) as u64,
        cfg.hidden as u64,
        cfg.intermediate as u64,
        max_length,
        kind.elt_size_in_bytes() as u64,
    );
    let plan =
        cresset_plan::plan_from_setting(keys.device_map.as_ref(), &modules, &budgets, headroom)
            .map_err(plan_err)?;
    // A plan that names a GPU this process cannot use is refused here, by name, rather than
    // failing inside libtorch.
    let gpus = cresset_torch::tch::Cuda::device_count().max(0) as u32;
    if let Some((module, Placement::Gpu(i))) = plan
        .placements
        .iter()
        .find(|(_, p)| matches!(p, Placement::Gpu(i) if *i >= gpus))
    {
        return Err(PluginError::invalid_input(format!(
            "`device_map`/`max_memory` put {module} on GPU {i}, but this machine has {gpus} usable GPU(s)"
        )));
    }
    opts.layers = vec![LayerTarget::Device(device); cfg.layers as usize];
    let on = |p: Placement| match p {
        Placement::Gpu(i) => Device::Cuda(i as usize),
        _ => Device::Cpu,
    };
    // The modules before the first layer (embeddings) go together, as do those after the last
    // (the final norm and an untied head): each group where its largest module is planned.
    let first_layer = modules.iter().position(|m| m.layer.is_some()).unwrap_or(0);
    let largest = |group: &[cresset_plan::Module]| {
        group
            .iter()
            .filter(|m| m.bytes > 0)
            .max_by_key(|m| m.bytes)
            .and_then(|m| plan.placement(&m.name))
    };
    let last_layer = modules.iter().rposition(|m| m.layer.is_some()).unwrap_or(0);
    if let Some(p) = largest(&modules[..first_layer]) {
        opts.embeddings = Some(on(p));
    }
    if let Some(p) = largest(&modules[last_layer + 1..]) {
        opts.head = Some(on(p));
    }
    for module in &modules {
        let placement = plan.placement(&module.name).unwrap_or(Placement::Cpu);
        match module.layer {
            Some(l) => {
                opts.layers[l] = match placement {
                    Placement::Disk => LayerTarget::Disk,
                    p => LayerTarget::Device(on(p)),
                }
            }
            None if placement == Placement::Disk && module.bytes > 0 => {
                return Err(PluginError::invalid_input(format!(
                    "`device_map`: {} is mapped to disk; only decoder layers can be offloaded",
                    module.name
                )))
            }
            None => {}
        }
    }
    // One subfolder per instance: each writes and maps its own files, so that an instance
    // never rewrites a file another has mapped.
    opts.offload_folder = folder.map(|f| f.join(format!("instance-{}", ctx.assignment.index)));
    tracing::info!(model = %ctx.model_name, "device map:\n{}", plan.render(&budgets));
    Ok(opts)
}
