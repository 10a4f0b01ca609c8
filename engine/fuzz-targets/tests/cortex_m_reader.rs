//! Regression tests of the cortex-m firmware's pack reader (firmware-examples/cortex-m/src/
//! reader.rs, run on the host through `perceiver_edge_fuzz_targets::cortex_m`).

use perceiver_edge_fuzz_targets::cortex_m::read_model;
use perceiver_edge_pack_format::{dim, Header, Kind, ENTRY_BYTES, TABLE_OFFSET};

fn seed(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/pack_reader").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn set_dim(pack: &mut [u8], i: usize, v: u32) {
    let at = perceiver_edge_pack_format::DIMS_OFFSET + 4 * i;
    pack[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn exported_packs_are_read() {
    for name in ["tiny_image_fourier_f32.pack", "tiny_image_fourier_int8.pack"] {
        assert_eq!(read_model(&seed(name)), Ok(()), "{name}");
    }
}

/// Regression: the header parser accepts an int8 matrix whose scale count divides its
/// elements, so one scale for a [rows, cols] matrix passed, and the firmware's int8 matmul
/// then indexed `scale[o]` past the end (a panic on the board).
#[test]
fn int8_scale_count_must_match_rows() {
    let mut pack = seed("tiny_image_fourier_int8.pack");
    let h = Header::parse(&pack).unwrap();
    let (k, e) = h.entries().enumerate().find(|(_, e)| e.kind == Kind::Int8 && e.scale_count() > 1).unwrap();
    let one_scale = e.offset - 4;
    let at = TABLE_OFFSET + ENTRY_BYTES * k + 12;
    pack[at..at + 4].copy_from_slice(&one_scale.to_le_bytes());
    let h = Header::parse(&pack).expect("the header alone accepts one scale");
    assert_eq!(h.entry(k).unwrap().scale_count(), 1);
    assert_eq!(read_model(&pack), Err("bad pack: int8 pack tensor has a scale count other than its rows".into()));
}

/// Regression: heads 0 divided by zero in the forward pass; heads not dividing the
/// attention width, M other than H * W, C below IN_CH and residual flags other than 0 / 1
/// were not checked either.
#[test]
fn dims_are_checked() {
    let cases = [
        (dim::X_HEADS, 0, "attention heads"),
        (dim::S_HEADS, 0, "attention heads"),
        (dim::O_HEADS, 3, "attention heads"),
        (dim::M, 5, "M is not H * W"),
        (dim::IN_CH, 1000, "C is smaller than IN_CH"),
        (dim::X_RESIDUAL, 2, "residual flags"),
    ];
    for (i, v, msg) in cases {
        let mut pack = seed("tiny_image_fourier_f32.pack");
        set_dim(&mut pack, i, v);
        let err = read_model(&pack).unwrap_err();
        assert!(err.contains(msg), "dim {i} = {v}: {err}");
    }
}

#[test]
fn wrong_sizes_and_counts_are_errors() {
    let mut pack = seed("tiny_image_fourier_f32.pack");
    set_dim(&mut pack, dim::LABELS, 4);
    assert_eq!(read_model(&pack), Err("bad pack: pack tensor has an unexpected size".into()));
    let mut pack = seed("tiny_image_fourier_f32.pack");
    set_dim(&mut pack, dim::S_LAYERS, 0);
    assert!(read_model(&pack).is_err());
}
