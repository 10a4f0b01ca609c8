//! A simulated AMG8833: an embedded-hal [`I2c`] device that serves frames from memory, so the
//! node runs end to end on a host without a sensor. Each burst read from the pixel registers
//! returns the next frame (cycling), encoded exactly as the sensor encodes temperatures.

use crate::sensor::{encode_pixel, reg, PIXELS};
use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, Operation, SevenBitAddress};

/// Simulated sensor at one address, serving `frames` (degC, row-major) in order, cycling.
pub struct SimulatedAmg8833 {
    address: u8,
    frames: Vec<[f32; PIXELS]>,
    next: usize,
    registers: [u8; 256],
    pointer: u8,
}

impl SimulatedAmg8833 {
    /// A sensor at `address` that will serve `frames` (at least one).
    pub fn new(address: u8, frames: Vec<[f32; PIXELS]>) -> Self {
        assert!(!frames.is_empty(), "the simulated sensor needs at least one frame");
        SimulatedAmg8833 { address, frames, next: 0, registers: [0; 256], pointer: 0 }
    }

    /// Number of frames served so far.
    pub fn served(&self) -> usize {
        self.next
    }

    fn latch_next_frame(&mut self) {
        let f = &self.frames[self.next % self.frames.len()];
        for (i, t) in f.iter().enumerate() {
            let (lo, hi) = encode_pixel(*t);
            self.registers[reg::PIXEL0 as usize + 2 * i] = lo;
            self.registers[reg::PIXEL0 as usize + 2 * i + 1] = hi;
        }
        self.next += 1;
    }
}

impl ErrorType for SimulatedAmg8833 {
    type Error = ErrorKind;
}

impl I2c<SevenBitAddress> for SimulatedAmg8833 {
    fn transaction(&mut self, address: u8, operations: &mut [Operation<'_>]) -> Result<(), Self::Error> {
        if address != self.address {
            return Err(ErrorKind::NoAcknowledge(embedded_hal::i2c::NoAcknowledgeSource::Address));
        }
        for op in operations {
            match op {
                Operation::Write(bytes) => {
                    let Some((&first, rest)) = bytes.split_first() else { continue };
                    self.pointer = first;
                    if first == reg::PIXEL0 && rest.is_empty() {
                        self.latch_next_frame();
                    }
                    for (k, b) in rest.iter().enumerate() {
                        self.registers[(first as usize + k) & 0xFF] = *b;
                    }
                }
                Operation::Read(buf) => {
                    for b in buf.iter_mut() {
                        *b = self.registers[self.pointer as usize];
                        self.pointer = self.pointer.wrapping_add(1);
                    }
                }
            }
        }
        Ok(())
    }
}
