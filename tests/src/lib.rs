//! Fixtures shared by tollgate's integration tests: crafted frames, namespace labs,
//! data-plane pins.

pub mod frames;
pub mod pins;
