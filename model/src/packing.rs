//! Element-wise packing, the one layout every client and the server agree on: input
//! ciphertext `k` holds feature `k` (channel, row, column of the preprocessed `[C, H, W]`
//! input) of every image, image `b` in slot `b`; output ciphertext `c` holds logit `c` of
//! image `b` in slot `b`. The browser, the native client and the local encrypted path all
//! call these.

/// The slot values of input ciphertext `k`: feature `k` of each image of `images`
/// (image-major, `features` values per image).
pub fn feature_slots<T: Copy + Into<f64>>(images: &[T], features: usize, k: usize) -> Vec<f64> {
    assert!(features > 0 && k < features, "feature {k} of {features}");
    images
        .chunks_exact(features)
        .map(|img| img[k].into())
        .collect()
}

/// Per-image logits from decoded output ciphertexts (`slots[c]` = the slots of logit `c`) for
/// the first `batch` images.
pub fn image_logits(slots: &[Vec<f64>], batch: usize) -> Vec<Vec<f64>> {
    (0..batch)
        .map(|b| slots.iter().map(|s| s[b]).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trip() {
        // Two images of three features.
        let images = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let slots: Vec<Vec<f64>> = (0..3).map(|k| feature_slots(&images, 3, k)).collect();
        assert_eq!(slots, vec![vec![1.0, 4.0], vec![2.0, 5.0], vec![3.0, 6.0]]);
        // Reading the "outputs" back per image gives the images again.
        assert_eq!(
            image_logits(&slots, 2),
            vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]
        );
    }
}
