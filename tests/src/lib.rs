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
pub mod testrun;
pub mod web;
pub mod wire;

/// Raises this process's open-file limit to its hard limit, which must be at least `need`
/// (tests and benches that hold thousands of client sockets).
pub fn raise_nofile(need: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        assert!(
            r.rlim_max >= need,
            "this needs {need} open files; the hard limit is {}",
            r.rlim_max
        );
        r.rlim_cur = r.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
}

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
