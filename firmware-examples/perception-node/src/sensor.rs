//! Driver for a Panasonic AMG8833 ("Grid-EYE") 8x8 thermal array on I2C, written against the
//! embedded-hal 1.0 [`I2c`] trait only, so it runs on any HAL: a Linux board through
//! linux-embedded-hal (`--features linux`), a microcontroller HAL, or a test mock.
//!
//! Register map (datasheet): `0x00` power control, `0x01` reset, `0x02` frame rate, `0x80..=0xFF`
//! the 64 pixels as little-endian 12-bit two's complement words of 0.25 degC per LSB.

use embedded_hal::i2c::I2c;

/// Pixels per frame (8 x 8).
pub const PIXELS: usize = 64;
/// Default 7-bit I2C address (AD_SELECT high); `0x68` with AD_SELECT low.
pub const DEFAULT_ADDRESS: u8 = 0x69;

/// Registers the driver uses.
pub mod reg {
    /// Power control: `0x00` normal mode.
    pub const PCTL: u8 = 0x00;
    /// Reset: `0x3F` initial reset.
    pub const RST: u8 = 0x01;
    /// Frame rate: `0x00` 10 fps, `0x01` 1 fps.
    pub const FPSC: u8 = 0x02;
    /// First pixel register (pixel 0, low byte).
    pub const PIXEL0: u8 = 0x80;
}

/// Temperature in degC of one pixel word (`lo`, `hi`): 12-bit two's complement, 0.25 degC/LSB.
pub fn decode_pixel(lo: u8, hi: u8) -> f32 {
    let raw = (u16::from(hi & 0x0F) << 8) | u16::from(lo);
    // Sign-extend bit 11.
    let signed = ((raw << 4) as i16) >> 4;
    f32::from(signed) * 0.25
}

/// Pixel word (`lo`, `hi`) of temperature `t` degC, rounded to 0.25 degC and clamped to the
/// 12-bit range (what the sensor would report).
pub fn encode_pixel(t: f32) -> (u8, u8) {
    let raw = (t * 4.0).round().clamp(-2048.0, 2047.0) as i16;
    let word = (raw as u16) & 0x0FFF;
    ((word & 0xFF) as u8, (word >> 8) as u8)
}

/// An AMG8833 on bus `I2C`.
pub struct Amg8833<I2C> {
    i2c: I2C,
    address: u8,
    raw: [u8; 2 * PIXELS],
}

impl<I2C: I2c> Amg8833<I2C> {
    /// A driver for the sensor at 7-bit `address`; talks to the bus only in [`Self::init`] and
    /// [`Self::read_frame`].
    pub fn new(i2c: I2C, address: u8) -> Self {
        Amg8833 { i2c, address, raw: [0; 2 * PIXELS] }
    }

    /// Normal mode, initial reset, 10 frames per second.
    pub fn init(&mut self) -> Result<(), I2C::Error> {
        self.i2c.write(self.address, &[reg::PCTL, 0x00])?;
        self.i2c.write(self.address, &[reg::RST, 0x3F])?;
        self.i2c.write(self.address, &[reg::FPSC, 0x00])
    }

    /// Reads the 64 pixel temperatures (degC, row-major) with one burst read from `0x80`.
    pub fn read_frame(&mut self, out: &mut [f32; PIXELS]) -> Result<(), I2C::Error> {
        self.i2c.write_read(self.address, &[reg::PIXEL0], &mut self.raw)?;
        for (t, w) in out.iter_mut().zip(self.raw.chunks_exact(2)) {
            *t = decode_pixel(w[0], w[1]);
        }
        Ok(())
    }

    /// Gives the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }
}
