// libtorch's torch.jit.optimize_for_inference for a loaded TorchScript module, which the tch
// crate does not expose: freeze (inline parameters and attributes, fold conv + batch norm),
// then the CPU passes (oneDNN weight layouts, fused conv + add + relu). The optimized module
// cannot be saved and loaded back, so it is made in the process that runs it.
#include <cstdlib>
#include <cstring>

#include <torch/csrc/jit/api/module.h>

extern "C" {

// A new module (owned by the caller, freed with `delete` as tch frees the modules it loads),
// or null with `*error` set to a malloc'd message.
void* cresset_jit_optimize_for_inference(void* module, char** error) {
  try {
    auto* m = static_cast<torch::jit::Module*>(module);
    m->eval();
    return new torch::jit::Module(torch::jit::optimize_for_inference(*m));
  } catch (const std::exception& e) {
    *error = strdup(e.what());
  } catch (...) {
    *error = strdup("unknown C++ exception");
  }
  return nullptr;
}

void cresset_free_c_string(char* s) { std::free(s); }

}
