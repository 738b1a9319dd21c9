//! The torchscript plugin's request parser: JSON tensors (`data`) and Open Inference Protocol
//! v2 inputs (`inputs`), as a prediction body arrives.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cresset_plugin_torchscript::TorchScriptHandler::parse(data);
});
