//! The cortex-m firmware's weight-pack reader on the host. The checks are the firmware's own
//! (`firmware-examples/cortex-m/src/reader.rs`, included here); the tensor order and sizes
//! mirror `Model::load` in `firmware-examples/cortex-m/src/forward.rs`, with the header dims
//! taken at run time instead of as compile-time constants.

#[allow(dead_code, missing_docs)]
#[path = "../../../firmware-examples/cortex-m/src/reader.rs"]
pub mod reader;

use perceiver_edge_pack_format::{dim, Header, Kind};

/// Reads tensors in order, as the firmware's `pack::Reader` does, but with safe slices.
struct HostReader<'a> {
    pack: &'a [u8],
    header: Header<'a>,
    next: usize,
}

impl<'a> HostReader<'a> {
    /// The next tensor: `len` elements, an int8 matrix with `rows` scales if `rows` is given.
    /// Returns the data and scale byte slices; panics if the firmware's checks passed but a
    /// slice would leave the pack (the firmware would read out of bounds there).
    fn take(&mut self, len: usize, rows: Option<usize>) -> Result<(&'a [u8], &'a [u8]), String> {
        let e = reader::locate(&self.header, self.pack.len(), self.next, len, rows)
            .map_err(|e| format!("bad pack: {e}"))?;
        self.next += 1;
        let in_pack = |at: usize, bytes: usize| -> &'a [u8] {
            assert!(at.is_multiple_of(4), "tensor {}: unaligned offset {at} accepted", self.next - 1);
            let end = at.checked_add(bytes).expect("range end overflows");
            self.pack.get(at..end).unwrap_or_else(|| {
                panic!("tensor {}: bytes {at}..{end} accepted, the pack has {}", self.next - 1, self.pack.len())
            })
        };
        Ok(match e.kind {
            Kind::F32 => (in_pack(e.offset, 4 * e.elements), &[][..]),
            Kind::Int8 => {
                let scales = in_pack(e.scale_offset, 4 * e.scales);
                // forward.rs indexes scale[o] for every output row o.
                assert_eq!(Some(e.scales), rows, "int8 scales do not cover the rows");
                (in_pack(e.offset, e.elements), scales)
            }
        })
    }

    fn vector(&mut self, len: usize) -> Result<(), String> {
        self.take(len, None).map(|_| ())
    }

    /// `Linear<I, O>::read`: weights `[O, I]`, bias `[O]`.
    fn linear(&mut self, i: usize, o: usize) -> Result<(), String> {
        let n = i.checked_mul(o).ok_or("bad pack: linear size overflows")?;
        self.take(n, Some(o))?;
        self.vector(o)
    }

    /// `Norm::read`.
    fn norm(&mut self, k: usize) -> Result<(), String> {
        self.vector(k)?;
        self.vector(k)
    }

    /// `Layer<QD, KD, QK, V, HID>::read`.
    fn layer(&mut self, cross: bool, [qd, kd, qk, v, hid]: [usize; 5]) -> Result<(), String> {
        self.norm(qd)?;
        if cross {
            self.norm(kd)?;
        } else if qd != kd {
            return Err("bad pack: self-attention with different query and key widths".into());
        }
        self.linear(qd, qk)?;
        self.linear(kd, qk)?;
        self.linear(kd, v)?;
        self.linear(v, qd)?;
        self.norm(qd)?;
        self.linear(qd, hid)?;
        self.linear(hid, qd)
    }
}

/// Reads a pack as the firmware's `Model::load` does: header, dims, then every tensor in model
/// order; an error is the firmware's panic message (one line).
pub fn read_model(pack: &[u8]) -> Result<(), String> {
    let header = Header::parse(pack).map_err(|e| format!("bad pack: {e}"))?;
    reader::check_dims(&header.dims).map_err(|e| format!("bad pack: {e}"))?;
    let d = |i: usize| header.dims[i] as usize;
    let mut r = HostReader { pack, header, next: 0 };
    let pos = d(dim::M).checked_mul(d(dim::C) - d(dim::IN_CH)).ok_or("bad pack: position table size overflows")?;
    r.vector(pos)?;
    r.vector(d(dim::N).checked_mul(d(dim::D)).ok_or("bad pack: latents size overflows")?)?;
    r.layer(true, [d(dim::D), d(dim::C), d(dim::X_QK), d(dim::X_V), d(dim::X_HIDDEN)])?;
    for _ in 0..d(dim::S_LAYERS) {
        r.layer(false, [d(dim::D), d(dim::D), d(dim::S_QK), d(dim::S_V), d(dim::S_HIDDEN)])?;
    }
    r.vector(d(dim::E))?;
    r.layer(true, [d(dim::E), d(dim::D), d(dim::O_QK), d(dim::O_V), d(dim::O_HIDDEN)])?;
    r.linear(d(dim::E), d(dim::LABELS))?;
    if r.next != r.header.tensor_count() {
        return Err("pack has extra tensors".into());
    }
    Ok(())
}
