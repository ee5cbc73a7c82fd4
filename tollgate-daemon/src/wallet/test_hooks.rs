//! Test-only seams, in one place so production code paths only ever call [`Wallet::hook`]
//! (a no-op unless a test set a hook) and [`Wallet::bypass_reservations`] (false unless a test
//! asked). Not a cargo feature: `WalletSettings` is built by the daemon (`config.rs`) and by
//! the test crate alike, and the crash harness (`tests/src/bin/wallet-harness.rs`) and
//! `wallet_payout.rs` set these fields on the settings they build; a feature gating the
//! fields would have to be enabled by the test crate's dependency on `tollgate`, which works
//! with cargo's feature unification but makes `cargo build -p tollgate-daemon` and
//! `cargo test -p tollgate-tests` build two different `tollgate` libraries.
//!
//! | hook point         | where                                          |
//! |--------------------|------------------------------------------------|
//! | `receive:pending`  | receipt row written, before the swap            |
//! | `receive:swapped`  | swap answered, before the row says `done`       |
//! | `send:prepared`    | cdk send prepared, before the `creating` row    |
//! | `send:confirmed`   | token created, before its value is checked      |
//! | `send:issued`      | token handed to the caller                      |
//! | `melt:recorded`    | payout row `pending`, before the melt           |
//! | `melt:confirmed`   | the mint answered the melt                      |
//! | `rebalance:*`      | see [`rebalance`](super::rebalance)             |

use std::fmt;
use std::sync::Arc;

use super::Wallet;

/// TEST ONLY: a callback the wallet calls with a point name (`receive:pending`,
/// `send:prepared`, `send:confirmed`, `melt:recorded`, …) right before or after a step that
/// moves money. The crash harness uses it to SIGKILL itself at that point; production
/// settings leave it empty, which costs one `Option` check per point.
#[doc(hidden)]
#[derive(Clone, Default)]
pub struct TestHook(Option<Arc<dyn Fn(&'static str) + Send + Sync>>);

impl TestHook {
    /// A hook calling `f` at every point.
    pub fn new(f: impl Fn(&'static str) + Send + Sync + 'static) -> TestHook {
        TestHook(Some(Arc::new(f)))
    }

    fn at(&self, point: &'static str) {
        if let Some(f) = &self.0 {
            f(point);
        }
    }
}

impl fmt::Debug for TestHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "TestHook(set)"
        } else {
            "TestHook(none)"
        })
    }
}

impl Wallet {
    pub(super) fn hook(&self, point: &'static str) {
        self.inner.settings.test_hook.at(point);
    }

    /// TEST ONLY: reservations are no-ops (`WalletSettings::bypass_reservations_for_tests`),
    /// to prove the race test catches the seed's bug.
    pub(super) fn bypass_reservations(&self) -> bool {
        self.inner.settings.bypass_reservations_for_tests
    }
}
