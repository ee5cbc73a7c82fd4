//! Developer tasks: `cargo xtask build-ebpf | test | demo | bench`.
//!
//! `build-ebpf` bootstraps everything the kernel side needs (rust-src for the nightly and a
//! bpf-linker built against the nightly's own libLLVM, in `target/tools`) and then builds
//! `tollgate-ebpf` for `bpfel-unknown-none`. Every step is idempotent and says what it does.

mod ebpf;
mod tasks;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "tollgate developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object (bootstraps rust-src and bpf-linker on first use).
    BuildEbpf {
        /// Build the eBPF crate in debug mode (release is the default and what the daemon embeds).
        #[arg(long)]
        debug: bool,
    },
    /// Run the whole test suite (unit, BPF_PROG_TEST_RUN, namespaces, end to end).
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build everything and play a customer against a gateway in a namespace lab.
    Demo,
    /// Benchmarks: `dataplane`, `api`, `wallet`.
    Bench {
        #[arg(default_value = "dataplane")]
        what: String,
        /// Extra arguments for the benchmark binary.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf { debug } => ebpf::build(!debug).map(|_| ()),
        Cmd::Test { args } => tasks::test(&args),
        Cmd::Demo => tasks::demo(),
        Cmd::Bench { what, args } => tasks::bench(&what, &args),
    }
}
