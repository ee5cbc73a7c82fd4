//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is looked up at `$TOLLGATE_EBPF_OBJECT`, else at
//! `<target dir>/ebpf/bpfel-unknown-none/release/tollgate`, and copied into `OUT_DIR` so the
//! valve can `include_bytes_aligned!` it.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=TOLLGATE_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let object = match env::var_os("TOLLGATE_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
            let target = env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.parent().unwrap().join("target"));
            target.join("ebpf/bpfel-unknown-none/release/tollgate")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "\n\nthe eBPF object {} does not exist.\n\
             Build it first with:\n\n    cargo xtask build-ebpf\n\n\
             (or point TOLLGATE_EBPF_OBJECT at a built object)\n",
            object.display()
        );
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("tollgate.bpf.o");
    fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
}
