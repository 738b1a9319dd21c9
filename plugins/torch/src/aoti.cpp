// libtorch's AOTInductor package loader (torch::inductor::AOTIModelPackageLoader), which the
// tch crate does not expose: a `.pt2` written by torch._inductor.aoti_compile_and_package holds
// a compiled shared library of the model (weights included). The loader extracts it to a
// directory of its own under /tmp, dlopens it, and removes the directory when it is deleted.
// No compiler runs at load time for packages that carry their library (the default).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "shim_error.h"

using torch::inductor::AOTIModelPackageLoader;

using cresset::guarded;
using cresset::set_error;

extern "C" {

// A loader for the package at `path` (owned by the caller, freed with cresset_aoti_free), or
// null with `*error` set to a malloc'd message.
void* cresset_aoti_load(const char* path, int64_t num_runners, char** error) {
  return guarded<void*>(error, nullptr, [&]() -> void* {
    return new AOTIModelPackageLoader(path, "model", false,
                                      static_cast<size_t>(num_runners < 1 ? 1 : num_runners),
                                      -1);
  });
}

// Run the model on `n_inputs` tensors (tch's tensor pointers). Fills `outputs` with up to
// `max_outputs` new tensors (the caller owns them) and returns their count, or -1 with
// `*error` set. Inputs are made contiguous: the compiled code assumes dense layouts.
int64_t cresset_aoti_run(void* loader, at::Tensor** inputs, int64_t n_inputs,
                         at::Tensor** outputs, int64_t max_outputs, char** error) {
  // run() throws a std::runtime_error; the compiled library prints the cause to stderr.
  return guarded<int64_t>(error, -1, [&]() -> int64_t {
    std::vector<at::Tensor> in;
    in.reserve(n_inputs);
    for (int64_t i = 0; i < n_inputs; i++) in.push_back(inputs[i]->contiguous());
    std::vector<at::Tensor> out = static_cast<AOTIModelPackageLoader*>(loader)->run(in);
    const int64_t n = static_cast<int64_t>(out.size());
    if (n > max_outputs) {
      set_error(error, "the model answered more outputs than expected");
      return -1;
    }
    // All or none: if an allocation throws part way, the tensors made so far are freed and
    // the caller sees -1 (it frees outputs only when the count says so).
    std::vector<std::unique_ptr<at::Tensor>> made;
    made.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; i++) made.push_back(std::make_unique<at::Tensor>(std::move(out[i])));
    for (int64_t i = 0; i < n; i++) outputs[i] = made[i].release();
    return n;
  });
}

// The metadata of the package at `path` (read from the zip, before anything is loaded) as
// malloc'd "key=value\n" lines, or null with `*error` set.
char* cresset_aoti_package_metadata(const char* path, char** error) {
  return guarded<char*>(error, nullptr, [&]() -> char* {
    auto metadata = AOTIModelPackageLoader::load_metadata_from_package(path, "model");
    std::string lines;
    for (const auto& [key, value] : metadata) lines += key + "=" + value + "\n";
    return strdup(lines.c_str());
  });
}

void cresset_aoti_free(void* loader) { delete static_cast<AOTIModelPackageLoader*>(loader); }
}
