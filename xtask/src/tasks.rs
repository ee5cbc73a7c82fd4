//! `test`, `demo` and `bench`: thin drivers over cargo that build the eBPF object first.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::ebpf;

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(ebpf::workspace_root());
    cmd
}

fn status(cmd: &mut Command, what: &str) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

/// The whole suite: eBPF build, then every workspace test (unit, PROG_TEST_RUN, namespaces, e2e).
pub fn test(extra: &[String]) -> Result<()> {
    ebpf::build(true)?;
    // Integration tests drive the real binary (a killed and restarted daemon, several
    // gateways side by side), so build it first: cargo does not build other packages' bins.
    println!("[test] cargo build -p tollgate-daemon");
    status(
        cargo().args(["build", "-p", "tollgate-daemon"]),
        "cargo build",
    )?;
    println!("[test] cargo test (all default members; the eBPF crate is built above)");
    status(cargo().args(["test", "--"]).args(extra), "cargo test")
}

/// The whole thing in a namespace lab: the end-to-end scenario, narrated. It creates the
/// lab (client, gateway, upstream), a mint, `tollgate run`, plays a customer (advertisement,
/// payment, metered traffic, a daemon restart, the quota closing the gate, a top-up) and
/// removes everything it made, also when interrupted.
pub fn demo(_keep: bool) -> Result<()> {
    ebpf::build(true)?;
    println!("[demo] cargo build -p tollgate-daemon");
    status(
        cargo().args(["build", "-p", "tollgate-daemon"]),
        "cargo build",
    )?;
    println!("[demo] playing a customer against a gateway in a namespace lab");
    status(
        cargo().args([
            "test",
            "-q",
            "-p",
            "tollgate-tests",
            "--test",
            "e2e",
            "--",
            "--nocapture",
        ]),
        "the demo",
    )
}

/// `cargo xtask bench dataplane|api|wallet`: a release build of the bench binary (and, for
/// `api`, of the daemon it drives), run as root; each writes its own BENCHMARKS.md section.
pub fn bench(what: &str, args: &[String]) -> Result<()> {
    ebpf::build(true)?;
    let bin = match what {
        "dataplane" => "bench-dataplane",
        "api" => "bench-api",
        "wallet" => "bench-wallet",
        other => bail!("unknown benchmark {other:?} (dataplane, api, wallet)"),
    };
    let root = ebpf::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    if what == "api" {
        // The bench drives the real binary: measure the optimised one.
        println!("[bench] cargo build --release -p tollgate-daemon");
        status(
            cargo().args(["build", "--release", "-p", "tollgate-daemon"]),
            "cargo build --release",
        )?;
    }
    println!("[bench] {bin} (writes BENCHMARKS.md)");
    status(
        cargo()
            .args([
                "run",
                "--release",
                "-p",
                "tollgate-tests",
                "--bin",
                bin,
                "--",
            ])
            .args(args)
            .env("TOLLGATE_BIN", target.join("release").join("tollgate"))
            .env("TOLLGATE_BENCHMARKS_MD", root.join("BENCHMARKS.md")),
        bin,
    )
}
