// Empty: a build script makes cargo resolve this crate's [build-dependencies] (host features).
fn main() {}
