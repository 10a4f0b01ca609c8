//! include/perceiver_edge.h (committed, what C code includes) is exactly what cbindgen makes of
//! src/lib.rs now (build.rs writes that to OUT_DIR), and it compiles as C and as C++.
//! Regenerate it with `PERCEIVER_EDGE_BLESS=1 cargo test --release --workspace --test capi_header`.

use std::path::Path;
use std::process::Command;

fn committed() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include/perceiver_edge.h")
}

#[test]
fn committed_header_is_up_to_date() {
    let generated = std::fs::read_to_string(concat!(env!("OUT_DIR"), "/perceiver_edge.h")).unwrap();
    if std::env::var_os("PERCEIVER_EDGE_BLESS").is_some() {
        std::fs::write(committed(), &generated).unwrap();
        eprintln!("wrote {}", committed().display());
        return;
    }
    let on_disk = std::fs::read_to_string(committed()).unwrap_or_default();
    assert!(
        on_disk == generated,
        "engine/capi/include/perceiver_edge.h is out of date with src/lib.rs; regenerate it with \
         PERCEIVER_EDGE_BLESS=1 cargo test --release --workspace --test capi_header, and commit it"
    );
    // Every exported function is declared.
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let exported: Vec<&str> = src
        .lines()
        .filter_map(|l| l.split("extern \"C\" fn ").nth(1))
        .map(|rest| rest.split('(').next().unwrap())
        .collect();
    assert!(exported.len() >= 20, "found {} exported functions", exported.len());
    for f in exported {
        assert!(generated.contains(&format!("{f}(")), "{f} is not declared in the header");
    }
}

/// The header compiles, warning-free and pedantic, as C99 and as C++11, where a compiler exists.
#[test]
fn header_compiles_as_c_and_cpp() {
    let include = committed().parent().unwrap().to_path_buf();
    for (compiler, lang, std) in [("cc", "c", "-std=c99"), ("c++", "c++", "-std=c++11")] {
        if Command::new(compiler).arg("--version").output().is_err() {
            eprintln!("{compiler} not found: skipped");
            continue;
        }
        let out = Command::new(compiler)
            .args(["-x", lang, std, "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only", "-I"])
            .arg(&include)
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(b"#include \"perceiver_edge.h\"\nint main(void) { return PE_OK; }\n")?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(out.status.success(), "{compiler} rejects the header: {}", String::from_utf8_lossy(&out.stderr));
    }
}
