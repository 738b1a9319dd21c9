//! The Cresset model server: the HTTP host, the plugin loader, model archives.
//!
//! The host never links libtorch: every model runs inside a handler plugin (`cdylib`) loaded
//! through the stable ABI of `cresset-plugin-api`.

pub mod archive;
pub mod config;
pub mod file_identity;
pub mod grpc;
pub mod http;
pub mod isolation;
pub mod loader;
pub mod locked_file;
pub mod metrics;
pub mod plan;
pub mod registry;
pub mod remote;
pub mod services;
pub mod tensor_wire;
pub mod worker;
