//! The daemon's clocks, one function each.
//!
//! - [`boot_ns`]: CLOCK_BOOTTIME, what `bpf_ktime_get_boot_ns()` reads in the kernel, so a
//!   deadline means the same thing on both sides and survives suspend.
//! - [`monotonic_ns`]: CLOCK_MONOTONIC (the slot quarantine, `last_seen`).
//! - [`unix_secs`] / [`unix_ms`]: the wall clock, for event `created_at` and rows an operator
//!   reads; never for a deadline (it is not set before NTP on a router).

fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; both clocks always exist on Linux.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock})");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_BOOTTIME in nanoseconds.
pub fn boot_ns() -> u64 {
    read(libc::CLOCK_BOOTTIME)
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_secs() -> u64 {
    since_epoch().as_secs()
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    since_epoch().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_move_forward_and_agree_on_scale() {
        let (b0, m0, u0) = (boot_ns(), monotonic_ns(), unix_ms());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (b1, m1, u1) = (boot_ns(), monotonic_ns(), unix_ms());
        assert!(b1 - b0 >= 20_000_000 && m1 - m0 >= 20_000_000);
        assert!(u1 >= u0 && u0 > 1_600_000_000_000, "wall clock {u0}");
        let (s, ms) = (unix_secs(), unix_ms());
        assert!(ms / 1000 >= s && ms / 1000 - s <= 1, "{s} s vs {ms} ms");
    }
}
