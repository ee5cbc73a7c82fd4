//! `cargo xtask fuzz [--seconds N] [target]`: bounded libFuzzer runs of the targets in
//! `fuzz/` (see `fuzz/src/lib.rs`).
//!
//! ```text
//! target/tools/bin/cargo-fuzz present? ──no──> cargo install cargo-fuzz --locked (pinned)
//! eBPF object present (the daemon embeds it) ──no──> cargo xtask build-ebpf
//! cargo +nightly fuzz build -O (ASan, all targets at once: deps are built once)
//! for each target: cargo +nightly fuzz run <t> target/fuzz/corpus/<t> fuzz/corpus/<t>
//!                       -- -max_total_time=N
//! ```
//! New inputs go to the scratch corpus under `target/`, never into the checked-in seeds; a
//! crash lands in `fuzz/artifacts/<t>/` and fails the task. The CI smoke pass is not this: it
//! is the stable replay of `fuzz/corpus/` in `tests/tests/fuzz_corpus.rs`, run by
//! `cargo xtask test` (building this crate with sanitizers costs minutes).

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::ebpf;

/// cargo-fuzz release installed on first use (builds with the preinstalled nightly).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The targets, in the order they run (kept in step with `fuzz/Cargo.toml`'s `[[bin]]`s).
pub const TARGETS: [&str; 5] = [
    "token",
    "payment_body",
    "nostr_event",
    "config",
    "upstream_answer",
];

/// Ensures `tools/bin/cargo-fuzz` (the version above) exists; returns the `bin` directory.
fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let bin = ebpf::tools_dir().join("bin");
    let exe = bin.join("cargo-fuzz");
    let have = Command::new(&exe)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if have.as_deref() == Some(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}")) {
        return Ok(bin);
    }
    println!(
        "[fuzz] installing cargo-fuzz {CARGO_FUZZ_VERSION} into {} (about 2 minutes on 2 cores)",
        ebpf::tools_dir().display()
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
            "--force",
            "--root",
        ])
        .arg(ebpf::tools_dir())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("installing cargo-fuzz failed (see the output above)");
    }
    Ok(bin)
}

/// `cargo +nightly fuzz <args>` from the workspace root, cargo-fuzz found on PATH.
fn cargo_fuzz(bin: &std::path::Path) -> Command {
    let mut cmd = ebpf::nightly("cargo");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    cmd.env(
        "PATH",
        std::env::join_paths(dirs).expect("PATH entries are valid"),
    )
    .current_dir(ebpf::workspace_root())
    .arg("fuzz");
    cmd
}

/// Common build flags: ASan, optimised, built into `target/fuzz` (one `target/` to clean).
fn build_flags(cmd: &mut Command) -> &mut Command {
    cmd.args(["-O", "--codegen-units", "16", "--target-dir"])
        .arg(ebpf::target_dir().join("fuzz"))
}

pub fn fuzz(seconds: u64, only: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match only {
        None => TARGETS.to_vec(),
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("unknown fuzz target {t:?} (one of {})", TARGETS.join(", ")),
    };
    let bin = ensure_cargo_fuzz()?;
    if !ebpf::object_path(true).exists() {
        ebpf::build(true)?;
    }
    println!("[fuzz] cargo +nightly fuzz build (address sanitizer, all targets)");
    let st = build_flags(cargo_fuzz(&bin).arg("build"))
        .status()
        .context("running cargo fuzz build")?;
    if !st.success() {
        bail!("cargo fuzz build failed (see the output above)");
    }
    let root = ebpf::workspace_root();
    let mut failed = Vec::new();
    for t in targets {
        let scratch = ebpf::target_dir().join("fuzz/corpus").join(t);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        println!("[fuzz] {t}: {seconds} s");
        let st = build_flags(cargo_fuzz(&bin).args(["run", t]))
            .arg(&scratch)
            .arg(root.join("fuzz/corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // A single input over 10 s is a hang; over 2 GiB RSS a leak or a bomb.
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
            .status()
            .with_context(|| format!("running cargo fuzz run {t}"))?;
        if !st.success() {
            failed.push(t);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs in fuzz/artifacts/<target>/; reproduce with \
             `cargo +nightly fuzz run <target> <file>`)",
            failed.join(", ")
        );
    }
    Ok(())
}
