//! A robot perception node built on perceiver-edge: an AMG8833 8x8 thermal array (I2C,
//! embedded-hal 1.0) feeds a fixed-rate loop that classifies every frame with a PerceiverIO
//! model (the `digits` model: "which digit is drawn on the warm plate") and publishes JSON
//! lines on stdout or UDP.
//!
//! - [`sensor`]: the driver, generic over `embedded_hal::i2c::I2c`.
//! - [`sim`]: a simulated sensor (an `I2c` device serving frames from memory) for hosts.
//! - [`node`]: acquisition thread -> heapless SPSC queue -> inference loop, deadlines, summary.
//! - [`stats`]: latency percentiles in fixed memory. [`publish`]: stdout / UDP / memory sinks.

pub mod node;
pub mod publish;
pub mod sensor;
pub mod sim;
pub mod stats;
