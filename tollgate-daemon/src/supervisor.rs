//! Named, supervised background tasks. A task that ends or panics before shutdown is logged,
//! counted and restarted with a doubling back-off; a critical task that cannot run (it keeps
//! failing, or it cannot be restarted at all) makes [`Supervisor::fatal`] resolve, and the
//! daemon exits non-zero so systemd/procd restarts the whole process.
//!
//! ```text
//! spawn(name, policy, make) ─> run make() in its own tokio task ─ends/panics─> log, restarts+1
//!      ▲                                                                      │
//!      └──── sleep min(base × 2^n, max) ◄── n < max_failures (or not critical) ┘
//!                                            else critical ─> fatal(name, why)
//! spawn_once(name, fut)   one-shot (servers, the event reader own their socket / channel):
//!                         ending before shutdown is fatal.
//! ```
//! A run longer than [`Policy::healthy_after`] resets the failure count, so a task that
//! crashes once a day is restarted forever. [`Supervisor::status`] feeds `tollgate status`
//! and `/metrics`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How one task is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A failure of a critical task the supervisor gives up on stops the daemon.
    pub critical: bool,
    /// Consecutive failures after which we give up (critical) or keep trying at `max`.
    pub max_failures: u32,
    pub base: Duration,
    pub max: Duration,
    /// A run this long counts as healthy: the failure count starts again.
    pub healthy_after: Duration,
}

impl Policy {
    /// Restart with back-off 1 s … 60 s; stop the daemon after 5 quick failures in a row.
    pub fn critical() -> Policy {
        Policy {
            critical: true,
            max_failures: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            healthy_after: Duration::from_secs(60),
        }
    }

    /// Restart forever with back-off 1 s … 60 s.
    pub fn best_effort() -> Policy {
        Policy {
            critical: false,
            ..Policy::critical()
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(16);
        self.base.saturating_mul(1u32 << shift).min(self.max)
    }
}

/// One task as `tollgate status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskStatus {
    pub name: String,
    pub critical: bool,
    /// `running`, `restarting`, `stopped` (shutdown) or `failed` (given up).
    pub state: String,
    /// Restarts since the daemon started.
    pub restarts: u32,
    /// Why it last ended (`panicked: …`, `ended`, or its error).
    pub last_exit: Option<String>,
}

/// The supervisor: create one per daemon with the shutdown token.
pub struct Supervisor {
    shutdown: CancellationToken,
    tasks: Mutex<BTreeMap<String, TaskStatus>>,
    /// Each task's wrapper, in spawn order (joined in reverse).
    handles: Mutex<Vec<(String, JoinHandle<()>)>>,
    /// Cancelled when a critical task cannot run; `fatal_reason` says which and why.
    fatal: CancellationToken,
    fatal_reason: Mutex<Option<String>>,
}

impl Supervisor {
    pub fn new(shutdown: CancellationToken) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            shutdown,
            tasks: Mutex::new(BTreeMap::new()),
            handles: Mutex::new(Vec::new()),
            fatal: CancellationToken::new(),
            fatal_reason: Mutex::new(None),
        })
    }

    fn set(&self, name: &str, f: impl FnOnce(&mut TaskStatus)) {
        let mut t = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = t.get_mut(name) {
            f(s);
        }
    }

    fn give_up(&self, name: &str, why: String) {
        tracing::error!(task = name, reason = %why, "critical task cannot run; stopping the daemon");
        self.set(name, |s| s.state = "failed".into());
        let mut r = self.fatal_reason.lock().unwrap_or_else(|p| p.into_inner());
        r.get_or_insert(format!("task {name}: {why}"));
        self.fatal.cancel();
    }

    fn register(&self, name: &str, critical: bool) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).insert(
            name.to_string(),
            TaskStatus {
                name: name.to_string(),
                critical,
                state: "running".into(),
                restarts: 0,
                last_exit: None,
            },
        );
    }

    /// Runs `make()` as task `name`, restarting it by `policy` until shutdown. `make` returns
    /// `Err` for a failure worth logging; `Ok` before shutdown is an unexpected end.
    pub fn spawn<F, Fut>(self: &Arc<Self>, name: &str, policy: Policy, make: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.register(name, policy.critical);
        let me = self.clone();
        let name = name.to_string();
        let name_of_task = name.clone();
        let h = tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let started = Instant::now();
                me.set(&name, |s| s.state = "running".into());
                let outcome = tokio::spawn(make()).await;
                if me.shutdown.is_cancelled() {
                    me.set(&name, |s| s.state = "stopped".into());
                    return;
                }
                let why = exit_reason(outcome);
                if started.elapsed() >= policy.healthy_after {
                    failures = 0;
                }
                failures = failures.saturating_add(1);
                if policy.critical && failures > policy.max_failures {
                    me.set(&name, |s| s.last_exit = Some(why.clone()));
                    me.give_up(&name, format!("{why} ({failures} failures in a row)"));
                    return;
                }
                let wait = policy.backoff(failures);
                tracing::error!(task = %name, reason = %why, failures, restart_in = ?wait, "background task ended; restarting");
                me.set(&name, |s| {
                    s.state = "restarting".into();
                    s.restarts += 1;
                    s.last_exit = Some(why);
                });
                tokio::select! {
                    _ = me.shutdown.cancelled() => {
                        me.set(&name, |s| s.state = "stopped".into());
                        return;
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name_of_task, h));
    }

    /// A task that owns something it cannot get back (a listening socket, the kernel event
    /// channel): it is critical and ending before shutdown stops the daemon.
    pub fn spawn_once<Fut>(self: &Arc<Self>, name: &str, fut: Fut)
    where
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.register(name, true);
        let me = self.clone();
        let name = name.to_string();
        let name_of_task = name.clone();
        let h = tokio::spawn(async move {
            let outcome = tokio::spawn(fut).await;
            if me.shutdown.is_cancelled() {
                // A server that failed while stopping still says so.
                if !matches!(outcome, Ok(Ok(()))) {
                    tracing::warn!(task = %name, reason = %exit_reason(outcome), "task ended with an error during shutdown");
                }
                me.set(&name, |s| s.state = "stopped".into());
                return;
            }
            let why = exit_reason(outcome);
            me.set(&name, |s| s.last_exit = Some(why.clone()));
            me.give_up(&name, why);
        });
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name_of_task, h));
    }

    /// Every task, by name.
    pub fn status(&self) -> Vec<TaskStatus> {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Resolves (with the reason) when a critical task cannot run.
    pub async fn fatal(&self) -> String {
        self.fatal.cancelled().await;
        self.fatal_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// Waits for every task to finish (after the shutdown token was cancelled), the last
    /// started first (it may use what earlier ones serve). The tasks' own outcomes are logged
    /// by their wrappers; a wrapper that itself panicked is logged here.
    pub async fn join(&self) {
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|p| p.into_inner()));
        for (name, h) in handles.into_iter().rev() {
            match h.await {
                Ok(()) => tracing::debug!(task = %name, "task stopped"),
                Err(e) => tracing::error!(task = %name, error = %e, "task supervisor failed"),
            }
        }
    }
}

fn exit_reason(outcome: Result<Result<(), String>, tokio::task::JoinError>) -> String {
    match outcome {
        Ok(Ok(())) => "ended".into(),
        Ok(Err(e)) => e,
        Err(j) if j.is_panic() => {
            let p = j.into_panic();
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "?".into());
            format!("panicked: {msg}")
        }
        Err(j) => format!("cancelled: {j}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(critical: bool, max_failures: u32) -> Policy {
        Policy {
            critical,
            max_failures,
            base: Duration::from_millis(5),
            max: Duration::from_millis(20),
            healthy_after: Duration::from_secs(60),
        }
    }

    async fn until(mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }

    /// The buyer's old fate: a panic ended the task silently. Now it runs again.
    #[tokio::test]
    async fn a_panicking_task_is_restarted_and_shown() {
        let stop = CancellationToken::new();
        let sup = Supervisor::new(stop.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let s = stop.clone();
        sup.spawn("upstream", quick(true, 5), move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            async move {
                if n < 2 {
                    panic!("chunk size overflow");
                }
                s.cancelled().await;
                Ok(())
            }
        });
        until(|| runs.load(Ordering::SeqCst) == 3).await;
        let t = &sup.status()[0];
        assert_eq!((t.name.as_str(), t.restarts), ("upstream", 2));
        assert_eq!(
            t.last_exit.as_deref(),
            Some("panicked: chunk size overflow")
        );
        until(|| sup.status()[0].state == "running").await;
        stop.cancel();
        sup.join().await;
        assert_eq!(sup.status()[0].state, "stopped");
        assert!(!sup.fatal.is_cancelled());
    }

    #[tokio::test]
    async fn a_critical_task_that_keeps_failing_is_fatal() {
        let sup = Supervisor::new(CancellationToken::new());
        sup.spawn("chandler", quick(true, 2), || async {
            Err("database gone".to_string())
        });
        let why = tokio::time::timeout(Duration::from_secs(5), sup.fatal())
            .await
            .expect("fatal");
        assert!(
            why.contains("chandler") && why.contains("database gone"),
            "{why}"
        );
        assert_eq!(sup.status()[0].state, "failed");
        assert_eq!(sup.status()[0].restarts, 2);
    }

    #[tokio::test]
    async fn a_best_effort_task_is_never_fatal_and_a_one_shot_is() {
        let stop = CancellationToken::new();
        let sup = Supervisor::new(stop.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.spawn("payouts", quick(false, 1), move || {
            r.fetch_add(1, Ordering::SeqCst);
            async { Err("mint down".to_string()) }
        });
        until(|| runs.load(Ordering::SeqCst) >= 5).await;
        assert!(!sup.fatal.is_cancelled());
        sup.spawn_once("api", async { Ok(()) });
        let why = tokio::time::timeout(Duration::from_secs(5), sup.fatal())
            .await
            .expect("fatal");
        assert_eq!(why, "task api: ended");
        stop.cancel();
        sup.join().await;
    }
}
