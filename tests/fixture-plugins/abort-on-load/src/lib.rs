//! A shared library whose constructor aborts the process that loads it: `dlopen` alone kills
//! the server, before any plugin code could be guarded. The host must not replay such a load at
//! every start.

extern "C" fn abort_at_load() {
    std::process::abort();
}

/// Runs when the library is loaded.
#[used]
#[link_section = ".init_array"]
static ABORT_AT_LOAD: extern "C" fn() = abort_at_load;
