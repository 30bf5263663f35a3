//! Embeds the kernel object built by `cargo xtask build-ebpf`, when it exists.
//!
//! There is deliberately no fallback object: an agent built without the real one
//! compiles, but refuses to start and says how to build it.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(weft_ebpf_object)");
    println!("cargo::rerun-if-env-changed=WEFT_EBPF_OBJECT");
    let object = match std::env::var_os("WEFT_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
            manifest.join("../target/ebpf/bpfel-unknown-none/release/weft-ebpf")
        }
    };
    // Watching the file (or, while it does not exist, its directory) rebuilds the
    // agent whenever `cargo xtask build-ebpf` produces a new object.
    println!("cargo::rerun-if-changed={}", object.display());
    if object.is_file() {
        let object = object.canonicalize().unwrap();
        println!("cargo::rustc-cfg=weft_ebpf_object");
        println!(
            "cargo::rustc-env=WEFT_EBPF_OBJECT_PATH={}",
            object.display()
        );
    }
}
