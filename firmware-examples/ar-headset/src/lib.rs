//! An AR headset's marker tracker built on perceiver-edge: a 90 Hz (11.1 ms) loop runs the
//! `marker` PerceiverIO model (16x16 frames in, a heat map decoded by one output query per
//! pixel out), converts the marker's pixel position to normalised camera coordinates with
//! nalgebra, smooths it with an alpha-beta filter, and drops frames whose inference would miss
//! the display deadline (showing the filter's prediction instead).
//!
//! - [`scene`]: synthetic frames (the training distribution) along a head-motion path.
//! - [`model`]: tokens from a frame; marker position from the heat map.
//! - [`geometry`]: camera intrinsics, rays, the alpha-beta filter.
//! - [`tracker`]: the real-time loop, drop policy, statistics.

pub mod geometry;
pub mod model;
pub mod scene;
pub mod tracker;
