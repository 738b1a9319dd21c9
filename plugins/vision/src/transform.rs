//! torchvision's ImageNet preprocessing on a decoded image: `Resize(resize)` (the short side,
//! Pillow's resampling), `CenterCrop(crop)`, `ToTensor()`, `Normalize(mean, std)`, computed the
//! way torchvision computes each step on a PIL image.

use cresset_torch::tch::Tensor;
use image::RgbImage;

use crate::resample::{resize_region, Filter, Region};

/// The preprocessing steps, from `[handler]`.
#[derive(Debug, Clone)]
pub struct Transform {
    /// The short side after resizing (`Resize(n)`); `None` keeps the image's size.
    pub resize: Option<u32>,
    /// The square center crop (`CenterCrop(n)`); `None` keeps the whole image.
    pub crop: Option<u32>,
    /// The resampling filter.
    pub filter: Filter,
    /// Per-channel mean and standard deviation (`Normalize`).
    pub mean: [f32; 3],
    /// See `mean`.
    pub std: [f32; 3],
}

impl Transform {
    /// ImageNet's: resize 256, crop 224, bilinear, ImageNet mean and std.
    pub fn imagenet() -> Self {
        Self {
            resize: Some(256),
            crop: Some(224),
            filter: Filter::Bilinear,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// The image as a `[3, H, W]` float tensor.
    pub fn apply(&self, image: &RgbImage) -> Tensor {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let (out_w, out_h) = match self.resize {
            Some(size) => resized_size(width, height, size as usize),
            None => (width, height),
        };
        let (crop_w, crop_h) = match self.crop {
            Some(c) => (c as usize, c as usize),
            None => (out_w, out_h),
        };
        // torchvision pads an image smaller than the crop with zeros (the odd pixel of padding
        // on the right/bottom), then crops at the rounded center. Only the crop is resized.
        let pad_left = crop_w.saturating_sub(out_w) / 2;
        let pad_top = crop_h.saturating_sub(out_h) / 2;
        let left = round_half_even((out_w.max(crop_w) - crop_w) as f64 / 2.0);
        let top = round_half_even((out_h.max(crop_h) - crop_h) as f64 / 2.0);
        // The crop's part inside the resized image, in its coordinates, and where it lands.
        let x0 = left.saturating_sub(pad_left);
        let y0 = top.saturating_sub(pad_top);
        let region = Region {
            left: x0,
            top: y0,
            width: (left + crop_w).saturating_sub(pad_left).min(out_w) - x0,
            height: (top + crop_h).saturating_sub(pad_top).min(out_h) - y0,
        };
        let (dx, dy) = (pad_left.saturating_sub(left), pad_top.saturating_sub(top));
        let pixels = resize_region(
            image.as_raw(),
            (width, height),
            3,
            (out_w, out_h),
            region,
            self.filter,
        );
        let plane = crop_w * crop_h;
        // Padding is zero before normalizing.
        let mut out: Vec<f32> = (0..3)
            .flat_map(|c| std::iter::repeat_n(-self.mean[c] / self.std[c], plane))
            .collect();
        for y in 0..region.height {
            let row = &pixels[y * region.width * 3..(y + 1) * region.width * 3];
            for (x, px) in row.chunks_exact(3).enumerate() {
                let at = (y + dy) * crop_w + x + dx;
                for c in 0..3 {
                    // As torchvision computes it (a division, not a multiplication by 1/std).
                    out[c * plane + at] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
                }
            }
        }
        Tensor::from_slice(&out).view([3, crop_h as i64, crop_w as i64])
    }
}

/// torchvision's size for `Resize(size)`: the short side becomes `size`, the long side
/// `int(size * long / short)`.
pub fn resized_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = ((size * long) as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Python's `round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> usize {
    let floor = x.floor();
    let rounded = if x - floor == 0.5 {
        if floor % 2.0 == 0.0 {
            floor
        } else {
            floor + 1.0
        }
    } else {
        x.round()
    };
    rounded as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_crop_offsets_follow_torchvision() {
        assert_eq!(resized_size(451, 300, 256), (384, 256));
        assert_eq!(resized_size(427, 640, 256), (256, 383));
        assert_eq!(resized_size(256, 256, 256), (256, 256));
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.0), 3);
    }

    #[test]
    fn a_small_image_is_padded_with_zeros_before_the_crop() {
        let image = RgbImage::from_pixel(2, 2, image::Rgb([255, 255, 255]));
        let t = Transform {
            resize: None,
            crop: Some(4),
            filter: Filter::Bilinear,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let out = Vec::<f32>::try_from(t.apply(&image).select(0, 0).flatten(0, -1)).expect("f32");
        #[rustfmt::skip]
        assert_eq!(out, [
            0.0, 0.0, 0.0, 0.0,
            0.0, 1.0, 1.0, 0.0,
            0.0, 1.0, 1.0, 0.0,
            0.0, 0.0, 0.0, 0.0,
        ]);
    }
}
