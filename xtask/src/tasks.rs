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

/// The whole thing in a namespace lab: builds everything, then runs the `demo` binary (see
/// `tests/src/bin/demo.rs`), which creates the lab (client, gateway, upstream), a mint and
/// `tollgate run`, plays a customer and prints a summary. It cleans up after itself; if it is
/// interrupted (Ctrl-C) or dies, whatever it left is swept here: its names carry its pid.
pub fn demo() -> Result<()> {
    ebpf::build(true)?;
    // Two builds: `--bin demo` would filter the daemon package's binary out as well.
    println!("[demo] cargo build -p tollgate-daemon");
    status(
        cargo().args(["build", "-p", "tollgate-daemon"]),
        "cargo build",
    )?;
    println!("[demo] cargo build -p tollgate-tests --bin demo");
    status(
        cargo().args(["build", "-p", "tollgate-tests", "--bin", "demo"]),
        "cargo build",
    )?;
    let bin = ebpf::workspace_root().join("target/debug/demo");
    // Ctrl-C goes to the whole foreground group: the demo and its daemon stop; we stay to
    // sweep. A handler (not SIG_IGN, which exec would pass on to the child) keeps us alive.
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: installing a handler that does nothing is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, ignore as *const () as libc::sighandler_t) };
    let mut child = Command::new(&bin)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let st = child.wait().context("waiting for the demo")?;
    let swept = sweep_demo(pid);
    if !swept.is_empty() {
        println!(
            "[demo] swept what the demo left behind: {}",
            swept.join(", ")
        );
    }
    use std::os::unix::process::ExitStatusExt;
    if st.signal() == Some(libc::SIGINT) {
        println!("[demo] interrupted; everything it created is gone");
        std::process::exit(130);
    }
    if !st.success() {
        bail!("the demo did not finish ({st})");
    }
    Ok(())
}

/// Removes namespaces (and the processes in them), pins and temp dirs of demo run `pid`.
fn sweep_demo(pid: u32) -> Vec<String> {
    let mut swept = Vec::new();
    let list = Command::new("ip").args(["netns", "list"]).output();
    let names = list
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for name in names.lines().filter_map(|l| l.split_whitespace().next()) {
        let ours = ["c", "g", "u"]
            .iter()
            .any(|r| name.starts_with(&format!("tgdemo{r}{pid}x")));
        if !ours {
            continue;
        }
        if let Ok(o) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                Command::new("kill").args(["-9", p]).status().ok();
            }
        }
        Command::new("ip")
            .args(["netns", "del", name])
            .status()
            .ok();
        swept.push(format!("netns {name}"));
    }
    let dirs = [
        ("/sys/fs/bpf/tollgate", format!("test-demo-{pid}-")),
        ("/tmp", format!("tollgate-demo-{pid}-")),
    ];
    for (dir, prefix) in dirs {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                std::fs::remove_dir_all(e.path()).ok();
                swept.push(e.path().display().to_string());
            }
        }
    }
    std::fs::remove_dir("/sys/fs/bpf/tollgate").ok();
    swept
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
