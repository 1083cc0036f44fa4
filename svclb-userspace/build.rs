//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! When it has not been built (plain `cargo check` or clippy on a machine
//! without bpf-linker), an empty object is embedded instead and the binaries
//! refuse to load it with a message saying how to build it.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("svclb.bpf.o");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let object = env::var_os("SVCLB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/svclb"));
    println!("cargo:rerun-if-env-changed=SVCLB_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if object.exists() {
        fs::copy(&object, &out).expect("copy the eBPF object");
    } else {
        println!(
            "cargo:warning=eBPF object {} not found: embedding an empty one (run `cargo xtask build`)",
            object.display()
        );
        fs::write(&out, b"").expect("write the empty eBPF object");
    }
}
