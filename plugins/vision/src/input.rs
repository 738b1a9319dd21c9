//! Images in: the bytes of one request's image (a raw body, a multipart `data`/`body` field,
//! or base64 in JSON), decoded to RGB under a pixel cap, each failure the request's own.

use std::io::Cursor;

use base64::Engine as _;
use cresset_plugin_api::{PluginError, Request};
use image::{ImageFormat, ImageReader, RgbImage};
use serde_json::Value;

/// The formats decoded; anything else is refused by name.
const FORMATS: [ImageFormat; 5] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Bmp,
    ImageFormat::Gif,
];

/// How the request framed its images, and so how its answer is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One image (raw bytes, multipart, or `{"data"|"body": base64}`): the answer is that
    /// image's result, as TorchServe's handlers answer.
    One,
    /// KServe v1, `{"instances": [{"data"|"b64": base64} | base64, ...]}`: the answer is
    /// `{"predictions": [...]}`, one per instance.
    Instances,
}

/// The encoded images of one request.
pub fn encoded_images(request: &Request) -> Result<(Framing, Vec<Vec<u8>>), PluginError> {
    let body = request.body.as_slice();
    let json = request.content_type.starts_with("application/json")
        || (request.content_type.is_empty()
            && body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'));
    if !json {
        return Ok((Framing::One, vec![body.to_vec()]));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        PluginError::invalid_input(format!(
            "the body is JSON but not valid: {e}. Send the image bytes as the body, as a \
             multipart `data` field, or as base64 in `{{\"data\": ...}}`"
        ))
    })?;
    if let Some(instances) = value.get("instances") {
        let list = instances.as_array().ok_or_else(|| {
            PluginError::invalid_input("`instances` must be a list of base64 images")
        })?;
        if list.is_empty() {
            return Err(PluginError::invalid_input(
                "`instances` must hold at least one image",
            ));
        }
        let images = list
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let field = format!("instances[{i}]");
                match item {
                    Value::String(_) => base64_image(&field, item),
                    Value::Object(map) => match map.get("data").or(map.get("b64")) {
                        Some(v) => base64_image(&format!("{field}.data"), v),
                        None => Err(PluginError::invalid_input(format!(
                            "`{field}` must be a base64 string or {{\"data\": base64}}"
                        ))),
                    },
                    _ => Err(PluginError::invalid_input(format!(
                        "`{field}` must be a base64 string or {{\"data\": base64}}"
                    ))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((Framing::Instances, images));
    }
    match value.get("data").or(value.get("body")) {
        Some(v) => Ok((Framing::One, vec![base64_image("data", v)?])),
        None => Err(PluginError::invalid_input(
            "a JSON body must carry the image as base64 in `data` (or `body`), or a list of \
             them in `instances`",
        )),
    }
}

fn base64_image(field: &str, value: &Value) -> Result<Vec<u8>, PluginError> {
    let text = value
        .as_str()
        .ok_or_else(|| PluginError::invalid_input(format!("`{field}` must be a base64 string")))?;
    // A data URL's prefix is allowed.
    let text = match text.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => text,
    };
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| PluginError::invalid_input(format!("`{field}` is not valid base64: {e}")))
}

/// Decode one image to 8-bit RGB (alpha dropped, gray replicated, as PIL's
/// `convert("RGB")` does). An image of more than `max_pixels` pixels is refused from its
/// header, before anything is decoded.
///
/// JPEG goes through libjpeg-turbo's decoder (as MozJPEG builds it), which PIL also uses, with
/// the same defaults (accurate integer IDCT, fancy upsampling): the pixels are PIL's to the
/// byte, where a pure-Rust decoder differs by a few levels (enough to reorder a model's top
/// five). The other formats are lossless and decode the same in any correct decoder.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, PluginError> {
    let format = image::guess_format(bytes)
        .ok()
        .filter(|f| FORMATS.contains(f))
        .ok_or_else(|| {
            PluginError::invalid_input(
                "the body is not an image Cresset decodes (JPEG, PNG, WebP, BMP or GIF)",
            )
        })?;
    if format == ImageFormat::Jpeg {
        return decode_jpeg(bytes, max_pixels);
    }
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| {
            PluginError::invalid_input(format!("cannot read the {format:?} image: {e}"))
        })?;
    check_size(width as u64, height as u64, max_pixels)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // The decoded image at up to 16 bits and 4 channels, and the decoder's own buffers.
    limits.max_alloc = Some((width as u64 * height as u64).saturating_mul(8) + (64 << 20));
    reader.limits(limits);
    let image = reader.decode().map_err(|e| {
        PluginError::invalid_input(format!("cannot decode the {format:?} image: {e}"))
    })?;
    Ok(image.to_rgb8())
}

fn check_size(width: u64, height: u64, max_pixels: u64) -> Result<(), PluginError> {
    let pixels = width * height;
    if pixels > max_pixels {
        return Err(PluginError::invalid_input(format!(
            "the image is {width} × {height} = {pixels} pixels, more than `max_image_pixels` \
             ({max_pixels}): refused as a possible decompression bomb"
        )));
    }
    if pixels == 0 {
        return Err(PluginError::invalid_input("the image has no pixels"));
    }
    Ok(())
}

fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, PluginError> {
    let bad = |e: std::io::Error| {
        PluginError::invalid_input(format!("cannot decode the JPEG image: {e}"))
    };
    // The header alone: the size is checked before libjpeg allocates for the image.
    let header = mozjpeg::Decompress::new_mem(bytes).map_err(bad)?;
    let (width, height) = header.size();
    check_size(width as u64, height as u64, max_pixels)?;
    if !jpeg_is_complete(bytes) {
        return Err(PluginError::invalid_input(
            "the JPEG image is truncated (it has no end-of-image marker)",
        ));
    }
    let mut started = header.rgb().map_err(bad)?;
    let pixels: Vec<[u8; 3]> = started.read_scanlines().map_err(bad)?;
    started.finish().map_err(bad)?;
    RgbImage::from_raw(
        width as u32,
        height as u32,
        pixels.into_iter().flatten().collect(),
    )
    .ok_or_else(|| {
        PluginError::invalid_input("the JPEG image decoded to fewer pixels than its size")
    })
}

/// Whether a JPEG stream reaches its end-of-image marker (`FF D9`) after its last scan: a
/// truncated upload decodes to grey rows in lenient decoders, so it is refused instead, as
/// PIL refuses it.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    // Inside a scan 0xFF is always stuffed (FF 00) or a restart marker, so FF D9 after the
    // last start-of-scan (FF DA) is the main image's end, not an EXIF thumbnail's. Bytes after
    // it (padding, appended data) are allowed.
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    last_scan.is_some_and(|at| bytes[at..].windows(2).any(|w| w == [0xFF, 0xD9]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cresset_plugin_api::sdk::testing;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).expect("encode");
        out.into_inner()
    }

    #[test]
    fn raw_multipart_and_base64_bodies_give_the_same_image() {
        let bytes = png(5, 3);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let raw = testing::request("image/png", bytes.clone());
        let json = testing::request("application/json", format!(r#"{{"data": "{b64}"}}"#));
        let v1 = testing::request(
            "application/json",
            format!(r#"{{"instances": [{{"data": "{b64}"}}, "{b64}"]}}"#),
        );
        assert_eq!(
            encoded_images(&raw).expect("raw"),
            (Framing::One, vec![bytes.clone()])
        );
        assert_eq!(
            encoded_images(&json).expect("json"),
            (Framing::One, vec![bytes.clone()])
        );
        assert_eq!(
            encoded_images(&v1).expect("v1"),
            (Framing::Instances, vec![bytes.clone(), bytes.clone()])
        );
        let image = decode(&bytes, 100).expect("decodes");
        assert_eq!((image.width(), image.height()), (5, 3));
        assert_eq!(image.get_pixel(4, 2).0, [4, 2, 7]);
    }

    #[test]
    fn bad_images_are_refused_with_a_reason() {
        let cases: [(Vec<u8>, &str); 4] = [
            (b"plain text".to_vec(), "not an image"),
            (png(20, 20), "more than `max_image_pixels`"),
            (png(8, 8)[..60].to_vec(), "cannot"),
            (vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 16], "cannot"),
        ];
        for (bytes, want) in cases {
            let err = decode(&bytes, 100).expect_err("refused");
            assert!(err.message.contains(want), "{want}: {}", err.message);
        }
        let bad = testing::request("application/json", r#"{"data": "%%%"}"#);
        assert!(encoded_images(&bad)
            .expect_err("bad base64")
            .message
            .contains("`data` is not valid base64"));
    }
}
