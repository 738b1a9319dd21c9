//! Test fixture: a plugin whose root-module constructor returns an error.

use cresset_plugin_api::abi_stable::library::{
    __call_root_module_loader, CheckTypeLayout, LibHeader, RootModuleResult,
};
use cresset_plugin_api::abi_stable::std_types::RBoxError;
use cresset_plugin_api::PluginModRef;

fn root_module() -> Result<PluginModRef, RBoxError> {
    Err(RBoxError::from_fmt(
        &"init-error fixture: the licence file is missing",
    ))
}

extern "C" fn erased_root_module() -> RootModuleResult {
    __call_root_module_loader(root_module)
}

#[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
pub static ROOT: LibHeader = unsafe {
    LibHeader::from_constructor::<PluginModRef>(erased_root_module, CheckTypeLayout::Yes)
};
