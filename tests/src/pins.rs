//! Unique, self-cleaning pin directories for data-plane tests.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use tollgate::valve::Valve;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// `/sys/fs/bpf/tollgate/test-<pid>-<n>`; removed (with every pin under it) on drop, so
/// two runs never share maps and a failing test leaves nothing behind.
pub struct PinBase(PathBuf);

impl PinBase {
    pub fn new(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/tollgate/test-{tag}-{}-{n}",
            std::process::id()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Unpins everything below the base: the programs detach and the maps go, as after a
    /// reboot (the daemon's store is what remains).
    pub fn wipe(&self) {
        let _ = Valve::remove_pins(&self.0);
        // Whatever else a test pinned below its base (e.g. an older schema's `v1/` links in
        // the upgrade test, left when that test fails) goes too: no later run may find it.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for PinBase {
    fn drop(&mut self) {
        self.wipe();
        // Leave /sys/fs/bpf/tollgate itself when the last test is done with it.
        let _ = std::fs::remove_dir("/sys/fs/bpf/tollgate");
    }
}
