//! The validation result a model was exported with (`metrics` in the manifest), read
//! defensively: the server shows it next to each model so that a user knows what the
//! diagnosis has been measured to be worth, and a model directory from elsewhere may carry
//! anything there.

use crate::Manifest;
use serde::Serialize;

/// What `beaa-train export` recorded about the model's last validation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationSummary {
    pub accuracy: f64,
    /// Mean of the per-class recalls (the figure that matters on imbalanced medical data).
    pub balanced_accuracy: f64,
    /// Validation images.
    pub images: u64,
    /// Recall per class, in the manifest's class order.
    pub per_class_recall: Vec<f64>,
    /// How the images were held out: `LastPerClass` (the last images of each class, never
    /// trained on) or `Group` (every image of unseen groups, e.g. patients).
    pub split: Option<String>,
}

impl ValidationSummary {
    /// The manifest's `metrics.validation`, or `None` when it is missing or malformed
    /// (fractions outside [0, 1], no images, a recall count that differs from the classes).
    pub fn of(manifest: &Manifest) -> Option<Self> {
        let m = &manifest.metrics;
        let v = &m["validation"];
        let fraction = |x: &serde_json::Value| x.as_f64().filter(|f| (0.0..=1.0).contains(f));
        let per_class_recall = v["per_class_recall"]
            .as_array()?
            .iter()
            .map(fraction)
            .collect::<Option<Vec<f64>>>()
            .filter(|r| r.len() == manifest.classes.len())?;
        Some(Self {
            accuracy: fraction(&v["accuracy"])?,
            balanced_accuracy: fraction(&v["balanced_accuracy"])?,
            images: v["n"].as_u64().filter(|&n| n > 0)?,
            per_class_recall,
            split: m["validation_split"].as_str().map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_model;
    use crate::{Activation, SqueezeNetSpec};
    use serde_json::json;

    #[test]
    fn recorded_validation_is_read_and_malformed_ones_are_ignored() {
        let mut model = random_model(1, &SqueezeNetSpec::tiny(3, 8, 2), Activation::PolyElement);
        assert_eq!(ValidationSummary::of(&model.manifest), None);
        let good = json!({
            "validation": {"accuracy": 0.8, "balanced_accuracy": 0.75, "n": 98,
                           "per_class_recall": [0.6, 0.9], "loss": 0.5},
            "validation_split": "Group",
        });
        model.manifest.metrics = good.clone();
        let v = ValidationSummary::of(&model.manifest).unwrap();
        assert_eq!((v.accuracy, v.balanced_accuracy, v.images), (0.8, 0.75, 98));
        assert_eq!(v.per_class_recall, vec![0.6, 0.9]);
        assert_eq!(v.split.as_deref(), Some("Group"));
        for (path, bad) in [
            ("accuracy", json!(1.5)),
            ("balanced_accuracy", json!("high")),
            ("n", json!(0)),
            ("per_class_recall", json!([0.6])),
            ("per_class_recall", json!([0.6, -0.1])),
        ] {
            let mut m = good.clone();
            m["validation"][path] = bad;
            model.manifest.metrics = m;
            assert_eq!(ValidationSummary::of(&model.manifest), None, "{path}");
        }
    }
}
