//! Every call into libc the daemon makes, behind a small safe API (the valve's BPF calls go
//! through aya instead). Each `unsafe` block here carries its SAFETY note; callers see plain
//! `io::Result`s.
//!
//! | module      | what                                                        | used by          |
//! |-------------|-------------------------------------------------------------|------------------|
//! | `clock`     | CLOCK_BOOTTIME / CLOCK_MONOTONIC / wall-clock readings      | everywhere       |
//! | `netns`     | `setns(2)` into `/run/netns/<name>`                         | `main`           |
//! | `ifaddr`    | `getifaddrs(3)`: an interface's addresses                   | `daemon`         |
//! | `socket`    | `SO_MARK` read, `SO_BINDTODEVICE`                            | `http`           |
//! | `netlink`   | a raw `NETLINK_ROUTE` socket, `if_nametoindex(3)`           | `upstream/route` |
//! | `fs`        | `statfs(2)` magic and `mount(2)` of bpffs                    | `valve`          |

pub mod clock;
mod fs;
mod ifaddr;
pub mod netlink;
mod netns;
mod socket;

pub use fs::{fs_magic, mount};
pub use ifaddr::iface_addrs;
pub use netns::enter_netns;
pub use socket::{bind_to_device, socket_mark};

/// A system call that failed, with what we were doing.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct SysError {
    pub what: String,
    #[source]
    pub source: std::io::Error,
}

impl SysError {
    /// The last OS error, described by `what`.
    fn last(what: impl Into<String>) -> SysError {
        SysError {
            what: what.into(),
            source: std::io::Error::last_os_error(),
        }
    }
}

/// A C string of `s`, or an `InvalidInput` error naming `what` when it holds a NUL.
fn cstring(what: &str, s: &str) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(s).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what} contains NUL"),
        )
    })
}
