// CUDA graphs for decode steps, and the CUDA settings tch has no switch for: built by build.rs
// into a library of its own (libcresset_cuda_graph.so, linked to libtorch_cuda) that the
// decoder loads at run time when a model is on a GPU, so that the plugins themselves never
// link the CUDA libraries (the CPU distribution ships without them).
//
// A capture runs the caller's forward pass on a side stream taken from libtorch's pool, made
// the current stream for the capturing thread only (cudaStreamCaptureModeThreadLocal: other
// workers' CUDA calls go on), with libtorch's caching allocator serving the captured
// allocations from the graph's private pool, which lives as long as the graph. Replays run on
// the thread's current stream.
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>

#include <cuda_runtime_api.h>

#include <ATen/Context.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "shim_error.h"

using cresset::guarded;
using cresset::set_error;

namespace {
struct Graph {
  at::cuda::CUDAGraph graph;
  c10::DeviceIndex device;
  // The device and stream that were current before the capture, restored after it.
  c10::DeviceIndex previous_device = 0;
  std::optional<c10::cuda::CUDAStream> previous;
  bool captured = false;
};
}  // namespace

extern "C" {

// The CUDA compute capability of `device` as major * 10 + minor, or -1 (with `*error`).
int cresset_cuda_capability(int device, char** error) {
  int major = 0, minor = 0;
  cudaError_t status = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  }
  if (status != cudaSuccess) {
    set_error(error, cudaGetErrorString(status));
    return -1;
  }
  return major * 10 + minor;
}

// TF32 for f32 matmuls and convolutions (process-wide, as torch.backends' switches are).
void cresset_cuda_allow_tf32(int on) {
  at::globalContext().setAllowTF32CuBLAS(on != 0);
  at::globalContext().setAllowTF32CuDNN(on != 0);
}

// Which scaled-dot-product attention kernels libtorch may choose (process-wide).
void cresset_cuda_sdp_backends(int flash, int efficient, int math, int cudnn) {
  auto& context = at::globalContext();
  context.setSDPUseFlash(flash != 0);
  context.setSDPUseMemEfficient(efficient != 0);
  context.setSDPUseMath(math != 0);
  context.setSDPUseCuDNN(cudnn != 0);
}

// Start capturing on `device`: returns the graph, or null with `*error`. The calling thread's
// CUDA work goes into the graph until cresset_cuda_graph_end.
void* cresset_cuda_graph_begin(int device, char** error) {
  return guarded(error, static_cast<void*>(nullptr), [&]() -> void* {
    auto index = static_cast<c10::DeviceIndex>(device);
    auto graph = std::make_unique<Graph>();
    graph->device = index;
    // The capture takes the current device's current stream: make them the model's device
    // and a side stream, until cresset_cuda_graph_end.
    graph->previous_device = c10::cuda::current_device();
    c10::cuda::set_device(index);
    // What the thread queued before the capture must be done before the side stream starts.
    c10::cuda::device_synchronize();
    graph->previous = c10::cuda::getCurrentCUDAStream(index);
    auto stream = c10::cuda::getStreamFromPool(false, index);
    c10::cuda::setCurrentCUDAStream(stream);
    try {
      graph->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    } catch (...) {
      c10::cuda::setCurrentCUDAStream(*graph->previous);
      c10::cuda::set_device(graph->previous_device);
      throw;
    }
    return graph.release();
  });
}

// End the capture begun by cresset_cuda_graph_begin (whether the forward pass in between
// succeeded or not) and restore the thread's stream: 0, or -1 with `*error` (the graph is
// then unusable and must be freed).
int cresset_cuda_graph_end(void* handle, char** error) {
  auto* graph = static_cast<Graph*>(handle);
  int status = guarded(error, -1, [&] {
    graph->graph.capture_end();
    graph->captured = true;
    return 0;
  });
  if (graph->previous) c10::cuda::setCurrentCUDAStream(*graph->previous);
  c10::cuda::set_device(graph->previous_device);
  return status;
}

// Replay a captured graph on the thread's current stream: 0, or -1 with `*error`.
int cresset_cuda_graph_replay(void* handle, char** error) {
  auto* graph = static_cast<Graph*>(handle);
  if (!graph->captured) {
    set_error(error, "the CUDA graph was not captured");
    return -1;
  }
  return guarded(error, -1, [&] {
    graph->graph.replay();
    return 0;
  });
}

void cresset_cuda_graph_free(void* handle) {
  delete static_cast<Graph*>(handle);
}

void cresset_cuda_free_c_string(char* s) { free(s); }
}
