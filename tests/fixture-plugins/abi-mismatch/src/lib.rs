//! Test fixture: a plugin built against a future, incompatible plugin ABI (2.0.0).
//!
//! It exports a root module under Cresset's name with version 2.0.0 and another layout, as a
//! plugin built against `cresset-plugin-api` 2.x would.

use abi_stable::library::RootModule;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::RString;
use abi_stable::{declare_root_module_statics, export_root_module, StableAbi};

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = FuturePluginModRef)))]
pub struct FuturePluginMod {
    #[sabi(last_prefix_field)]
    pub describe_v2: extern "C" fn(u64) -> RString,
}

impl RootModule for FuturePluginModRef {
    declare_root_module_statics! {FuturePluginModRef}
    const BASE_NAME: &'static str = "cresset_plugin";
    const NAME: &'static str = "cresset_plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("2.0.0");
}

extern "C" fn describe_v2(_: u64) -> RString {
    RString::from("future")
}

#[export_root_module]
pub fn root_module() -> FuturePluginModRef {
    FuturePluginMod { describe_v2 }.leak_into_prefix()
}
