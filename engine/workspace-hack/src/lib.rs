//! No code: this crate only pins the features of shared third-party crates to their union over
//! the workspace (see its Cargo.toml), so single-package builds reuse the workspace's tract build.
#![no_std]
