//! `std-assembler`: gathers the frames of all modules of one image (by image_id), places each
//! module at its `module_positions` place in the ImageBuffer slot, and publishes `ImageMetadata`
//! whose status is computed from **all** modules.
//!
//! Never: emit images out of order, drop an image silently, or show pixels of another image (a
//! module that is missing or was overwritten in its FrameBuffer is zero-filled and flagged).
#![forbid(unsafe_code)]

pub mod calib;
pub mod mask;
pub mod pedestal;
pub mod pixels;
pub mod place;
pub mod service;
pub mod sync;
pub mod workers;
