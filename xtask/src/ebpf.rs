//! `cargo xtask build-ebpf`: bootstrap the eBPF toolchain and build the kernel object.
//!
//! ```text
//! nightly has rust-src? ──no──> rustup component add rust-src --toolchain nightly
//! target/tools/bin/bpf-linker built against this nightly's libLLVM? ──no──> cargo install bpf-linker
//! cargo +nightly build -p tollgate-ebpf --target bpfel-unknown-none -Z build-std=core
//! ```
//! bpf-linker has to read the nightly's LLVM bitcode, and Debian ships no matching LLVM, so it is
//! linked against the `libLLVM.so` inside the nightly sysroot (see `toolchain.md`).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// bpf-linker release known to build against LLVM 22 (`--features llvm-22`).
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Where the built object lands (the daemon's build script looks in the same place).
pub fn object_path(release: bool) -> PathBuf {
    target_dir()
        .join("ebpf/bpfel-unknown-none")
        .join(if release { "release" } else { "debug" })
        .join("tollgate")
}

pub fn tools_dir() -> PathBuf {
    env::var_os("TOLLGATE_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("tools"))
}

/// A `Command` for the nightly toolchain with the outer (stable) cargo's environment removed,
/// so the inner cargo does not inherit `RUSTC`/`RUSTUP_TOOLCHAIN` pointing at stable.
pub fn nightly(program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", program]);
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTDOC",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {what}: {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_rust_src() -> Result<()> {
    let installed = run(
        Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]),
        "rustup component list",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("[build-ebpf] installing rust-src for the nightly toolchain (needed by -Z build-std)");
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status()?;
    if !status.success() {
        bail!("`rustup component add rust-src --toolchain nightly` failed");
    }
    Ok(())
}

/// The nightly's own `libLLVM.so.<ver>` file, found by name in its sysroot.
fn nightly_libllvm() -> Result<PathBuf> {
    let sysroot = run(
        nightly("rustc").args(["--print", "sysroot"]),
        "rustc --print sysroot",
    )?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let mut found = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .collect::<Vec<_>>();
    found.sort();
    found.pop().with_context(|| {
        format!(
            "no libLLVM.so.* in {}: the nightly toolchain is incomplete",
            lib.display()
        )
    })
}

/// Ensures `tools/bin/bpf-linker` exists and was built against the current nightly's LLVM.
pub fn ensure_bpf_linker() -> Result<PathBuf> {
    let tools = tools_dir();
    let linker = tools.join("bin/bpf-linker");
    let libllvm = nightly_libllvm()?;
    let llvm_name = libllvm.file_name().unwrap().to_string_lossy().into_owned();
    let stamp = tools.join("bpf-linker.llvm");
    let stamp_ok = fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == llvm_name);
    if linker.exists() && stamp_ok {
        return Ok(linker);
    }
    println!(
        "[build-ebpf] building bpf-linker {BPF_LINKER_VERSION} against the nightly's {llvm_name} \
         into {} (about a minute on 2 cores)",
        tools.display()
    );
    let prefix = tools.join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    // bpf-linker's build looks for `libLLVM.so` under LLVM_PREFIX; the soname link is what the
    // rpath resolves at run time.
    for name in ["libLLVM.so", llvm_name.as_str()] {
        let link = prefix_lib.join(name);
        fs::remove_file(&link).ok();
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
            "--force",
            "--root",
        ])
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("building bpf-linker failed (see the output above)");
    }
    fs::write(&stamp, &llvm_name)?;
    Ok(linker)
}

/// Builds the eBPF object and returns its path.
pub fn build(release: bool) -> Result<PathBuf> {
    ensure_rust_src()?;
    let linker = ensure_bpf_linker()?;
    println!("[build-ebpf] building tollgate-ebpf for bpfel-unknown-none");
    let mut cmd = nightly("cargo");
    cmd.current_dir(workspace_root())
        .args([
            "build",
            "-p",
            "tollgate-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(target_dir().join("ebpf"))
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        // v3: atomic fetch-and-add/exchange (exact quotas, exactly one event per exhaustion).
        // --btf: emit BTF so maps are BTF-defined and bpftool prints named fields.
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C target-cpu=v3 -C debuginfo=2 -C link-arg=--btf",
        );
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo +nightly build")?;
    if !status.success() {
        bail!("building tollgate-ebpf failed (see the output above)");
    }
    let obj = object_path(release);
    if !obj.exists() {
        bail!("build succeeded but {} is missing", obj.display());
    }
    println!("[build-ebpf] {}", obj.display());
    Ok(obj)
}
