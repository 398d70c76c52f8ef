//! RNS polynomial ring: NTT tables, aligned polynomials, slot-wise operations and base
//! conversion.

mod basis;
mod context;
mod ntt;
mod poly;

pub use basis::BaseConverter;
pub use context::RingContext;
pub use ntt::NttTable;
pub use poly::{poly_bytes_live, release_spare_buffers, take_poly_bytes_peak, AlignedVec, RnsPoly};
