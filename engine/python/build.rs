//! Linker flags for a Python extension module on macOS (`-undefined dynamic_lookup`), so that a
//! plain `cargo build` links the library there too; nothing on Linux.
fn main() {
    pyo3_build_config::add_extension_module_link_args();
}
