use std::os::fd::AsRawFd;
use std::path::PathBuf;

use super::SysError;

/// Moves the calling thread into the network namespace `/run/netns/<name>` (as `ip netns exec`
/// does, without remounting /sys, so the host's bpffs stays visible). Call it before any other
/// thread exists: threads made later inherit it, earlier ones do not.
pub fn enter_netns(name: &str) -> Result<(), SysError> {
    let path = PathBuf::from("/run/netns").join(name);
    let f = std::fs::File::open(&path).map_err(|source| SysError {
        what: format!("network namespace {}", path.display()),
        source,
    })?;
    // SAFETY: setns with a valid namespace fd that `f` keeps open across the call.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(SysError::last(format!("setns into {}", path.display())));
    }
    Ok(())
}
