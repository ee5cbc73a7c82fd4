//! The control socket: the daemon serves its operator API on a Unix socket, and the
//! `tollgate status|clients|wallet|gate` commands talk to it with [`ControlClient`].
//!
//! ```text
//!  tollgate run ── bind(<state_dir>/control.sock, mode 0600; a stale file is replaced,
//!                  a live daemon's socket is not) ── axum (ops::control_router) ── remove at stop
//!  tollgate status ── ControlClient::get_json("/ops/status") ── hyper's HTTP/1.1 client over
//!                     the socket (the same HTTP implementation as the server side)
//!        daemon not running ──> ControlError::NotRunning (exit code 3)
//!        404 from the daemon ──> ControlError::Status { status: 404 } (exit code 4)
//! ```
//! Access control is the file mode: only the socket's owner (root) can connect. That is why
//! money-moving requests (wallet send/receive) are served here and not on the TCP admin port.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use axum::body::Bytes;
use axum::http::{header, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::task::AbortOnDropHandle;

/// The socket's file name inside the state directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Largest answer the client reads (the client list of a full map is a few MiB).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

/// Exit codes of the operator commands (documented in `tollgate --help` and the README).
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    pub const DAEMON_UNREACHABLE: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens on the socket (no file, or a stale one).
    #[error("the daemon is not running (nothing answers on {}; start it with `tollgate run`)", path.display())]
    NotRunning {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another daemon already serves this socket.
    #[error("{} is in use by a running daemon", path.display())]
    InUse { path: PathBuf },
    #[error("control socket {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The daemon answered with an error status; `message` is its explanation.
    #[error("{message}")]
    Status { status: u16, message: String },
    /// The exchange over the socket failed, or its answer is not what was expected (`what`
    /// says at which step).
    #[error("unexpected answer from the daemon ({what})")]
    BadResponse {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ControlError {
    /// The process exit code for this error (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            ControlError::NotRunning { .. } => exit::DAEMON_UNREACHABLE,
            ControlError::Status { status: 404, .. } => exit::NOT_FOUND,
            _ => exit::ERROR,
        }
    }
}

/// `<state_dir>/control.sock`
pub fn default_socket(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Binds the control socket with mode 0600. A socket file nobody answers on (left by a crash)
/// is replaced; one a live daemon answers on is an error.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let l = UnixListener::bind(path).map_err(io_err)?;
    // The state directory is root's; the mode keeps the socket root's even if it is not.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(l)
}

/// A client of the daemon's control socket (one connection per request).
#[derive(Clone, Debug)]
pub struct ControlClient {
    path: PathBuf,
    timeout: Duration,
}

/// A decoded HTTP answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl ControlClient {
    /// Requests time out after `timeout` (wallet operations talk to mints: allow a minute).
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        ControlClient {
            path: path.into(),
            timeout,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One request; non-2xx answers are returned, not turned into errors.
    pub async fn request(
        &self,
        method: &str,
        target: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<Answer, ControlError> {
        let io_err = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let s = match UnixStream::connect(&self.path).await {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(ControlError::NotRunning {
                    path: self.path.clone(),
                    source: e,
                })
            }
            Err(e) => return Err(io_err(e)),
        };
        fn bad<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
            what: &'static str,
        ) -> impl FnOnce(E) -> ControlError {
            move |e| ControlError::BadResponse {
                what,
                source: e.into(),
            }
        }
        let mut req = Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, "tollgate");
        let body = match body {
            Some((ct, b)) => {
                req = req.header(header::CONTENT_TYPE, ct);
                Bytes::copy_from_slice(b)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(bad("building the request"))?;
        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .map_err(bad("handshake"))?;
            // Drives the connection; aborted with this exchange (a timeout drops it).
            let _conn = AbortOnDropHandle::new(tokio::spawn(conn));
            let answer = sender.send_request(req).await.map_err(bad("request"))?;
            let status = answer.status().as_u16();
            let content_type = answer
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = Limited::new(answer.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(bad("reading the answer"))?
                .to_bytes()
                .to_vec();
            Ok::<_, ControlError>(Answer {
                status,
                content_type,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                io_err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {} s", self.timeout.as_secs()),
                ))
            })?
    }

    /// GET `target` and decode the JSON answer; error statuses become [`ControlError::Status`].
    pub async fn get_json<T: DeserializeOwned>(&self, target: &str) -> Result<T, ControlError> {
        decode(self.request("GET", target, None).await?)
    }

    /// POST a JSON body and decode the JSON answer.
    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        target: &str,
        body: &B,
    ) -> Result<T, ControlError> {
        let b = serde_json::to_vec(body).map_err(|source| ControlError::BadResponse {
            what: "encoding the request",
            source: source.into(),
        })?;
        decode(
            self.request("POST", target, Some(("application/json", &b)))
                .await?,
        )
    }
}

/// 2xx → the body as JSON; otherwise the daemon's `{"error": …}` (or the raw text).
fn decode<T: DeserializeOwned>(a: Answer) -> Result<T, ControlError> {
    if !(200..300).contains(&a.status) {
        let message = serde_json::from_slice::<serde_json::Value>(&a.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| {
                let t = String::from_utf8_lossy(&a.body).trim().to_string();
                if t.is_empty() {
                    format!("the daemon answered HTTP {}", a.status)
                } else {
                    t
                }
            });
        return Err(ControlError::Status {
            status: a.status,
            message,
        });
    }
    let body = if a.body.is_empty() {
        b"null".as_slice()
    } else {
        &a.body
    };
    serde_json::from_slice(body).map_err(|source| ControlError::BadResponse {
        what: "decoding the JSON",
        source: source.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "daemon" on a Unix socket in a temp dir that answers each connection with `raw`
    /// after reading the request head (`None`: never answers).
    async fn raw_daemon(raw: Option<Vec<u8>>) -> (tempfile::TempDir, ControlClient) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(SOCKET_NAME);
        let l = bind(&path).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let raw = raw.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    match raw {
                        Some(raw) => {
                            c.write_all(&raw).await.ok();
                            c.shutdown().await.ok();
                        }
                        None => std::future::pending().await,
                    }
                });
            }
        });
        let client = ControlClient::new(&path, Duration::from_secs(2));
        (dir, client)
    }

    #[tokio::test]
    async fn reads_length_chunked_and_close_delimited_answers() {
        let (_d, c) = raw_daemon(Some(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                .to_vec(),
        ))
        .await;
        let a = c.request("GET", "/ops/status", None).await.expect("length");
        assert_eq!(a.status, 200);
        assert_eq!(a.body, b"{}");
        assert_eq!(a.content_type.as_deref(), Some("application/json"));
        let (_d, c) = raw_daemon(Some(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n"
                .to_vec(),
        ))
        .await;
        let a = c
            .request("POST", "/x", Some(("text/plain", b"hi")))
            .await
            .expect("chunked");
        assert_eq!((a.status, a.body.as_slice()), (404, b"abcde".as_slice()));
        let (_d, c) = raw_daemon(Some(b"HTTP/1.1 200 OK\r\n\r\nuntil close".to_vec())).await;
        let a = c.request("GET", "/", None).await.expect("close-delimited");
        assert_eq!(a.body, b"until close");
    }

    #[tokio::test]
    async fn rejects_malformed_oversized_and_silent_answers() {
        for raw in [
            b"".as_slice(),
            b"garbage\r\n\r\n",
            b"SMTP 220 hi\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab\r\n",
            // Regression (issue 11): a chunk size of usize::MAX overflowed the old parser.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n",
        ] {
            let (_d, c) = raw_daemon(Some(raw.to_vec())).await;
            let r = c.request("GET", "/", None).await;
            assert!(
                matches!(r, Err(ControlError::BadResponse { .. })),
                "{:?}: {r:?}",
                String::from_utf8_lossy(raw)
            );
        }
        // Larger than MAX_RESPONSE: refused, not buffered whole.
        let mut big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_RESPONSE + 1
        )
        .into_bytes();
        big.resize(big.len() + MAX_RESPONSE + 1, b'x');
        let (_d, c) = raw_daemon(Some(big)).await;
        assert!(matches!(
            c.request("GET", "/", None).await,
            Err(ControlError::BadResponse { .. })
        ));
        // A daemon that never answers: the client's timeout.
        let (_d, c) = raw_daemon(None).await;
        let e = c.request("GET", "/", None).await.expect_err("silent");
        assert!(e.to_string().contains("control socket"), "{e}");
    }

    #[test]
    fn error_answers_carry_the_daemon_message_and_exit_codes() {
        let e = decode::<serde_json::Value>(Answer {
            status: 404,
            content_type: None,
            body: br#"{"error":"no session for aa:bb:cc:dd:ee:ff"}"#.to_vec(),
        })
        .expect_err("404");
        assert_eq!(e.to_string(), "no session for aa:bb:cc:dd:ee:ff");
        assert_eq!(e.exit_code(), exit::NOT_FOUND);
        let e = decode::<serde_json::Value>(Answer {
            status: 500,
            content_type: None,
            body: b"boom".to_vec(),
        })
        .expect_err("500");
        assert_eq!(
            (e.to_string().as_str(), e.exit_code()),
            ("boom", exit::ERROR)
        );
    }

    #[tokio::test]
    async fn a_missing_or_stale_socket_means_not_running_and_bind_replaces_stale() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(SOCKET_NAME);
        let c = ControlClient::new(&path, Duration::from_secs(5));
        let e = c.request("GET", "/", None).await.expect_err("no file");
        assert_eq!(e.exit_code(), exit::DAEMON_UNREACHABLE, "{e}");
        // A stale socket file: bound, then the listener dropped.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        let e = c.request("GET", "/", None).await.expect_err("stale");
        assert_eq!(e.exit_code(), exit::DAEMON_UNREACHABLE, "{e}");
        let l = bind(&path).expect("stale socket replaced");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(bind(&path), Err(ControlError::InUse { .. })));
        drop(l);
    }
}
