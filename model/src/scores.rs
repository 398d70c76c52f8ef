//! Turning logits into an answer: argmax and softmax, one definition for every client (the
//! browser, `beaa predict`, `beaa eval`, the plaintext reference) so they never disagree on
//! which class won.

/// Index of the first largest value; NaN never wins (0 if every value is NaN or `v` is empty).
pub fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        // `!(v[best] >= x)` would let NaN win; compare so that a NaN `best` is replaced
        if x > v[best] || (v[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best
}

/// [`argmax`] of each row of `classes` values.
pub fn argmax_rows(values: &[f64], classes: usize) -> Vec<usize> {
    values.chunks(classes.max(1)).map(argmax).collect()
}

/// Probabilities of one row of logits (shifted by the row's maximum, so large logits do not
/// overflow `exp`).
pub fn softmax(v: &[f64]) -> Vec<f64> {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = v.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// [`softmax`] of each row of `classes` logits, concatenated.
pub fn softmax_rows(logits: &[f64], classes: usize) -> Vec<f64> {
    logits.chunks(classes.max(1)).flat_map(softmax).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7, 0.2]), 1);
        assert_eq!(argmax(&[f64::NAN, -3.0, -1.0]), 2);
        assert_eq!(argmax(&[2.0, f64::NAN, 5.0]), 2);
        assert_eq!(argmax(&[f64::NAN, f64::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax_rows(&[0.1, 0.7, 0.2, 3.0, -1.0, 2.0], 3), vec![1, 0]);
    }

    #[test]
    fn softmax_is_stable_and_keeps_the_argmax() {
        let p = softmax_rows(&[0.0, 0.0, 1000.0, 0.0, -5.0, 3.0], 2);
        assert!((p[0] - 0.5).abs() < 1e-12 && (p[2] - 1.0).abs() < 1e-12);
        assert!((p[4] + p[5] - 1.0).abs() < 1e-12);
        assert_eq!(argmax_rows(&p, 2), vec![0, 0, 1]);
    }
}
