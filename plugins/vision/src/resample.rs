//! Resizing as Pillow resizes (`Image.resize` with a resampling filter, which is what
//! torchvision's `Resize` runs on a PIL image): a separable convolution whose support widens
//! with the reduction (so downscaling averages rather than skips pixels), in 22-bit fixed point,
//! horizontal pass first, each pass rounded to 8 bits. Done the same way, the result is
//! Pillow's to the byte, so a model sees the tensor it was trained and checked on.

/// A resampling filter, as Pillow names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    /// Pillow's `BOX`.
    Box,
    /// Pillow's `BILINEAR` (torchvision's default).
    Bilinear,
    /// Pillow's `HAMMING`.
    Hamming,
    /// Pillow's `BICUBIC` (a = -0.5).
    Bicubic,
    /// Pillow's `LANCZOS` (3 lobes).
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow's constants are C floats.
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point precision of the coefficients: 8 bits of result, 2 of headroom.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output position, the first input position it reads and its fixed-point weights.
struct Coefficients {
    starts: Vec<usize>,
    /// `ksize` weights per output position (those past its count are zero).
    weights: Vec<i32>,
    counts: Vec<usize>,
    ksize: usize,
}

impl Coefficients {
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Self {
        let scale = in_size as f32 as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut starts = Vec::with_capacity(out_size);
        let mut counts = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) casts truncate toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
            let count = xmax.saturating_sub(xmin).min(ksize);
            let mut total = 0.0;
            for (x, w) in k.iter_mut().enumerate().take(count) {
                *w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
                total += *w;
            }
            let row = &mut weights[xx * ksize..(xx + 1) * ksize];
            for (x, w) in row.iter_mut().enumerate().take(count) {
                let v = if total != 0.0 { k[x] / total } else { k[x] };
                let scaled = v * (1u32 << PRECISION_BITS) as f64;
                *w = if v < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
            }
            starts.push(xmin);
            counts.push(count);
        }
        Self {
            starts,
            weights,
            counts,
            ksize,
        }
    }

    fn taps(&self, at: usize) -> (usize, &[i32]) {
        let row = &self.weights[at * self.ksize..];
        (self.starts[at], &row[..self.counts[at]])
    }
}

fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize an interleaved 8-bit image of `channels` channels from `width` × `height` to
/// `out_width` × `out_height`, as Pillow's `Image.resize(size, filter)` does.
pub fn resize(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_width: usize,
    out_height: usize,
    filter: Filter,
) -> Vec<u8> {
    let whole = Region {
        left: 0,
        top: 0,
        width: out_width,
        height: out_height,
    };
    resize_region(
        pixels,
        (width, height),
        channels,
        (out_width, out_height),
        whole,
        filter,
    )
}

/// A rectangle of the resized image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Its first column.
    pub left: usize,
    /// Its first row.
    pub top: usize,
    /// Its width.
    pub width: usize,
    /// Its height.
    pub height: usize,
}

/// `region` of the image [`resize`] would make (`size` → `out_size`, `region` inside it): the
/// same bytes, computing only the pixels asked for (a center crop after a resize needs about
/// half of them).
pub fn resize_region(
    pixels: &[u8],
    size: (usize, usize),
    channels: usize,
    out_size: (usize, usize),
    region: Region,
    filter: Filter,
) -> Vec<u8> {
    let ((width, height), (out_width, out_height)) = (size, out_size);
    debug_assert_eq!(pixels.len(), width * height * channels);
    debug_assert!(region.left + region.width <= out_width);
    debug_assert!(region.top + region.height <= out_height);
    if region.width == 0 || region.height == 0 {
        return Vec::new();
    }
    let rows = region.top..region.top + region.height;
    let columns = region.left..region.left + region.width;
    let half = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass first (over the input rows the vertical pass reads), each pass rounded to
    // 8 bits, as Pillow does; a pass whose size does not change is skipped, as Pillow skips it
    // (its coefficients would be the identity).
    let vertical = (out_height != height).then(|| Coefficients::new(height, out_height, filter));
    let (first_row, last_row) = match &vertical {
        Some(v) => {
            let (a, _) = v.taps(rows.start);
            let (b, taps) = v.taps(rows.end - 1);
            (a, b + taps.len())
        }
        None => (rows.start, rows.end),
    };
    let mid_width = region.width;
    let mut mid = vec![0u8; (last_row - first_row) * mid_width * channels];
    if out_width != width {
        let horizontal = Coefficients::new(width, out_width, filter);
        for (y, dst) in mid.chunks_exact_mut(mid_width * channels).enumerate() {
            let src = &pixels[(y + first_row) * width * channels..][..width * channels];
            for (xx, out) in columns.clone().zip(dst.chunks_exact_mut(channels)) {
                let (start, taps) = horizontal.taps(xx);
                let src = &src[start * channels..(start + taps.len()) * channels];
                for (c, slot) in out.iter_mut().enumerate() {
                    let mut sum = half;
                    for (px, &w) in src.chunks_exact(channels).zip(taps) {
                        sum += px[c] as i32 * w;
                    }
                    *slot = clip8(sum);
                }
            }
        }
    } else {
        for (y, dst) in mid.chunks_exact_mut(mid_width * channels).enumerate() {
            let row = &pixels[(y + first_row) * width * channels..][..width * channels];
            dst.copy_from_slice(&row[columns.start * channels..columns.end * channels]);
        }
    }
    let Some(vertical) = vertical else {
        return mid;
    };
    let stride = mid_width * channels;
    let mut out = vec![0u8; region.height * stride];
    for (yy, dst) in rows.zip(out.chunks_exact_mut(stride)) {
        let (start, taps) = vertical.taps(yy);
        let first = start - first_row;
        for (x, slot) in dst.iter_mut().enumerate() {
            let mut sum = half;
            for (i, &w) in taps.iter().enumerate() {
                sum += mid[(first + i) * stride + x] as i32 * w;
            }
            *slot = clip8(sum);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_the_identity_and_a_flat_image_stays_flat() {
        let pixels: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize(&pixels, 5, 4, 3, 5, 4, Filter::Bilinear), pixels);
        let flat = vec![200u8; 37 * 23 * 3];
        for filter in [
            Filter::Box,
            Filter::Bilinear,
            Filter::Hamming,
            Filter::Bicubic,
            Filter::Lanczos,
        ] {
            let out = resize(&flat, 37, 23, 3, 11, 9, filter);
            assert!(out.iter().all(|&v| v == 200), "{filter:?}");
            let up = resize(&flat, 37, 23, 3, 80, 50, filter);
            assert!(up.iter().all(|&v| v == 200), "{filter:?}");
        }
    }

    #[test]
    fn a_region_is_the_same_bytes_as_cropping_the_whole_resize() {
        let (w, h) = (53, 31);
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        for (ow, oh) in [(40, 23), (53, 20), (30, 31), (90, 60)] {
            let whole = resize(&pixels, w, h, 3, ow, oh, Filter::Bicubic);
            let region = Region {
                left: 5,
                top: 3,
                width: ow - 9,
                height: oh - 7,
            };
            let part = resize_region(&pixels, (w, h), 3, (ow, oh), region, Filter::Bicubic);
            let cropped: Vec<u8> = (region.top..region.top + region.height)
                .flat_map(|y| {
                    whole[(y * ow + region.left) * 3..(y * ow + region.left + region.width) * 3]
                        .to_vec()
                })
                .collect();
            assert_eq!(part, cropped, "{ow}x{oh}");
        }
    }

    #[test]
    fn halving_with_a_box_filter_averages_pairs() {
        // One row of 4 gray pixels, 2 rows: halving the width averages neighbours.
        let pixels = [10u8, 20, 30, 50, 10, 20, 30, 50];
        let out = resize(&pixels, 4, 2, 1, 2, 2, Filter::Box);
        assert_eq!(out, [15, 40, 15, 40]);
    }
}
