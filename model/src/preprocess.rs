//! The one image preprocessing path shared by training, the native client and the wasm client.
//!
//! Bytes -> decoded image (format detected from the bytes, never from a file name) ->
//! colour conversion to the model's channel count -> resize to the model input ->
//! u8 pixels (HWC) -> normalized f32 (CHW) with the manifest's mean/std.
//! Training augments the u8 HWC pixels before normalizing, so both sides share every step
//! except augmentation.

use crate::{InputSpec, ModelError, ResizePolicy};
use image::{imageops::FilterType, DynamicImage, ImageReader};
use std::io::Cursor;

/// Decodes image bytes (JPEG or PNG, detected from the bytes) and returns u8 pixels in HWC
/// order at the model's input size and channel count.
pub fn decode_to_input_u8(bytes: &[u8], spec: &InputSpec) -> Result<Vec<u8>, ModelError> {
    let img = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ModelError::Image(e.to_string()))?
        .decode()
        .map_err(|e| ModelError::Image(e.to_string()))?;
    image_to_input_u8(&img, spec)
}

/// Resizes (per the spec's policy) and converts colour; returns HWC u8 pixels.
pub fn image_to_input_u8(img: &DynamicImage, spec: &InputSpec) -> Result<Vec<u8>, ModelError> {
    let (w, h) = (spec.width as u32, spec.height as u32);
    if w == 0 || h == 0 {
        return Err(ModelError::Invalid("input size must be positive".into()));
    }
    let resized = if img.width() == w && img.height() == h {
        img.clone()
    } else {
        match spec.resize {
            ResizePolicy::Stretch => img.resize_exact(w, h, FilterType::Triangle),
            ResizePolicy::ShorterSideCenterCrop => {
                // Scale so the image covers the target, then cut the centre.
                let s = f64::max(
                    w as f64 / img.width() as f64,
                    h as f64 / img.height() as f64,
                );
                let nw = ((img.width() as f64 * s).round() as u32).max(w);
                let nh = ((img.height() as f64 * s).round() as u32).max(h);
                let big = img.resize_exact(nw, nh, FilterType::Triangle);
                big.crop_imm((nw - w) / 2, (nh - h) / 2, w, h)
            }
        }
    };
    match spec.channels {
        1 => Ok(resized.to_luma8().into_raw()),
        3 => Ok(resized.to_rgb8().into_raw()),
        c => Err(ModelError::Invalid(format!(
            "input channels must be 1 or 3, got {c}"
        ))),
    }
}

/// Normalizes HWC u8 pixels into CHW f32: (p/255 - mean[c]) / std[c].
pub fn normalize_chw(pixels: &[u8], spec: &InputSpec) -> Result<Vec<f32>, ModelError> {
    let (c, h, w) = (spec.channels, spec.height, spec.width);
    if pixels.len() != c * h * w {
        return Err(ModelError::Invalid(format!(
            "expected {} pixel values, got {}",
            c * h * w,
            pixels.len()
        )));
    }
    spec.check()?;
    let mut out = vec![0f32; c * h * w];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                let p = pixels[(y * w + x) * c + ch] as f32 / 255.0;
                out[ch * h * w + y * w + x] = (p - spec.mean[ch]) / spec.std[ch];
            }
        }
    }
    Ok(out)
}

/// Bytes to the normalized CHW f32 tensor the model takes.
pub fn preprocess(bytes: &[u8], spec: &InputSpec) -> Result<Vec<f32>, ModelError> {
    normalize_chw(&decode_to_input_u8(bytes, spec)?, spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageFormat, RgbImage};

    fn spec(c: usize, h: usize, w: usize, resize: ResizePolicy) -> InputSpec {
        InputSpec {
            channels: c,
            height: h,
            width: w,
            mean: vec![0.5; c],
            std: vec![0.25; c],
            resize,
        }
    }

    fn encode(img: DynamicImage, fmt: ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, fmt).unwrap();
        buf.into_inner()
    }

    #[test]
    fn png_bytes_are_detected_regardless_of_name_and_converted_to_rgb() {
        let g = GrayImage::from_fn(10, 6, |x, _| image::Luma([(x * 20) as u8]));
        let bytes = encode(DynamicImage::ImageLuma8(g), ImageFormat::Png);
        let out = decode_to_input_u8(&bytes, &spec(3, 6, 10, ResizePolicy::Stretch)).unwrap();
        assert_eq!(out.len(), 6 * 10 * 3);
        // grey -> RGB replicates the value in each channel
        assert_eq!(&out[3 * 3..3 * 4], &[60, 60, 60]);
    }

    #[test]
    fn jpeg_rgb_to_grey_and_resize() {
        let rgb = RgbImage::from_fn(40, 20, |_, _| image::Rgb([200, 200, 200]));
        let bytes = encode(DynamicImage::ImageRgb8(rgb), ImageFormat::Jpeg);
        for policy in [ResizePolicy::Stretch, ResizePolicy::ShorterSideCenterCrop] {
            let out = decode_to_input_u8(&bytes, &spec(1, 8, 8, policy)).unwrap();
            assert_eq!(out.len(), 64);
            assert!(out.iter().all(|&p| (p as i32 - 200).abs() <= 3), "{out:?}");
        }
    }

    #[test]
    fn normalization_is_chw_and_uses_mean_std() {
        let s = spec(3, 1, 2, ResizePolicy::Stretch);
        // HWC: pixel0 = (0, 255, 0), pixel1 = (255, 0, 255)
        let out = normalize_chw(&[0, 255, 0, 255, 0, 255], &s).unwrap();
        assert_eq!(out, vec![-2.0, 2.0, 2.0, -2.0, -2.0, 2.0]);
    }

    #[test]
    fn garbage_bytes_give_an_error_not_a_panic() {
        let e = preprocess(b"not an image", &spec(3, 4, 4, ResizePolicy::Stretch));
        assert!(matches!(e, Err(ModelError::Image(_))));
    }
}
