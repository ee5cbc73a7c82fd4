//! Headless Chromium inside a namespace, driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: commands on fd 3, answers on fd 4, NUL-separated JSON), so no
//! port is opened and no websocket library is needed.
//!
//! ```text
//!  Chromium::launch(&ns) ── fork: setns(ns), own process group, pipes on fds 3/4, exec
//!  let tab = chrome.open(url)          Target.createTarget + attachToTarget (flat session)
//!  chrome.eval(&tab, "js") / wait_for(&tab, "js predicate", what)
//!  chrome.insert_text(&tab, s) / click(&tab, "#css")   real input events
//!  drop ── SIGKILL the process group and any stray process using our profile; profile removed
//! ```
//! A missing browser is a test failure that says how to install it, never a silent pass.

use std::{
    fs::File,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::netns::Netns;

/// How long one DevTools command may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The Chromium executable: `$CHROMIUM`, Debian's real binary, or `chromium` on PATH.
pub fn chromium_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return p.into();
    }
    // Debian's /usr/bin/chromium is a shell wrapper around this binary.
    let debian = PathBuf::from("/usr/lib/chromium/chromium");
    if debian.exists() {
        return debian;
    }
    for name in ["chromium", "chromium-browser"] {
        if let Some(p) = std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
        {
            return p;
        }
    }
    panic!(
        "Chromium is not installed: this test drives a real browser. Install it with \
         `apt-get install -y chromium` (.ci/run does) or point $CHROMIUM at a binary."
    );
}

/// An attached tab (a flat DevTools session).
pub struct Tab {
    session: String,
}

pub struct Chromium {
    child: Child,
    to_browser: File,
    from_browser: Receiver<Value>,
    next_id: u64,
    profile: tempfile::TempDir,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a 2-element array for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Chromium {
    /// Starts headless Chromium with its network in `ns` and a fresh profile.
    pub fn launch(ns: &Netns) -> Chromium {
        let bin = chromium_bin();
        let profile = tempfile::Builder::new()
            .prefix("tollgate-chromium-")
            .tempdir()
            .expect("profile dir");
        let netns = File::open(format!("/run/netns/{}", ns.name)).expect("namespace");
        let (cmd_r, cmd_w) = pipe(); // we write commands, the browser reads fd 3
        let (ans_r, ans_w) = pipe(); // the browser writes fd 4, we read
        let log = File::create(profile.path().join("chromium.log")).expect("log");
        let (ns_fd, r3, w4) = (netns.as_raw_fd(), cmd_r.as_raw_fd(), ans_w.as_raw_fd());
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--remote-debugging-pipe",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--no-proxy-server",
            "--mute-audio",
            "--password-store=basic",
            "--use-mock-keychain",
            // Plain http:// must stay plain: the portal is an http-only story.
            "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable,\
             HttpsFirstModeV2ForTypicallySecureUsers,Translate,MediaRouter,OptimizationHints",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 || libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Move the pipe ends out of the way first: they may already sit on 3 or 4.
                let a = libc::fcntl(r3, libc::F_DUPFD_CLOEXEC, 100);
                let b = libc::fcntl(w4, libc::F_DUPFD_CLOEXEC, 100);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        drop((cmd_r, ans_w, netns));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut reader = File::from(ans_r);
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                while let Some(end) = buf.iter().position(|&b| b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&msg[..end]) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Chromium {
            child,
            to_browser: File::from(cmd_w),
            from_browser: rx,
            next_id: 1,
            profile,
        }
    }

    /// The browser's own output so far (for failure messages).
    pub fn log(&self) -> String {
        let s =
            std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default();
        let tail: Vec<&str> = s.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// One DevTools command; its `result`, or the protocol's error.
    pub fn call(
        &mut self,
        tab: Option<&Tab>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(t) = tab {
            msg["sessionId"] = t.session.clone().into();
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to_browser.write_all(&bytes).map_err(|e| {
            format!(
                "{method}: writing to the browser: {e}; log:\n{}",
                self.log()
            )
        })?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(left) {
                Ok(v) if v["id"] == id => {
                    return match v.get("error") {
                        Some(e) => Err(format!("{method}: {e}")),
                        None => Ok(v["result"].clone()),
                    };
                }
                Ok(_) => {} // events and other sessions' answers
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{method}: no answer in {CALL_TIMEOUT:?}; log:\n{}",
                        self.log()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "{method}: the browser exited; log:\n{}",
                        self.log()
                    ))
                }
            }
        }
    }

    /// Opens `url` in a new tab and attaches to it.
    pub fn open(&mut self, url: &str) -> Tab {
        let t = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .expect("create tab");
        let target = t["targetId"].as_str().expect("targetId").to_string();
        let a = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .expect("attach");
        let tab = Tab {
            session: a["sessionId"].as_str().expect("sessionId").to_string(),
        };
        let nav = self
            .call(Some(&tab), "Page.navigate", json!({"url": url}))
            .expect("navigate");
        assert!(
            nav.get("errorText").is_none(),
            "navigating to {url}: {nav}; log:\n{}",
            self.log()
        );
        tab
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its value.
    pub fn eval(&mut self, tab: &Tab, expr: &str) -> Result<Value, String> {
        let r = self.call(
            Some(tab),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(format!("{expr}: {e}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expr` until it is truthy (generous deadline); returns its value.
    pub fn wait_for(&mut self, tab: &Tab, expr: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(45);
        let mut last;
        loop {
            match self.eval(tab, expr) {
                Ok(v) if !(v.is_null() || v == false || v == "" || v == 0) => return v,
                Ok(v) => last = v,
                Err(e) => last = Value::String(e), // e.g. mid-navigation
            }
            if Instant::now() > deadline {
                let page = self
                    .eval(tab, "location.href + '\\n' + document.body.innerText")
                    .unwrap_or_default();
                panic!(
                    "{what}: `{expr}` never held (last {last}); page: {page}; browser log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Types `text` into the focused element as one input event (what a paste does).
    pub fn insert_text(&mut self, tab: &Tab, text: &str) {
        self.call(Some(tab), "Input.insertText", json!({"text": text}))
            .expect("insert text");
    }

    /// A real mouse click in the middle of the element `selector`.
    pub fn click(&mut self, tab: &Tab, selector: &str) {
        let sel = serde_json::to_string(selector).expect("selector");
        let rect = self
            .eval(
                tab,
                &format!(
                    "(() => {{ const e = document.querySelector({sel}); e.scrollIntoView(); \
                     const r = e.getBoundingClientRect(); \
                     return [r.left + r.width / 2, r.top + r.height / 2]; }})()"
                ),
            )
            .expect("element position");
        let (x, y) = (rect[0].as_f64().expect("x"), rect[1].as_f64().expect("y"));
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                Some(tab),
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .expect("mouse event");
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: signalling the process group we created for our own child.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Helpers that left the group still name our unique profile on their command line.
        let needle = self.profile.path().to_string_lossy().into_owned();
        for _ in 0..20 {
            let strays = stray_pids(&needle);
            if strays.is_empty() {
                break;
            }
            for p in strays {
                // SAFETY: these processes run our browser with our private profile.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The TempDir removes the profile.
    }
}

/// Processes whose command line mentions `needle` (our profile directory).
fn stray_pids(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}
