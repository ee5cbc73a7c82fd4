//! Shared pieces of the `bench-*` binaries: the machine line, latency statistics, a tiny
//! keep-alive HTTP/1.1 client for load generation, and writing a section of BENCHMARKS.md.
//!
//! ```text
//! machine()                         "2 cores (AMD EPYC …), kernel …, load average …"
//! Conn::connect(addr) ─ request(bytes) ─> Reply { status, server_timing }   (keep-alive)
//! Latencies::push(d) … p(50.0)      percentiles in ms
//! write_section("## API", text)     replaces that section of $TOLLGATE_BENCHMARKS_MD
//! ```

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// `(cores, cpu model, kernel, load averages 1/5/15 min)` from `/proc`.
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub load: [f64; 3],
}

pub fn machine() -> Machine {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut load = [0.0; 3];
    if let Ok(s) = std::fs::read_to_string("/proc/loadavg") {
        for (i, v) in s.split_whitespace().take(3).enumerate() {
            load[i] = v.parse().unwrap_or(0.0);
        }
    }
    Machine {
        cores,
        cpu,
        kernel,
        load,
    }
}

impl Machine {
    /// One Markdown paragraph: the command, the machine, the date, and a warning when the
    /// load average says other work was competing for the cores.
    pub fn describe(&self, command: &str) -> String {
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let mut s = format!(
            "Command: `{command}`. Machine: {} cores ({}), kernel {}. Date: {date}. \
             Load average before the run: {:.2} / {:.2} / {:.2} (1 / 5 / 15 min).",
            self.cores, self.cpu, self.kernel, self.load[0], self.load[1], self.load[2]
        );
        if self.load[0] > 0.5 * self.cores as f64 {
            s.push_str(
                " **Other work was running on these cores during this run (load average above \
                 half the core count): the figures are pessimistic; re-run on an idle machine \
                 before quoting them.**",
            );
        }
        s
    }
}

/// `fsync` latency of a 4 KiB append in `dir` over `n` tries, as `Latencies`: every durable
/// SQLite commit of the daemon (WAL, `synchronous=FULL`) pays one, so it bounds how cheap a
/// payment can be on this disk.
pub fn fsync_probe(dir: &std::path::Path, n: usize) -> Result<Latencies> {
    use std::io::Write as _;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let mut l = Latencies::default();
    for _ in 0..n {
        f.write_all(&[0u8; 4096])?;
        let t = std::time::Instant::now();
        f.sync_all()?;
        l.push(t.elapsed());
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(l)
}

/// Latency samples.
#[derive(Default, Clone)]
pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `pct` percentile in milliseconds (nearest rank); NaN when empty.
    pub fn p(&self, pct: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut v = self.0.clone();
        v.sort_unstable();
        let rank = ((pct / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1].as_secs_f64() * 1000.0
    }
}

/// One HTTP/1.1 answer as the load generator needs it.
pub struct Reply {
    pub status: u16,
    /// The `Server-Timing` header, if any.
    pub server_timing: Option<String>,
    pub body: Vec<u8>,
}

/// A keep-alive HTTP/1.1 connection (Content-Length bodies only; that is what axum sends
/// for the bodies measured here).
pub struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Conn> {
        let mut c = Conn {
            addr,
            stream: None,
            buf: Vec::with_capacity(16 * 1024),
        };
        c.reconnect().await?;
        Ok(c)
    }

    async fn reconnect(&mut self) -> Result<()> {
        let s = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connect {}", self.addr))?;
        s.set_nodelay(true)?;
        self.stream = Some(s);
        self.buf.clear();
        Ok(())
    }

    /// Sends one complete request and reads its answer; reconnects if the server closed.
    pub async fn request(&mut self, req: &[u8]) -> Result<Reply> {
        if self.stream.is_none() {
            self.reconnect().await?;
        }
        let s = self.stream.as_mut().context("stream")?;
        s.write_all(req).await?;
        let reply = read_reply(s, &mut self.buf).await?;
        if reply.1 {
            self.stream = None;
        }
        Ok(reply.0)
    }
}

/// `(reply, server closes)`.
async fn read_reply(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(Reply, bool)> {
    buf.clear();
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            bail!("response head too large");
        }
        read_more(s, buf).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .context("status line")?;
    let (mut len, mut timing, mut close) = (None, None, false);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-length" => len = Some(v.parse::<usize>().context("content-length")?),
            "server-timing" => timing = Some(v.to_string()),
            "connection" => close = v.eq_ignore_ascii_case("close"),
            "transfer-encoding" => bail!("chunked responses are not supported here"),
            _ => {}
        }
    }
    let len = len.context("response without content-length")?;
    while buf.len() < head_end + len {
        read_more(s, buf).await?;
    }
    let body = buf[head_end..head_end + len].to_vec();
    Ok((
        Reply {
            status,
            server_timing: timing,
            body,
        },
        close,
    ))
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = s.read(&mut chunk).await?;
    if n == 0 {
        bail!("connection closed mid-response");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The `dur` of metric `name` in a `Server-Timing` value, in ms.
pub fn timing(header: &str, name: &str) -> Option<f64> {
    header.split(',').find_map(|m| {
        let (n, d) = m.trim().split_once(";dur=")?;
        (n == name).then(|| d.trim().parse().ok()).flatten()
    })
}

/// A bare cdk wallet over a SQLite file (like the daemon's), keysets and mint info already
/// fetched: the baseline the gateway's wallet is compared with.
pub async fn bare_cdk_wallet(mint_url: &str, db_file: &std::path::Path) -> Result<cdk::Wallet> {
    let db = cdk_sqlite::WalletSqliteDatabase::new(db_file.to_path_buf()).await?;
    let mut seed = [0u8; 64];
    for chunk in seed.chunks_mut(32) {
        chunk.copy_from_slice(&cdk::nuts::SecretKey::generate().secret_bytes());
    }
    let wallet = cdk::wallet::WalletBuilder::new()
        .mint_url(mint_url.parse()?)
        .unit(cdk::nuts::CurrencyUnit::Sat)
        .localstore(std::sync::Arc::new(db))
        .seed(seed)
        .without_rate_limiting()
        .build()?;
    wallet.fetch_mint_info().await?;
    wallet.active_keyset().await?;
    Ok(wallet)
}

/// Replaces the `## ...` section starting with `heading` (up to the next `## `), or appends it.
pub fn replace_section(doc: &str, heading: &str, section: &str) -> String {
    match doc.find(heading) {
        Some(start) => {
            let rest = &doc[start + heading.len()..];
            let end = rest
                .find("\n## ")
                .map_or(doc.len(), |i| start + heading.len() + i + 1);
            format!("{}{}{}", &doc[..start], section, &doc[end..])
        }
        None => format!("{}\n\n{section}", doc.trim_end()),
    }
}

/// The `### ` subsections of the `## ` section `heading` whose titles start with `prefix`,
/// verbatim and in order ("" when there are none).
pub fn subsections(doc: &str, heading: &str, prefix: &str) -> String {
    let Some(start) = doc.find(heading) else {
        return String::new();
    };
    let body = &doc[start + heading.len()..];
    let body = &body[..body.find("\n## ").map_or(body.len(), |i| i + 1)];
    let mut out = String::new();
    let mut rest = body;
    while let Some(i) = rest.find(prefix) {
        let sub = &rest[i..];
        let end = sub[prefix.len()..]
            .find("\n### ")
            .map_or(sub.len(), |j| prefix.len() + j + 1);
        out.push_str(&sub[..end]);
        rest = &sub[end..];
    }
    out
}

/// [`subsections`] of `$TOLLGATE_BENCHMARKS_MD` (a run that skips some tables keeps the last
/// run's).
pub fn earlier_subsections(heading: &str, prefix: &str) -> String {
    let path = std::env::var("TOLLGATE_BENCHMARKS_MD").unwrap_or_else(|_| "BENCHMARKS.md".into());
    subsections(
        &std::fs::read_to_string(path).unwrap_or_default(),
        heading,
        prefix,
    )
}

/// Writes `section` (starting with `heading`) into `$TOLLGATE_BENCHMARKS_MD`
/// (default `BENCHMARKS.md` in the current directory).
pub fn write_section(heading: &str, section: &str) -> Result<String> {
    let path = std::env::var("TOLLGATE_BENCHMARKS_MD").unwrap_or_else(|_| "BENCHMARKS.md".into());
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    std::fs::write(&path, replace_section(&old, heading, section))
        .with_context(|| format!("writing {path}"))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let mut l = Latencies::default();
        for ms in 1..=100u64 {
            l.push(Duration::from_millis(ms));
        }
        assert_eq!(l.p(50.0), 50.0);
        assert_eq!(l.p(99.0), 99.0);
        assert_eq!(l.p(100.0), 100.0);
        assert!(Latencies::default().p(50.0).is_nan());
    }

    #[test]
    fn fsync_probe_measures_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = fsync_probe(dir.path(), 3).expect("probe");
        assert_eq!(l.len(), 3);
        assert!(std::fs::read_dir(dir.path()).expect("dir").next().is_none());
    }

    #[test]
    fn server_timing_parse() {
        let h = "redeem;dur=12.345, total;dur=14.000";
        assert_eq!(timing(h, "redeem"), Some(12.345));
        assert_eq!(timing(h, "total"), Some(14.0));
        assert_eq!(timing(h, "db"), None);
        assert_eq!(timing("total;dur=x", "total"), None);
    }

    #[test]
    fn subsections_are_kept_by_prefix() {
        let doc = "# B\n\n## A\nintro\n\n### X one\nx1\n\n### Y\ny\n\n### X two\nx2\n\n## C\n### X three\n";
        assert_eq!(
            subsections(doc, "## A", "### X"),
            "### X one\nx1\n\n### X two\nx2\n\n"
        );
        assert_eq!(subsections(doc, "## C", "### X"), "### X three\n");
        assert_eq!(subsections(doc, "## D", "### X"), "");
    }

    #[test]
    fn sections_are_replaced_or_appended() {
        let doc = "# B\n\n## A\nold a\n\n## C\nc\n";
        let d = replace_section(doc, "## A", "## A\nnew a\n\n");
        assert_eq!(d, "# B\n\n## A\nnew a\n\n## C\nc\n");
        let d = replace_section(&d, "## C", "## C\nnew c\n");
        assert_eq!(d, "# B\n\n## A\nnew a\n\n## C\nnew c\n");
        let d = replace_section(&d, "## D", "## D\nd\n");
        assert!(d.ends_with("## C\nnew c\n\n## D\nd\n"), "{d:?}");
    }
}
