//! End-to-end tests across the workspace live in `tests/`; `src/bin/crosscheck.rs` is the
//! native peer of the browser tests.
