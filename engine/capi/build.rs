//! Generates the C header from src/lib.rs with cbindgen (the library, so building needs no
//! cbindgen binary) into OUT_DIR. The committed copy, include/perceiver_edge.h, is what C code
//! includes; tests/capi_header.rs fails when it differs from this one and, with
//! PERCEIVER_EDGE_BLESS=1, rewrites it. A build never writes into the source tree.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=include/perceiver_edge.h");
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("perceiver_edge.h");
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("engine/capi/cbindgen.toml");
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen could not generate the C header from src/lib.rs")
        .write_to_file(&out);
    let committed = Path::new(&dir).join("include/perceiver_edge.h");
    if std::fs::read(&committed).ok() != std::fs::read(&out).ok() {
        println!(
            "cargo:warning=engine/capi/include/perceiver_edge.h is out of date; regenerate it with \
             PERCEIVER_EDGE_BLESS=1 cargo test --release --workspace --test capi_header"
        );
    }
}
