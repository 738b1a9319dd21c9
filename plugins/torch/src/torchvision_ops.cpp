// torchvision's C++ operators that scripted torchvision models call, for processes without
// torchvision (its own library needs Python). Registered at run time, once per process, and
// only where no `torchvision::nms` exists yet (another copy of a plugin, or torchvision itself,
// may have registered it; plugin libraries are never unloaded, so a kernel stays valid).
//
// nms: greedy non-maximum suppression, as torchvision computes it: boxes visited by score,
// highest first (a stable sort, so ties keep their order), each one kept unless an earlier
// kept box overlaps it by an IoU above the threshold; areas and overlaps in the boxes' dtype.
// One kernel for every device (CompositeExplicitAutograd): a GPU detector's boxes are
// suppressed on the CPU, not tested on a GPU yet.
#include <algorithm>
#include <mutex>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

template <typename T>
int64_t suppress(const at::Tensor& boxes, const at::Tensor& order, double iou_threshold,
                 int64_t* keep) {
  const int64_t n = boxes.size(0);
  auto x1_t = boxes.select(1, 0).contiguous();
  auto y1_t = boxes.select(1, 1).contiguous();
  auto x2_t = boxes.select(1, 2).contiguous();
  auto y2_t = boxes.select(1, 3).contiguous();
  at::Tensor area_t = (x2_t - x1_t) * (y2_t - y1_t);
  const T* x1 = x1_t.data_ptr<T>();
  const T* y1 = y1_t.data_ptr<T>();
  const T* x2 = x2_t.data_ptr<T>();
  const T* y2 = y2_t.data_ptr<T>();
  const T* area = area_t.data_ptr<T>();
  const int64_t* rank = order.data_ptr<int64_t>();
  std::vector<uint8_t> gone(n, 0);
  int64_t kept = 0;
  for (int64_t a = 0; a < n; a++) {
    const int64_t i = rank[a];
    if (gone[i]) continue;
    keep[kept++] = i;
    for (int64_t b = a + 1; b < n; b++) {
      const int64_t j = rank[b];
      if (gone[j]) continue;
      const T w = std::max(static_cast<T>(0), std::min(x2[i], x2[j]) - std::max(x1[i], x1[j]));
      const T h = std::max(static_cast<T>(0), std::min(y2[i], y2[j]) - std::max(y1[i], y1[j]));
      const T inter = w * h;
      const T iou = inter / (area[i] + area[j] - inter);
      if (iou > iou_threshold) gone[j] = 1;
    }
  }
  return kept;
}

// On any device: the suppression runs on the CPU (it is sequential), the kept indices go back
// to the boxes' device.
at::Tensor nms_any(const at::Tensor& dets_in, const at::Tensor& scores_in, double iou_threshold) {
  const at::Tensor dets = dets_in.cpu();
  const at::Tensor scores = scores_in.cpu();
  TORCH_CHECK(dets.dim() == 2 && dets.size(1) == 4,
              "nms: boxes must be [N, 4], got ", dets.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == dets.size(0),
              "nms: scores must be [N] with one score per box, got ", scores.sizes());
  TORCH_CHECK(dets.scalar_type() == scores.scalar_type(),
              "nms: boxes and scores must have the same dtype");
  if (dets.numel() == 0) return at::empty({0}, dets_in.options().dtype(at::kLong));
  auto order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  at::Tensor keep = at::empty({dets.size(0)}, dets.options().dtype(at::kLong));
  int64_t kept = 0;
  AT_DISPATCH_FLOATING_TYPES(dets.scalar_type(), "nms", [&] {
    kept = suppress<scalar_t>(dets, order, iou_threshold, keep.data_ptr<int64_t>());
  });
  return keep.narrow(0, 0, kept).to(dets_in.device());
}

}  // namespace

extern "C" {

// 1: registered here; 0: already there; -1: failed (the message is logged by libtorch's throw,
// the module that needs the operator fails to load naming it).
int cresset_register_torchvision_ops() {
  static std::once_flag once;
  static int result = -1;
  std::call_once(once, [] {
    try {
      if (c10::Dispatcher::singleton().findSchema({"torchvision::nms", ""}).has_value()) {
        result = 0;
        return;
      }
      // Kept for the life of the process, as a static TORCH_LIBRARY would be.
      auto* defs = new torch::Library(torch::Library::FRAGMENT, "torchvision", std::nullopt,
                                      __FILE__, __LINE__);
      defs->def("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor");
      auto* impls = new torch::Library(torch::Library::IMPL, "torchvision",
                                       c10::DispatchKey::CompositeExplicitAutograd, __FILE__,
                                       __LINE__);
      impls->impl("nms", TORCH_FN(nms_any));
      result = 1;
    } catch (...) {
      result = -1;
    }
  });
  return result;
}

}
