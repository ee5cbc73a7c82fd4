//! Developer tasks: `cargo xtask build-ebpf | test | demo | bench | fuzz`.
//!
//! `build-ebpf` bootstraps everything the kernel side needs (rust-src for the nightly and a
//! bpf-linker built against the nightly's own libLLVM, in `target/tools`) and then builds
//! `tollgate-ebpf` for `bpfel-unknown-none`. Every step is idempotent and says what it does.

mod ebpf;
mod fuzz;
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
    /// Fuzz the parsers of untrusted input with libFuzzer (nightly, ASan), each target for a
    /// bounded time (bootstraps cargo-fuzz on first use). Not run by CI: CI replays the corpus.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// One target (token, payment_body, nostr_event, config, upstream_answer); all if absent.
        target: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf { debug } => ebpf::build(!debug).map(|_| ()),
        Cmd::Test { args } => tasks::test(&args),
        Cmd::Demo => tasks::demo(),
        Cmd::Bench { what, args } => tasks::bench(&what, &args),
        Cmd::Fuzz { seconds, target } => fuzz::fuzz(seconds, target.as_deref()),
    }
}
