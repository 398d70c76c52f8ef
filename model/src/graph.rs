//! The layer graph: an op list in topological order, each node naming its inputs.
//!
//! Tensors are referred to by name in `weights.safetensors`. Layouts (per image, no batch
//! axis): feature maps are [C, H, W]; Conv2d weight [out, in, kh, kw], bias [out];
//! Poly a/b/c [C, H, W] (already broadcast, batch norm folded in); Affine scale/shift [C].

use serde::{Deserialize, Serialize};

/// One operation of the graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// The normalized input image [C, H, W]; exactly one, first.
    Input,
    /// Cross-correlation with zero padding: y[o,y,x] = bias[o] +
    /// sum_{i,ky,kx} w[o,i,ky,kx] * x[i, y*stride+ky-padding, x*stride+kx-padding].
    Conv2d {
        weight: String,
        bias: String,
        stride: usize,
        padding: usize,
    },
    /// Element-wise quadratic y = a*x^2 + b*x + c with per-element coefficients [C, H, W].
    Poly { a: String, b: String, c: String },
    /// y = max(x, 0).
    Relu,
    /// Per-channel y = scale[c]*x + shift[c] (a batch norm that could not be folded).
    Affine { scale: String, shift: String },
    /// Average over kernel x kernel windows (no padding).
    AvgPool { kernel: usize, stride: usize },
    /// Mean over H and W: [C, H, W] -> [C, 1, 1].
    GlobalAvgPool,
    /// Concatenation along channels, in input order.
    Concat,
}

/// A node: its name, op, input node names and output shape [C, H, W].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    #[serde(flatten)]
    pub op: Op,
    pub inputs: Vec<String>,
    pub shape: [usize; 3],
}

/// Activation kind of a model (the granularity its polynomials were trained with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    PolyLayer,
    PolyChannel,
    PolyElement,
}

/// Channel widths of the optimized SqueezeNet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqueezeNetSpec {
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
    pub conv1: usize,
    /// (squeeze, expand 1x1, expand 3x3)
    pub fire1: (usize, usize, usize),
    pub fire2: (usize, usize, usize),
    pub conv2: usize,
    pub conv3: usize,
}

/// A conv layer of the SqueezeNet: name prefix, in/out channels, kernel, output H/W, and
/// whether an activation + batch norm follows (every conv but the classifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvUnit {
    pub name: String,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub h: usize,
    pub w: usize,
    pub act: bool,
}

impl SqueezeNetSpec {
    /// The widths used for 32x32 CIFAR-10 (models/README.md says why).
    pub fn cifar(classes: usize) -> Self {
        SqueezeNetSpec {
            in_channels: 3,
            height: 32,
            width: 32,
            classes,
            conv1: 64,
            fire1: (32, 64, 64),
            fire2: (32, 64, 64),
            conv2: 192,
            conv3: 192,
        }
    }

    /// Every width scaled by `mult`, rounded, at least 4 channels each.
    pub fn scaled(&self, mult: f64) -> Self {
        let s = |c: usize| ((c as f64 * mult).round() as usize).max(4);
        SqueezeNetSpec {
            conv1: s(self.conv1),
            fire1: (s(self.fire1.0), s(self.fire1.1), s(self.fire1.2)),
            fire2: (s(self.fire2.0), s(self.fire2.1), s(self.fire2.2)),
            conv2: s(self.conv2),
            conv3: s(self.conv3),
            ..self.clone()
        }
    }

    /// Conv layers in forward order.
    pub fn units(&self) -> Vec<ConvUnit> {
        let (h2, w2) = (self.height / 2, self.width / 2);
        let (h4, w4) = (h2 / 2, w2 / 2);
        let f1 = self.fire1.1 + self.fire1.2;
        let f2 = self.fire2.1 + self.fire2.2;
        let u = |name: &str, cin, cout, k, h, w, act| ConvUnit {
            name: name.into(),
            cin,
            cout,
            k,
            h,
            w,
            act,
        };
        vec![
            u(
                "conv1",
                self.in_channels,
                self.conv1,
                3,
                self.height,
                self.width,
                true,
            ),
            u("fire1.squeeze", self.conv1, self.fire1.0, 1, h2, w2, true),
            u("fire1.expand1", self.fire1.0, self.fire1.1, 1, h2, w2, true),
            u("fire1.expand3", self.fire1.0, self.fire1.2, 3, h2, w2, true),
            u("fire2.squeeze", f1, self.fire2.0, 1, h2, w2, true),
            u("fire2.expand1", self.fire2.0, self.fire2.1, 1, h2, w2, true),
            u("fire2.expand3", self.fire2.0, self.fire2.2, 3, h2, w2, true),
            u("conv2", f2, self.conv2, 3, h4, w4, true),
            u("conv3", self.conv2, self.conv3, 3, h4, w4, true),
            u("conv4", self.conv3, self.classes, 1, h4, w4, false),
        ]
    }

    /// The graph with batch norm folded: each unit is `<u>.conv` then, for polynomial
    /// activations, `<u>.act` (Poly with BN folded in); for ReLU, `<u>.act` (Relu) and
    /// `<u>.bn` (Affine). Tensor names: `<u>.weight`, `<u>.bias`, `<u>.poly_{a,b,c}`,
    /// `<u>.bn.scale`, `<u>.bn.shift`. Output node: `gap` ([classes, 1, 1]).
    pub fn graph(&self, relu: bool) -> Vec<Node> {
        let units = self.units();
        let mut nodes = vec![Node {
            name: "input".into(),
            op: Op::Input,
            inputs: vec![],
            shape: [self.in_channels, self.height, self.width],
        }];
        let unit = |nodes: &mut Vec<Node>, name: &str, input: &str| -> String {
            let u = units.iter().find(|u| u.name == name).expect("known unit");
            let shape = [u.cout, u.h, u.w];
            let conv = format!("{name}.conv");
            nodes.push(Node {
                name: conv.clone(),
                op: Op::Conv2d {
                    weight: format!("{name}.weight"),
                    bias: format!("{name}.bias"),
                    stride: 1,
                    padding: u.k / 2,
                },
                inputs: vec![input.into()],
                shape,
            });
            if !u.act {
                return conv;
            }
            let act = format!("{name}.act");
            if relu {
                nodes.push(Node {
                    name: act.clone(),
                    op: Op::Relu,
                    inputs: vec![conv],
                    shape,
                });
                let bn = format!("{name}.bn");
                nodes.push(Node {
                    name: bn.clone(),
                    op: Op::Affine {
                        scale: format!("{name}.bn.scale"),
                        shift: format!("{name}.bn.shift"),
                    },
                    inputs: vec![act],
                    shape,
                });
                bn
            } else {
                nodes.push(Node {
                    name: act.clone(),
                    op: Op::Poly {
                        a: format!("{name}.poly_a"),
                        b: format!("{name}.poly_b"),
                        c: format!("{name}.poly_c"),
                    },
                    inputs: vec![conv],
                    shape,
                });
                act
            }
        };
        let x = unit(&mut nodes, "conv1", "input");
        let pool = |nodes: &mut Vec<Node>, name: &str, input: String| -> String {
            let s = nodes
                .iter()
                .find(|n| n.name == input)
                .expect("exists")
                .shape;
            nodes.push(Node {
                name: name.into(),
                op: Op::AvgPool {
                    kernel: 2,
                    stride: 2,
                },
                inputs: vec![input],
                shape: [s[0], s[1] / 2, s[2] / 2],
            });
            name.to_string()
        };
        let mut x = pool(&mut nodes, "pool1", x);
        for (fire, (_, e1, e3)) in [("fire1", self.fire1), ("fire2", self.fire2)] {
            let s = unit(&mut nodes, &format!("{fire}.squeeze"), &x);
            let a = unit(&mut nodes, &format!("{fire}.expand1"), &s);
            let b = unit(&mut nodes, &format!("{fire}.expand3"), &s);
            let name = format!("{fire}.concat");
            nodes.push(Node {
                name: name.clone(),
                op: Op::Concat,
                inputs: vec![a, b],
                shape: [e1 + e3, self.height / 2, self.width / 2],
            });
            x = name;
        }
        let x = pool(&mut nodes, "pool2", x);
        let x = unit(&mut nodes, "conv2", &x);
        let x = unit(&mut nodes, "conv3", &x);
        let x = unit(&mut nodes, "conv4", &x);
        nodes.push(Node {
            name: "gap".into(),
            op: Op::GlobalAvgPool,
            inputs: vec![x],
            shape: [self.classes, 1, 1],
        });
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_widths_round_and_keep_four_channels() {
        let c = SqueezeNetSpec::cifar(10);
        let half = c.scaled(0.5);
        assert_eq!(
            (half.conv1, half.fire1, half.fire2, half.conv2, half.conv3),
            (32, (16, 32, 32), (16, 32, 32), 96, 96)
        );
        // Input, classes and image size are not widths.
        assert_eq!(
            (half.in_channels, half.classes, half.height, half.width),
            (3, 10, 32, 32)
        );
        let tiny = c.scaled(0.01);
        assert_eq!((tiny.conv1, tiny.fire1, tiny.conv3), (4, (4, 4, 4), 4));
        // The units follow the widths: fire2.squeeze reads both expands of fire1.
        let u = half.units();
        let f2s = u.iter().find(|u| u.name == "fire2.squeeze").unwrap();
        assert_eq!((f2s.cin, f2s.cout, f2s.h), (64, 16, 16));
        assert_eq!(u.last().unwrap().cout, 10);
    }
}
