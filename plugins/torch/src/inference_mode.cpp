// libtorch's InferenceMode, which the tch crate does not expose: an RAII guard that turns off
// autograd, version counters and view tracking on this thread (faster than no_grad alone).
#include <c10/core/InferenceMode.h>

extern "C" {

void* cresset_inference_mode_enter() {
  try {
    return new c10::InferenceMode(true);
  } catch (...) {
    return nullptr;
  }
}

void cresset_inference_mode_exit(void* guard) {
  delete static_cast<c10::InferenceMode*>(guard);
}

}
