// torchvision's C++ operators that scripted torchvision detectors call (`nms`: SSD, RetinaNet,
// Faster R-CNN; `roi_align`: Faster R-CNN), for processes without torchvision (its own library
// needs Python). Registered at run time, once per process, each only where it does not exist yet
// (another copy of a plugin, or torchvision itself, may have registered it; plugin libraries are
// never unloaded, so a kernel stays valid).
//
// nms: greedy non-maximum suppression, as torchvision computes it: boxes visited by score,
// highest first (a stable sort, so ties keep their order), each one kept unless an earlier
// kept box overlaps it by an IoU above the threshold; areas and overlaps in the boxes' dtype.
// One kernel for every device (CompositeExplicitAutograd): a GPU detector's boxes are
// suppressed on the CPU, not tested on a GPU yet.
#include <algorithm>
#include <cmath>
#include <vector>
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

// roi_align: each region of interest (batch index, x1, y1, x2, y2 in the input's scale before
// `spatial_scale`) pooled to pooled_height × pooled_width bins, each bin the mean of
// sampling_ratio² (or, when 0, ceil(bin size)²) bilinear samples, as torchvision computes it:
// the same sample positions, weights and order of accumulation.
template <typename T>
struct Sample {
  int64_t at[4];
  T w[4];
};

template <typename T>
void roi_align_rois(const T* input, T spatial_scale, int64_t channels, int64_t height,
                    int64_t width, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                    bool aligned, const T* rois, int64_t n_rois, T* output) {
  for (int64_t n = 0; n < n_rois; n++) {
    const T* roi = rois + n * 5;
    const int64_t batch = static_cast<int64_t>(roi[0]);
    const T shift = aligned ? static_cast<T>(0.5) : static_cast<T>(0.0);
    const T start_w = roi[1] * spatial_scale - shift;
    const T start_h = roi[2] * spatial_scale - shift;
    const T end_w = roi[3] * spatial_scale - shift;
    const T end_h = roi[4] * spatial_scale - shift;
    T roi_w = end_w - start_w;
    T roi_h = end_h - start_h;
    if (!aligned) {
      roi_w = std::max(roi_w, static_cast<T>(1.));
      roi_h = std::max(roi_h, static_cast<T>(1.));
    }
    const T bin_h = static_cast<T>(roi_h) / static_cast<T>(pooled_h);
    const T bin_w = static_cast<T>(roi_w) / static_cast<T>(pooled_w);
    const int64_t grid_h =
        sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(std::ceil(roi_h / pooled_h));
    const int64_t grid_w =
        sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(std::ceil(roi_w / pooled_w));
    const T count = static_cast<T>(std::max<int64_t>(grid_h * grid_w, 1));
    // Where each bin's samples fall and their bilinear weights, shared by every channel.
    std::vector<Sample<T>> samples;
    samples.reserve(static_cast<size_t>(std::max<int64_t>(grid_h * grid_w, 0) * pooled_h * pooled_w));
    for (int64_t ph = 0; ph < pooled_h; ph++) {
      for (int64_t pw = 0; pw < pooled_w; pw++) {
        for (int64_t iy = 0; iy < grid_h; iy++) {
          const T yy = start_h + ph * bin_h +
                       static_cast<T>(iy + .5f) * bin_h / static_cast<T>(grid_h);
          for (int64_t ix = 0; ix < grid_w; ix++) {
            const T xx = start_w + pw * bin_w +
                         static_cast<T>(ix + .5f) * bin_w / static_cast<T>(grid_w);
            Sample<T> s{{0, 0, 0, 0}, {0, 0, 0, 0}};
            T y = yy;
            T x = xx;
            if (!(y < -1.0 || y > height || x < -1.0 || x > width)) {
              if (y <= 0) y = 0;
              if (x <= 0) x = 0;
              int64_t y_low = static_cast<int64_t>(y);
              int64_t x_low = static_cast<int64_t>(x);
              int64_t y_high, x_high;
              if (y_low >= height - 1) {
                y_high = y_low = height - 1;
                y = static_cast<T>(y_low);
              } else {
                y_high = y_low + 1;
              }
              if (x_low >= width - 1) {
                x_high = x_low = width - 1;
                x = static_cast<T>(x_low);
              } else {
                x_high = x_low + 1;
              }
              const T ly = y - y_low;
              const T lx = x - x_low;
              const T hy = 1. - ly;
              const T hx = 1. - lx;
              s = Sample<T>{{y_low * width + x_low, y_low * width + x_high,
                             y_high * width + x_low, y_high * width + x_high},
                            {hy * hx, hy * lx, ly * hx, ly * lx}};
            }
            samples.push_back(s);
          }
        }
      }
    }
    for (int64_t c = 0; c < channels; c++) {
      const T* plane = input + (batch * channels + c) * height * width;
      T* out = output + (n * channels + c) * pooled_h * pooled_w;
      size_t k = 0;
      for (int64_t bin = 0; bin < pooled_h * pooled_w; bin++) {
        T value = 0.;
        for (int64_t g = 0; g < grid_h * grid_w; g++) {
          const Sample<T>& s = samples[k++];
          value += s.w[0] * plane[s.at[0]] + s.w[1] * plane[s.at[1]] +
                   s.w[2] * plane[s.at[2]] + s.w[3] * plane[s.at[3]];
        }
        out[bin] = value / count;
      }
    }
  }
}

at::Tensor roi_align_any(const at::Tensor& input_in, const at::Tensor& rois_in,
                         double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                         int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(input_in.dim() == 4, "roi_align: input must be [N, C, H, W], got ", input_in.sizes());
  TORCH_CHECK(rois_in.dim() == 2 && rois_in.size(1) == 5,
              "roi_align: rois must be [K, 5], got ", rois_in.sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "roi_align: the output size must be positive");
  TORCH_CHECK(input_in.scalar_type() == rois_in.scalar_type(),
              "roi_align: input and rois must have the same dtype");
  const at::Tensor input = input_in.cpu().contiguous();
  const at::Tensor rois = rois_in.cpu().contiguous();
  const int64_t n_rois = rois.size(0);
  const int64_t channels = input.size(1), height = input.size(2), width = input.size(3);
  at::Tensor output = at::zeros({n_rois, channels, pooled_h, pooled_w}, input.options());
  if (output.numel() == 0) return output.to(input_in.device());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "roi_align", [&] {
    const scalar_t* r = rois.data_ptr<scalar_t>();
    for (int64_t n = 0; n < n_rois; n++) {
      const auto batch = static_cast<int64_t>(r[n * 5]);
      TORCH_CHECK(batch >= 0 && batch < input.size(0),
                  "roi_align: a region names image ", batch, " of ", input.size(0));
    }
    roi_align_rois<scalar_t>(input.data_ptr<scalar_t>(), static_cast<scalar_t>(spatial_scale),
                             channels, height, width, pooled_h, pooled_w, sampling_ratio,
                             aligned, r, n_rois, output.data_ptr<scalar_t>());
  });
  return output.to(input_in.device());
}

bool registered(const char* name) {
  return c10::Dispatcher::singleton().findSchema({name, ""}).has_value();
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
      const bool nms = !registered("torchvision::nms");
      const bool roi_align = !registered("torchvision::roi_align");
      if (!nms && !roi_align) {
        result = 0;
        return;
      }
      // Kept for the life of the process, as a static TORCH_LIBRARY would be.
      auto* defs = new torch::Library(torch::Library::FRAGMENT, "torchvision", std::nullopt,
                                      __FILE__, __LINE__);
      auto* impls = new torch::Library(torch::Library::IMPL, "torchvision",
                                       c10::DispatchKey::CompositeExplicitAutograd, __FILE__,
                                       __LINE__);
      if (nms) {
        defs->def("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor");
        impls->impl("nms", TORCH_FN(nms_any));
      }
      if (roi_align) {
        defs->def(
            "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
            "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
        impls->impl("roi_align", TORCH_FN(roi_align_any));
      }
      result = 1;
    } catch (...) {
      result = -1;
    }
  });
  return result;
}

}
