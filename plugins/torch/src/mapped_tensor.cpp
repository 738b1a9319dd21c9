// A CPU tensor over memory the caller owns (a memory-mapped checkpoint file), which keeps that
// memory alive: the tensor's storage holds `owner` and calls `release(owner)` when the last
// tensor sharing it is freed. tch's `from_blob` has no deleter, so the mapping could be unmapped
// under a live tensor; this is the shim that ties their lifetimes.
#include <ATen/ATen.h>

#include <cstdint>

extern "C" {

// A new at::Tensor (owned by the caller) of `ndim` sizes and dtype `scalar_type` over `data`,
// or null if libtorch throws (then `release` is not called and the caller keeps `owner`).
at::Tensor* cresset_tensor_over(void* data, const int64_t* sizes, int64_t ndim,
                                int scalar_type, void* owner, void (*release)(void*)) {
  try {
    auto options = at::TensorOptions()
                       .dtype(static_cast<at::ScalarType>(scalar_type))
                       .device(at::kCPU);
    at::Tensor t = at::from_blob(
        data, at::IntArrayRef(sizes, static_cast<size_t>(ndim)),
        [owner, release](void*) { release(owner); }, options);
    return new at::Tensor(std::move(t));
  } catch (...) {
    return nullptr;
  }
}

}  // extern "C"
