//! Fixtures shared by tollgate's integration tests: crafted frames, namespace labs,
//! data-plane pins, a real Cashu mint and an LNURL-pay server on loopback.

pub mod bench;
pub mod chain;
pub mod chromium;
pub mod crash;
pub mod crowd;
pub mod frames;
pub mod gateway;
pub mod hostile;
pub mod lnurl;
pub mod mint;
pub mod netns;
pub mod nftarm;
pub mod pins;
pub mod refpeer;
pub mod web;
pub mod wire;

/// The `tollgate` binary under test: `$TOLLGATE_BIN`, else next to the test executable's
/// `deps/` directory or next to it (where `cargo build -p tollgate-daemon`, run by `cargo xtask test`, puts it).
pub fn tollgate_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // Test executables live in `target/<profile>/deps/`, bins (the demo, benches) one up.
    let dir = exe.parent().expect("exe dir");
    let bin = [dir.join("tollgate"), dir.join("../tollgate")]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| dir.join("../tollgate"));
    assert!(
        bin.exists(),
        "{} is missing: run the suite with `cargo xtask test` (it builds the binary first) \
         or `cargo build -p tollgate-daemon` before `cargo test`",
        bin.display()
    );
    bin
}
