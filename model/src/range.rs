//! When an answer should not be trusted: an image whose logits leave the range the model was
//! calibrated on by far. Element-wise quadratics stacked seven deep are accurate near the
//! values they were trained on and explode away from them (the shipped CIFAR-10 model: |logits|
//! up to 6e8 on images with black borders, against 15 on its calibration images), so such a
//! class is the polynomial's accident, not the network's judgement. Beyond that, in an
//! encrypted batch an image far enough out (`beaa plan`, "headroom") wraps the modulus and
//! garbles every image of its batch; the clients then see most of the batch flagged.

/// How far beyond the largest calibration |logit| an image may go and still be trusted:
/// 2 bits. The 3,000 ordinary training images we checked stayed within 1.3x
/// (`beaa eval --model cifar10`, "max_abs_logit").
pub const BEYOND_CALIBRATION: f64 = 4.0;

/// Whether one image's logits (`row`) leave the calibrated range of the model's output
/// (`calibrated_max_abs`: the manifest's `ranges[output].max_abs`). Non-finite logits count
/// as outside.
pub fn outside_calibration(row: &[f64], calibrated_max_abs: f64) -> bool {
    row.iter()
        .any(|v| !v.is_finite() || v.abs() > BEYOND_CALIBRATION * calibrated_max_abs)
}

/// Whether most images of a batch are outside: what a modulus wrap looks like (every slot
/// receives garbage), as opposed to a few unusual images.
pub fn batch_looks_corrupt(flags: &[bool]) -> bool {
    flags.len() >= 2 && flags.iter().filter(|&&f| f).count() * 2 > flags.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_images_beyond_the_calibrated_range() {
        assert!(!outside_calibration(&[1.0, -15.0, 59.9], 15.0));
        assert!(outside_calibration(&[1.0, -60.1, 3.0], 15.0));
        assert!(outside_calibration(&[f64::NAN, 0.0], 15.0));
        assert!(!batch_looks_corrupt(&[true, false, false]));
        assert!(batch_looks_corrupt(&[true, true, false]));
        assert!(!batch_looks_corrupt(&[true]));
    }
}
