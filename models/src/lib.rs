//! Training of the BEAA SqueezeNet family with candle: data loading, the network with
//! selectable (polynomial) activations, knowledge distillation, and export to the
//! `beaa-model` directory format.

pub mod bench;
pub mod cli;
pub mod data;
pub mod export;
pub mod fused;
pub mod im2col;
pub mod net;
pub mod train;
