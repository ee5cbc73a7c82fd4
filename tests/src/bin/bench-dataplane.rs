//! `cargo xtask bench dataplane`: data-plane cost, measured side by side in one invocation.
//!
//! ```text
//! 1. BPF_PROG_TEST_RUN, warm (100 000 entries): every class and an empty TC / XDP program,
//!    interleaved, RUNS × REPEAT each ──> median, IQR; program cost = class − empty (same hook)
//! 2. cold (100 000 and 1 000 000 entries): SAMPLES distinct MACs, one repeat each, each next
//!    to an empty-program run of the same frame ──> median, IQR, cost; map memory
//! 3. throughput (iperf3 -P 4, client → gateway → upstream, both ways) at 1 / 10 000 /
//!    1 000 000 clients: no program and tollgate TC interleaved, IPERF_RUNS pairs ──>
//!    median of the per-pair ratios and their spread; beside them, in the same rounds, the nft
//!    designs of uspot (MAC set with counters) and openNDS (a rule per MAC), see
//!    `tollgate_tests::nftarm`; one more tollgate run per client count with BPF_ENABLE_STATS
//!    on ──> run_time_ns / run_cnt of each program under real traffic
//! ```
//! 4. rate limits (issue 15, [`shaping_table`]): the paid packet cost unshaped, with EDT and
//!    policed, interleaved like 1.; a client capped at 5 Mbit/s down and 2 Mbit/s up among
//!    1 000 other shaped clients, one iperf3 flow each way ──> its rate errors
//!    (`--shaping-only` runs just this part and prints it)
//! 5. a non-linear skb against its linear twin through the attached TC ingress program
//!    ([`nonlinear_table`], `--nonlinear-only`) ──> run_time_ns / run_cnt of each
//!
//! `--quick` cuts every count (for development; the report says so); `--clients 1,10000` picks
//! the client counts; `--throughput-only` skips 1–2 (the report keeps the last run's tables);
//! `--no-nft` drops the nft arms, `--nft-cap S` bounds one nft table's load (300 s). Prints a
//! Markdown report and writes it to `BENCHMARKS.md` (section "Data plane").

use std::{fmt::Write as _, net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use tollgate::valve::{Allowance, Gates, Hook, MacAddr, Valve, ValveConfig};
use tollgate_tests::{
    frames::{Frame, L4},
    netns::{Lab3, LAN_IFACE},
    nftarm::{Design, NftArm},
    pins::PinBase,
};

/// Counts of one invocation.
struct Opts {
    quick: bool,
    /// BPF_PROG_TEST_RUN runs per class and repeats per run.
    runs: usize,
    repeat: u32,
    /// Entries in the maps for the warm rows.
    warm_fill: u32,
    /// Map sizes of the cold rows and distinct MACs sampled in each.
    cold_fills: Vec<u32>,
    cold_samples: usize,
    /// Client counts, pairs and seconds of the throughput arms.
    clients: Vec<u32>,
    iperf_runs: usize,
    iperf_secs: u32,
    throughput: bool,
    /// Run the BPF_PROG_TEST_RUN tables (else the report keeps the last run's).
    testrun: bool,
    /// The nft arms beside baseline and tollgate, and the wall-time cap of one table's load.
    nft: bool,
    nft_cap: Duration,
}

impl Opts {
    fn parse() -> Opts {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let has = |a: &str| args.iter().any(|x| x == a);
        let value = |a: &str| {
            args.iter()
                .position(|x| x == a)
                .and_then(|i| args.get(i + 1))
                .map(String::as_str)
        };
        let quick = has("--quick");
        let clients = value("--clients").map(|v| {
            v.split(',')
                .map(|c| c.trim().parse().expect("--clients 1,10000,1000000"))
                .collect()
        });
        Opts {
            quick,
            runs: if quick { 5 } else { 15 },
            repeat: if quick { 100_000 } else { 1_000_000 },
            warm_fill: 100_000,
            cold_fills: vec![100_000, 1_000_000],
            cold_samples: if quick { 2_000 } else { 20_000 },
            clients: clients.unwrap_or_else(|| vec![1, 10_000, 1_000_000]),
            iperf_runs: if quick { 2 } else { 10 },
            iperf_secs: if quick { 3 } else { 10 },
            throughput: !has("--no-throughput"),
            testrun: !has("--throughput-only"),
            nft: !has("--no-nft"),
            nft_cap: Duration::from_secs(
                value("--nft-cap")
                    .map(|v| v.parse().expect("--nft-cap SECONDS"))
                    .unwrap_or(300),
            ),
        }
    }
}

/// One `| class | median | IQR | program cost |` row of a `BPF_PROG_TEST_RUN` table.
fn cost_row(out: &mut String, name: &str, s: &Stats, floor: f64) -> std::fmt::Result {
    writeln!(
        out,
        "| {name} | {:.1} | {:.1}–{:.1} | {:.1} |",
        s.median,
        s.q1,
        s.q3,
        s.median - floor
    )
}

/// Median, first and third quartile.
struct Stats {
    median: f64,
    q1: f64,
    q3: f64,
}

fn stats(v: &[f64]) -> Stats {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| {
        if s.is_empty() {
            return f64::NAN;
        }
        let i = p * (s.len() - 1) as f64;
        let (lo, hi) = (i.floor() as usize, i.ceil() as usize);
        s[lo] + (s[hi] - s[lo]) * (i - lo as f64)
    };
    Stats {
        median: at(0.5),
        q1: at(0.25),
        q3: at(0.75),
    }
}

fn dummy_mac(i: u32) -> MacAddr {
    let b = i.to_be_bytes();
    MacAddr([0x0a, 0xee, b[0], b[1], b[2], b[3]])
}

fn fill(valve: &Valve, n: u32) -> Result<()> {
    fill_with(valve, n, Allowance::default())
}

/// [`fill`] with every dummy client opened with `a` (e.g. shaped).
fn fill_with(valve: &Valve, n: u32, a: Allowance) -> Result<()> {
    for i in 0..n {
        valve.open(dummy_mac(i), a)?;
        if i > 0 && i % 200_000 == 0 {
            eprintln!("[bench]   {i} entries");
        }
    }
    Ok(())
}

const CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const LIMITED: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
const TIMED: [u8; 6] = [0x02, 0, 0, 0, 0, 0x13];
const GW: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const STRANGER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
const CL4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const GW4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const NET4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn tcp_up() -> L4 {
    L4::Tcp {
        sport: 40000,
        dport: 443,
    }
}

fn testrun_valve(pins: &PinBase, capacity: u32) -> Result<Valve> {
    let mut cfg = ValveConfig::new("lo");
    cfg.pin_base = pins.path().to_path_buf();
    cfg.gateway_v4 = Some(GW4);
    cfg.garden = vec!["203.0.113.0/24".parse()?];
    cfg.max_clients = Some(capacity);
    Ok(Valve::load(&cfg)?)
}

/// `bytes_memlock` of the pinned per-client maps (bpftool), for the memory figure.
fn map_memory(pin_dir: &Path) -> u64 {
    ["TG_POLICY", "TG_INDEX", "TG_USAGE"]
        .iter()
        .filter_map(|m| {
            let out = std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(pin_dir.join(m))
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v["bytes_memlock"].as_u64()
        })
        .sum()
}

fn warm_table(o: &Opts, out: &mut String) -> Result<()> {
    let up = Frame::new(CLIENT, GW);
    let stranger = Frame::new(STRANGER, GW);
    let classes: Vec<(&str, Hook, Vec<u8>)> = vec![
        (
            "empty TC program (floor)",
            Hook::EmptyTc,
            up.ipv4(CL4, NET4, tcp_up(), 1460),
        ),
        (
            "empty XDP program (floor)",
            Hook::EmptyXdp,
            up.ipv4(CL4, NET4, tcp_up(), 1460),
        ),
        (
            "paid IPv4 TCP upload (1500 B)",
            Hook::TcIngress,
            up.ipv4(CL4, NET4, tcp_up(), 1460),
        ),
        (
            "paid IPv4 TCP download (1500 B)",
            Hook::TcEgress,
            Frame::new(GW, CLIENT).ipv4(
                NET4,
                CL4,
                L4::Tcp {
                    sport: 443,
                    dport: 40000,
                },
                1460,
            ),
        ),
        (
            "paid, gate with a byte limit",
            Hook::TcIngress,
            Frame::new(LIMITED, GW).ipv4(CL4, NET4, tcp_up(), 1460),
        ),
        (
            "paid, gate with a deadline",
            Hook::TcIngress,
            Frame::new(TIMED, GW).ipv4(CL4, NET4, tcp_up(), 1460),
        ),
        (
            "paid IPv6 TCP upload",
            Hook::TcIngress,
            up.ipv6(
                "fd00::2".parse()?,
                "2001:db8::7".parse()?,
                &[],
                tcp_up(),
                1400,
            ),
        ),
        (
            "paid VLAN-tagged IPv4",
            Hook::TcIngress,
            up.clone().vlan(7).ipv4(CL4, NET4, tcp_up(), 1460),
        ),
        (
            "paid, XDP ingress",
            Hook::XdpIngress,
            up.ipv4(CL4, NET4, tcp_up(), 1460),
        ),
        (
            "unpaid, dropped",
            Hook::TcIngress,
            stranger.ipv4(CL4, NET4, tcp_up(), 1460),
        ),
        (
            "unpaid DNS to gateway (garden)",
            Hook::TcIngress,
            stranger.ipv4(
                CL4,
                GW4,
                L4::Udp {
                    sport: 5000,
                    dport: 53,
                },
                40,
            ),
        ),
        (
            "unpaid to allow-listed prefix",
            Hook::TcIngress,
            stranger.ipv4(CL4, Ipv4Addr::new(203, 0, 113, 9), tcp_up(), 1460),
        ),
        (
            "unpaid IPv6 behind 3 ext. headers",
            Hook::TcIngress,
            stranger.ipv6(
                "fd00::2".parse()?,
                "2001:db8::7".parse()?,
                &[0, 60, 43],
                tcp_up(),
                1400,
            ),
        ),
        ("ARP", Hook::TcIngress, stranger.arp()),
    ];
    let pins = PinBase::new("bench-warm");
    let valve = testrun_valve(&pins, 131_072)?;
    eprintln!("[bench] warm: filling {} clients", o.warm_fill);
    fill(&valve, o.warm_fill - 3)?;
    valve.open(MacAddr(CLIENT), Allowance::default())?;
    valve.open(
        MacAddr(LIMITED),
        Allowance {
            bytes: Some(1 << 60),
            ..Default::default()
        },
    )?;
    let day = 86_400_000_000_000;
    valve.open(
        MacAddr(TIMED),
        Allowance {
            until_boot_ns: Some(valve.now_boot_ns() + day),
            ..Default::default()
        },
    )?;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); classes.len()];
    for r in 0..o.runs {
        eprintln!("[bench] warm run {}/{}", r + 1, o.runs);
        for (i, (name, hook, frame)) in classes.iter().enumerate() {
            let t = valve.test_run(*hook, frame, o.repeat)?;
            if r == 0 && !t.passed(*hook) && !name.starts_with("unpaid") {
                bail!("{name} did not pass");
            }
            samples[i].push(t.duration.as_nanos() as f64);
        }
    }
    let floor_tc = stats(&samples[0]).median;
    let floor_xdp = stats(&samples[1]).median;
    writeln!(
        out,
        "### BPF_PROG_TEST_RUN, warm: ns per packet at {} entries ({} runs × {} repeats, \
         classes interleaved)\n",
        o.warm_fill, o.runs, o.repeat
    )?;
    writeln!(
        out,
        "\"program cost\" = the class's median − the empty program's median at the same hook \
         (TC {floor_tc:.1} ns, XDP {floor_xdp:.1} ns: the runner's own cost per repeat).\n"
    )?;
    writeln!(
        out,
        "| packet class | median ns | IQR ns | program cost ns |"
    )?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for (i, (name, hook, _)) in classes.iter().enumerate() {
        let s = stats(&samples[i]);
        let floor = match hook {
            Hook::XdpIngress | Hook::EmptyXdp => floor_xdp,
            _ => floor_tc,
        };
        cost_row(out, name, &s, floor)?;
    }
    writeln!(out)?;
    Ok(())
}

fn cold_table(o: &Opts, out: &mut String) -> Result<()> {
    writeln!(
        out,
        "### BPF_PROG_TEST_RUN, cold: one repeat per MAC, {} distinct paid MACs sampled from \
         the map\n",
        o.cold_samples
    )?;
    writeln!(
        out,
        "Each sample runs the paid upload of one MAC once, next to one run of the empty TC \
         program on the same frame and one run of the paid upload of a single MAC used for \
         every sample (its entry stays cached: the cost of the cold code path alone); with \
         one repeat the runner's clock reads dominate the floor.\n"
    )?;
    writeln!(
        out,
        "| entries | paid upload median ns (IQR) | same MAC each time median ns | empty TC \
         median ns (IQR) | program cost ns | POLICY + INDEX + USAGE memory | listing every \
         client (`Valve::gates`, median of 3) | a lookup's longest wait during a listing | \
         during a sweep |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for &n in &o.cold_fills {
        let pins = PinBase::new("bench-cold");
        let valve = testrun_valve(&pins, n)?;
        eprintln!("[bench] cold: filling {n} clients");
        let t = std::time::Instant::now();
        fill(&valve, n)?;
        eprintln!("[bench] cold: filled in {:.1} s", t.elapsed().as_secs_f64());
        let mem = map_memory(valve.pin_dir());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let (mut paid, mut empty, mut same) = (Vec::new(), Vec::new(), Vec::new());
        let one = Frame::new(dummy_mac(0).0, GW).ipv4(CL4, NET4, tcp_up(), 1460);
        for _ in 0..o.cold_samples {
            // xorshift: a spread of MACs over the whole map, the same on every run.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mac = dummy_mac((x % n as u64) as u32);
            let f = Frame::new(mac.0, GW).ipv4(CL4, NET4, tcp_up(), 1460);
            let r = valve.test_run(Hook::TcIngress, &f, 1)?;
            if !r.passed(Hook::TcIngress) {
                bail!("cold sample {mac} did not pass");
            }
            paid.push(r.duration.as_nanos() as f64);
            empty.push(valve.test_run(Hook::EmptyTc, &f, 1)?.duration.as_nanos() as f64);
            same.push(
                valve
                    .test_run(Hook::TcIngress, &one, 1)?
                    .duration
                    .as_nanos() as f64,
            );
        }
        let (p, e) = (stats(&paid), stats(&empty));
        // What every /metrics scrape and `tollgate clients` holds the valve's lock for.
        let mut listing = Vec::new();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let g = valve.gates()?;
            listing.push(t.elapsed().as_secs_f64() * 1e3);
            if g.len() != n as usize {
                bail!("listed {} of {n} clients", g.len());
            }
        }
        let wait = lookup_wait_during(&valve, || valve.gates().map(|_| ()))?;
        let sweep_wait = lookup_wait_during(&valve, || {
            valve.sweep(Duration::from_secs(3600)).map(|_| ())
        })?;
        writeln!(
            out,
            "| {n} | {:.0} ({:.0}–{:.0}) | {:.0} | {:.0} ({:.0}–{:.0}) | {:.0} | {:.1} MiB | {:.0} ms | {:.1} ms | {:.1} ms |",
            p.median,
            p.q1,
            p.q3,
            stats(&same).median,
            e.median,
            e.q1,
            e.q3,
            p.median - e.median,
            mem as f64 / (1024.0 * 1024.0),
            stats(&listing).median,
            wait,
            sweep_wait
        )?;
    }
    writeln!(out)?;
    Ok(())
}

/// What a payment's valve call waits for while a `/metrics` scrape lists every client (or a
/// sweep walks them): the longest `Valve::gate` call (it takes the valve's lock, as `open`
/// does) while `walk` runs three times on another thread, in ms.
fn lookup_wait_during(
    valve: &Valve,
    walk: impl Fn() -> Result<(), tollgate::valve::ValveError> + Sync,
) -> Result<f64> {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        let lister = sc.spawn(|| {
            let r = (0..3).try_for_each(|_| walk());
            done.store(true, std::sync::atomic::Ordering::Release);
            r
        });
        let mut longest = std::time::Duration::ZERO;
        let mut i = 0u32;
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            let t = std::time::Instant::now();
            valve.gate(dummy_mac(i % 1000))?;
            longest = longest.max(t.elapsed());
            i += 1;
        }
        lister.join().expect("lister")?;
        Ok(longest.as_secs_f64() * 1e3)
    })
}

/// One iperf3 run (`-P 4`), client → upstream, or reverse. Gbit/s.
fn iperf(lab: &Lab3, secs: u32, reverse: bool) -> Result<f64> {
    let mut cmd = lab.client.command("iperf3");
    cmd.args(["-c", "10.78.0.2", "-P", "4", "-t", &secs.to_string(), "-J"]);
    if reverse {
        cmd.arg("-R");
    }
    let out = cmd.output().context("iperf3 client")?;
    if !out.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 json")?;
    Ok(bps / 1e9)
}

fn gateway_cfg(pins: &PinBase, capacity: u32) -> ValveConfig {
    let mut cfg = ValveConfig::new(LAN_IFACE);
    cfg.pin_base = pins.path().to_path_buf();
    cfg.gateway_v4 = Some(Ipv4Addr::new(10, 77, 0, 1));
    cfg.max_clients = Some(capacity);
    cfg
}

fn attach(lab: &Lab3, cfg: &ValveConfig) -> Result<Valve> {
    let cfg = cfg.clone();
    Ok(lab.gateway.run(move || Valve::attach(&cfg))?)
}

/// Detaches the gate: its links are pinned only, so removing the pins detaches them. The
/// maps (and their entries) stay pinned for the next arm.
fn detach(valve: Valve) {
    for l in valve.attach_points() {
        let _ = std::fs::remove_file(valve.pin_dir().join(format!("link_{l}")));
    }
}

/// The iperf3 server in the upstream namespace; killed on drop (also when the bench fails:
/// deleting a namespace does not end the processes in it).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What gates the client's traffic in one arm of the throughput comparison.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// No program, no nft table: the bare forwarding path.
    None,
    Tollgate,
    Nft(Design),
}

impl Gate {
    fn name(self) -> &'static str {
        match self {
            Gate::None => "no program (baseline)",
            Gate::Tollgate => "tollgate TC",
            Gate::Nft(d) => d.name(),
        }
    }
}

/// One arm at one client count: Gbit/s per round (index = round, same as the baseline's).
struct Arm {
    gate: Gate,
    up: Vec<f64>,
    down: Vec<f64>,
}

/// How an nft arm's table loaded (or why it did not).
struct NftLoad {
    design: Design,
    outcome: std::result::Result<(Duration, u64), String>,
    /// The set's counter for the client after the runs (both directions), bytes.
    counted: Option<u64>,
}

/// The arms at one client count.
struct ClientRows {
    clients: u32,
    arms: Vec<Arm>,
    nft: Vec<NftLoad>,
    /// ns per run under traffic: (ingress, egress), tollgate.
    ns_per_run: (f64, f64),
}

/// Loads the nft designs for `n` clients (the fill's MACs and the lab's client, last) in the
/// gateway namespace, dormant; a design that does not load is reported, not skipped.
fn load_nft_arms(o: &Opts, lab: &Lab3, n: u32, client: [u8; 6]) -> (Vec<NftArm>, Vec<NftLoad>) {
    let (mut arms, mut loads) = (Vec::new(), Vec::new());
    if !o.nft {
        return (arms, loads);
    }
    for design in [Design::Set, Design::Rules] {
        eprintln!(
            "[bench] {}: loading {n} entries (cap {:?})",
            design.name(),
            o.nft_cap
        );
        let mut macs = (0..n - 1).map(|i| dummy_mac(i).0);
        match NftArm::load(
            &lab.gateway,
            design,
            LAN_IFACE,
            &mut macs,
            client,
            n as usize,
            o.nft_cap,
        ) {
            Ok(arm) => {
                eprintln!(
                    "[bench] {}: {n} entries loaded in {:.1} s, nft peak RSS {} MiB",
                    design.name(),
                    arm.load.as_secs_f64(),
                    arm.nft_peak_kib / 1024
                );
                loads.push(NftLoad {
                    design,
                    outcome: Ok((arm.load, arm.nft_peak_kib)),
                    counted: None,
                });
                arms.push(arm);
            }
            Err(e) => {
                eprintln!("[bench] {}: {n} entries NOT loaded: {e}", design.name());
                loads.push(NftLoad {
                    design,
                    outcome: Err(e.to_string()),
                    counted: None,
                });
            }
        }
    }
    (arms, loads)
}

/// Baseline, tollgate and the nft designs at every client count, interleaved: each round runs
/// every arm once (upload then download), the order rotating from round to round so a drift
/// of the machine hits every arm alike; ratios are taken within a round.
fn throughput_table(o: &Opts, out: &mut String) -> Result<()> {
    let lab = Lab3::new("bench");
    let _server = Server(
        lab.upstream
            .command("iperf3")
            .args(["-s", "-B", "10.78.0.2"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("iperf3 server (apt-get install iperf3)")?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let client_mac = MacAddr(lab.client_mac());
    let mut rows = Vec::new();
    for &n in &o.clients {
        let pins = PinBase::new("bench-iperf");
        let cfg = gateway_cfg(&pins, n.max(131_072));
        let valve = attach(&lab, &cfg)?;
        eprintln!("[bench] throughput: filling {n} clients");
        fill(&valve, n - 1)?;
        valve.open(client_mac, Allowance::default())?;
        detach(valve);
        let (nft_arms, mut nft_loads) = load_nft_arms(o, &lab, n, client_mac.0);
        let mut gates = vec![Gate::None, Gate::Tollgate];
        gates.extend(nft_arms.iter().map(|a| Gate::Nft(a.design)));
        let mut arms: Vec<Arm> = gates
            .iter()
            .map(|&gate| Arm {
                gate,
                up: vec![f64::NAN; o.iperf_runs],
                down: vec![f64::NAN; o.iperf_runs],
            })
            .collect();
        for r in 0..o.iperf_runs {
            for k in 0..arms.len() {
                let a = (k + r) % arms.len();
                let gate = arms[a].gate;
                let valve = match gate {
                    Gate::Tollgate => Some(attach(&lab, &cfg)?),
                    _ => None,
                };
                let nft = nft_arms.iter().find(|x| Gate::Nft(x.design) == gate);
                if let Some(x) = nft {
                    x.enable()?;
                }
                let measured = (|| {
                    anyhow::Ok((
                        iperf(&lab, o.iperf_secs, false)?,
                        iperf(&lab, o.iperf_secs, true)?,
                    ))
                })();
                if let Some(x) = nft {
                    x.disable()?;
                }
                if let Some(v) = valve {
                    detach(v);
                }
                // A run that fails (iperf3 gives up on a path that slow) is a gap in that
                // arm's row, said in the log, not the end of the whole benchmark.
                match measured {
                    Ok((up, down)) => {
                        arms[a].up[r] = up;
                        arms[a].down[r] = down;
                    }
                    Err(e) => eprintln!(
                        "[bench] {} at {n}, round {}: run failed: {e:#}",
                        gate.name(),
                        r + 1
                    ),
                }
            }
            eprintln!(
                "[bench] {n} clients, round {}: {}",
                r + 1,
                arms.iter()
                    .map(|a| format!("{} {:.2}/{:.2}", a.gate.name(), a.up[r], a.down[r]))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for (l, x) in nft_loads
            .iter_mut()
            .filter(|l| l.outcome.is_ok())
            .zip(&nft_arms)
        {
            l.counted = x.counted_bytes(client_mac.0);
        }
        // CPU cost under real traffic: one more tollgate run with run-time statistics on.
        let ns_per_run = {
            let v = attach(&lab, &cfg)?;
            let stats_fd = Valve::enable_run_stats()?;
            let i0 = v.run_stats(Hook::TcIngress)?;
            let e0 = v.run_stats(Hook::TcEgress)?;
            iperf(&lab, o.iperf_secs, false)?;
            iperf(&lab, o.iperf_secs, true)?;
            let i1 = v.run_stats(Hook::TcIngress)?;
            let e1 = v.run_stats(Hook::TcEgress)?;
            drop(stats_fd);
            let per =
                |a: (u64, u64), b: (u64, u64)| (b.0 - a.0) as f64 / ((b.1 - a.1).max(1)) as f64;
            let ns = (per(i0, i1), per(e0, e1));
            let g = v.gate(client_mac)?.context("client gate")?;
            eprintln!(
                "[bench] {n} clients: {:.1} / {:.1} ns per run, metered {} bytes",
                ns.0,
                ns.1,
                g.usage.bytes()
            );
            detach(v);
            ns
        };
        drop(nft_arms);
        rows.push(ClientRows {
            clients: n,
            arms,
            nft: nft_loads,
            ns_per_run,
        });
        drop(pins);
    }
    throughput_report(o, &rows, out)
}

/// (median Gbit/s, median ratio to the baseline of the same round, lowest and highest ratio).
/// Rounds where either run failed (NaN) are left out.
fn versus(arm: &[f64], base: &[f64]) -> (f64, f64, f64, f64) {
    let ratios: Vec<f64> = arm
        .iter()
        .zip(base)
        .map(|(a, b)| a / b)
        .filter(|x| x.is_finite())
        .collect();
    let arm: Vec<f64> = arm.iter().copied().filter(|x| x.is_finite()).collect();
    let lo = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (stats(&arm).median, stats(&ratios).median, lo, hi)
}

fn throughput_report(o: &Opts, rows: &[ClientRows], out: &mut String) -> Result<()> {
    writeln!(
        out,
        "### TCP throughput through the gateway (iperf3 -P 4, {} s per run, {} interleaved \
         rounds per client count)\n",
        o.iperf_secs, o.iperf_runs
    )?;
    writeln!(
        out,
        "Each round runs every arm once, upload then download, the order rotating from round \
         to round; an arm's ratio is taken against the baseline of the same round. Spread = \
         lowest–highest ratio. Gbit/s are medians. The arms: no program and no table; \
         tollgate's TC programs; an nft `netdev` table on the LAN interface with a MAC set \
         with a counter per element, `ether saddr @paid accept` at ingress and `ether daddr \
         @paid accept` at egress (uspot's design: its fw4 ipset matching `src_mac`, element \
         counters for accounting); the same hooks with one `ether saddr|daddr <MAC> counter \
         accept` rule per client (openNDS's design: a rule per authenticated client), the \
         measured client's rule last (the newest client's place when rules are appended). \
         Every arm accepts ARP and drops everything else, like tollgate for an unpaid \
         device.\n"
    )?;
    writeln!(
        out,
        "| clients | arm | upload Gbit/s | upload × no program (spread) | download Gbit/s | \
         download × no program (spread) |"
    )?;
    writeln!(out, "|---:|---|---:|---:|---:|---:|")?;
    for row in rows {
        let base = &row.arms[0];
        for a in &row.arms {
            let (u, ur, ul, uh) = versus(&a.up, &base.up);
            let (d, dr, dl, dh) = versus(&a.down, &base.down);
            if a.gate == Gate::None {
                writeln!(
                    out,
                    "| {} | {} | {u:.2} | 1 | {d:.2} | 1 |",
                    row.clients,
                    a.gate.name()
                )?;
            } else if u.is_nan() && d.is_nan() {
                writeln!(
                    out,
                    "| {} | {} | — | every run failed (see the log) | — | — |",
                    row.clients,
                    a.gate.name()
                )?;
            } else {
                writeln!(
                    out,
                    "| {} | {} | {u:.2} | {ur:.3} ({ul:.3}–{uh:.3}) | {d:.2} | {dr:.3} \
                     ({dl:.3}–{dh:.3}) |",
                    row.clients,
                    a.gate.name()
                )?;
            }
        }
        for l in row.nft.iter().filter(|l| l.outcome.is_err()) {
            writeln!(
                out,
                "| {} | {} | — | not loaded (see below) | — | — |",
                row.clients,
                l.design.name()
            )?;
        }
    }
    writeln!(out)?;
    if o.nft {
        writeln!(
            out,
            "### Loading the nft arms (`nft -f` of a generated file, one transaction, cap {} s, \
             nft's address space capped at 12 GiB)\n",
            o.nft_cap.as_secs()
        )?;
        writeln!(
            out,
            "| clients | design | load | nft peak RSS | client's element counter after the runs |"
        )?;
        writeln!(out, "|---:|---|---|---:|---:|")?;
        for row in rows {
            for l in &row.nft {
                let (load, rss) = match &l.outcome {
                    Ok((t, kib)) => (
                        format!("{:.1} s", t.as_secs_f64()),
                        format!("{} MiB", kib / 1024),
                    ),
                    Err(e) => (format!("**failed**: {e}"), "—".into()),
                };
                let counted = match (l.design, l.counted) {
                    (Design::Set, Some(b)) => format!("{:.1} GB", b as f64 / 1e9),
                    (Design::Set, None) => "not read".into(),
                    (Design::Rules, _) => {
                        "not read (one rule's counter needs the whole chain listed)".into()
                    }
                };
                writeln!(
                    out,
                    "| {} | {} | {load} | {rss} | {counted} |",
                    row.clients,
                    l.design.name()
                )?;
            }
        }
        writeln!(out)?;
    }
    writeln!(
        out,
        "### CPU cost under real traffic (`BPF_ENABLE_STATS`: run_time_ns / run_cnt during one \
         more upload + download run)\n"
    )?;
    writeln!(out, "| clients | TC ingress ns/run | TC egress ns/run |")?;
    writeln!(out, "|---:|---:|---:|")?;
    for r in rows {
        writeln!(
            out,
            "| {} | {:.1} | {:.1} |",
            r.clients, r.ns_per_run.0, r.ns_per_run.1
        )?;
    }
    writeln!(out)?;
    Ok(())
}

fn main() -> Result<()> {
    let o = Opts::parse();
    let mut out = String::new();
    let m = tollgate_tests::bench::machine();
    writeln!(out, "## Data plane\n")?;
    writeln!(
        out,
        "{}{}\n",
        m.describe("cargo xtask bench dataplane"),
        if o.quick {
            " **`--quick`: reduced counts, for development only.**"
        } else {
            ""
        }
    )?;
    if std::env::args().any(|a| a == "--nonlinear-only") {
        nonlinear_table(&o, &mut out)?;
        print!("{out}");
        return Ok(());
    }
    if std::env::args().any(|a| a == "--cold-only") {
        cold_table(&o, &mut out)?;
        print!("{out}");
        return Ok(());
    }
    if std::env::args().any(|a| a == "--shaping-only") {
        shaping_table(&o, &mut out)?;
        print!("{out}");
        return Ok(());
    }
    if o.testrun {
        warm_table(&o, &mut out)?;
        cold_table(&o, &mut out)?;
    } else {
        let kept =
            tollgate_tests::bench::earlier_subsections("## Data plane", "### BPF_PROG_TEST_RUN");
        if !kept.is_empty() {
            writeln!(
                out,
                "(`--throughput-only`: the `BPF_PROG_TEST_RUN` tables below are kept from the \
                 previous run.)\n"
            )?;
            out.push_str(&kept);
        }
    }
    if o.throughput {
        throughput_table(&o, &mut out)?;
    }
    shaping_table(&o, &mut out)?;
    nonlinear_table(&o, &mut out)?;
    print!("{out}");
    let path = tollgate_tests::bench::write_section("## Data plane", &out)?;
    eprintln!("[bench] wrote {path}");
    Ok(())
}

/// Rate limits: the paid packet cost with shaping on (BPF_PROG_TEST_RUN, interleaved with the
/// unshaped classes and the empty program), and the rate error of one capped client.
fn shaping_table(o: &Opts, out: &mut String) -> Result<()> {
    use tollgate::valve::Rates;
    let fast = Rates {
        down_kbit: Rates::MAX_KBIT,
        up_kbit: Rates::MAX_KBIT,
    };
    let pins_edt = PinBase::new("bench-shape-edt");
    let pins_pol = PinBase::new("bench-shape-pol");
    let mut cfg = ValveConfig::new("lo");
    cfg.gateway_v4 = Some(GW4);
    cfg.max_clients = Some(4096);
    cfg.pin_base = pins_edt.path().to_path_buf();
    cfg.edt_down = true;
    let edt = Valve::load(&cfg)?;
    cfg.pin_base = pins_pol.path().to_path_buf();
    cfg.edt_down = false;
    let pol = Valve::load(&cfg)?;
    for v in [&edt, &pol] {
        fill(v, 1000)?;
        v.open(MacAddr(CLIENT), Allowance::default())?;
        v.open(
            MacAddr(LIMITED),
            Allowance {
                rates: Some(fast),
                ..Default::default()
            },
        )?;
    }
    let tcp_down = L4::Tcp {
        sport: 443,
        dport: 40000,
    };
    let classes: Vec<(&str, &Valve, Hook, Vec<u8>)> = vec![
        (
            "empty TC program (floor)",
            &edt,
            Hook::EmptyTc,
            Frame::new(CLIENT, GW).ipv4(CL4, NET4, tcp_up(), 1460),
        ),
        (
            "paid download, unshaped",
            &edt,
            Hook::TcEgress,
            Frame::new(GW, CLIENT).ipv4(NET4, CL4, tcp_down.clone(), 1460),
        ),
        (
            "paid download, EDT (fq)",
            &edt,
            Hook::TcEgress,
            Frame::new(GW, LIMITED).ipv4(NET4, CL4, tcp_down.clone(), 1460),
        ),
        (
            "paid download, policed (no fq)",
            &pol,
            Hook::TcEgress,
            Frame::new(GW, LIMITED).ipv4(NET4, CL4, tcp_down, 1460),
        ),
        (
            "paid upload, unshaped",
            &edt,
            Hook::TcIngress,
            Frame::new(CLIENT, GW).ipv4(CL4, NET4, tcp_up(), 1460),
        ),
        (
            "paid upload, policed",
            &edt,
            Hook::TcIngress,
            Frame::new(LIMITED, GW).ipv4(CL4, NET4, tcp_up(), 1460),
        ),
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); classes.len()];
    for r in 0..o.runs {
        eprintln!("[bench] shaping run {}/{}", r + 1, o.runs);
        for (i, (_, v, hook, frame)) in classes.iter().enumerate() {
            let t = v.test_run(*hook, frame, o.repeat)?;
            samples[i].push(t.duration.as_nanos() as f64);
        }
    }
    let floor = stats(&samples[0]).median;
    writeln!(
        out,
        "### Rate limits: ns per packet ({} runs × {} repeats, interleaved; 1 000 entries)\n",
        o.runs, o.repeat
    )?;
    writeln!(
        out,
        "Shaped at the largest rate (≈ 34 Gbit/s): the repeats outrun it, so the policed rows \
         are mostly the drop path after the burst (the same arithmetic, then a drop).\n"
    )?;
    writeln!(
        out,
        "| packet class | median ns | IQR ns | program cost ns |"
    )?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for (i, (name, ..)) in classes.iter().enumerate() {
        cost_row(out, name, &stats(&samples[i]), floor)?;
    }
    writeln!(out)?;
    drop((edt, pol));

    // Real traffic: the measured client capped among SHAPED_NEIGHBOURS other shaped clients
    // (idle: the maps hold them, as a café's do); its rate error each way.
    let lab = Lab3::new("bshape");
    let pins = PinBase::new("bench-shape-rate");
    let mut gcfg = gateway_cfg(&pins, 4096);
    let mode = lab
        .gateway
        .run(|| tollgate::shaping::Lan::prepare(LAN_IFACE, false))?;
    gcfg.edt_down = mode.mode() == tollgate::shaping::DownMode::Edt;
    let valve = attach(&lab, &gcfg)?;
    let neighbour = Rates {
        down_kbit: 10_000,
        up_kbit: 10_000,
    };
    fill_with(
        &valve,
        SHAPED_NEIGHBOURS,
        Allowance {
            rates: Some(neighbour),
            ..Default::default()
        },
    )?;
    let (down_kbit, up_kbit) = (5_000, 2_000);
    valve.open(
        MacAddr(lab.client_mac()),
        Allowance {
            rates: Some(Rates { down_kbit, up_kbit }),
            ..Default::default()
        },
    )?;
    let secs = if o.quick { 5 } else { 10 };
    // The cap is on L3 bytes; iperf3 counts TCP payload (1448 of 1500 per segment).
    let payload = 1448.0 / 1500.0;
    let mut rows = Vec::new();
    for (dir, kbit, reverse) in [("download", down_kbit, true), ("upload", up_kbit, false)] {
        let bps = iperf_one(&lab, secs, reverse)?;
        let want = kbit as f64 * 1000.0 * payload;
        rows.push((dir, kbit, bps, want));
    }
    writeln!(
        out,
        "### Rate limits: one client capped at {down_kbit} kbit/s down and {up_kbit} kbit/s up \
         among {SHAPED_NEIGHBOURS} other shaped clients (each capped at {} kbit/s), one iperf3 \
         TCP flow each way, {secs} s (+2 omitted)\n",
        neighbour.down_kbit
    )?;
    writeln!(
        out,
        "Download held by {:?}; upload policed. Expected = the cap × 1448/1500 (iperf3 counts \
         TCP payload, the cap L3 bytes).\n",
        mode.mode()
    )?;
    writeln!(
        out,
        "| direction | cap kbit/s | goodput Mbit/s | expected | error |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (dir, kbit, bps, want) in &rows {
        writeln!(
            out,
            "| {dir} | {kbit} | {:.3} | {:.3} | {:+.1} % |",
            bps / 1e6,
            want / 1e6,
            (bps / want - 1.0) * 100.0
        )?;
    }
    let sum: f64 = rows.iter().map(|r| r.2).sum();
    let sum_want: f64 = rows.iter().map(|r| r.3).sum();
    writeln!(
        out,
        "| both (aggregate) | {} | {:.3} | {:.3} | {:+.1} % |\n",
        down_kbit + up_kbit,
        sum / 1e6,
        sum_want / 1e6,
        (sum / sum_want - 1.0) * 100.0
    )?;
    detach(valve);
    let _ = mode.remove();
    Ok(())
}

/// Other shaped clients in the maps beside the measured one in the rate-error row.
const SHAPED_NEIGHBOURS: u32 = 1_000;

/// One TCP flow from the client to the upstream (`reverse`: the download) for `secs` after 2
/// omitted: the receiver's bits per second.
fn iperf_one(lab: &Lab3, secs: u32, reverse: bool) -> Result<f64> {
    let _server = Server(
        lab.upstream
            .command("iperf3")
            .args(["-s", "-1", "-B", "10.78.0.2"])
            .stdout(std::process::Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut cmd = lab.client.command("iperf3");
    cmd.args(["-c", "10.78.0.2", "-O", "2", "-J", "-t", &secs.to_string()]);
    if reverse {
        cmd.arg("-R");
    }
    let outp = cmd.output().context("iperf3 client")?;
    let v: serde_json::Value = serde_json::from_slice(&outp.stdout)?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 json")
}

/// A paid upload whose headers are outside the linear area (only the Ethernet header linear,
/// as after GRO; `frames::send_nonlinear_n`) against its linear twin, through the attached TC
/// ingress program on a veth: `BPF_PROG_TEST_RUN` cannot build such an skb, so the cost is
/// the kernel's `run_time_ns / run_cnt` (BPF_ENABLE_STATS, which adds its own two clock
/// reads per run to both arms), the arms interleaved in rounds.
fn nonlinear_table(o: &Opts, out: &mut String) -> Result<()> {
    use tollgate_tests::{
        frames::send_nonlinear_n,
        netns::{CLIENT_IP, UPSTREAM_IP},
    };
    let lab = Lab3::new("bnonlin");
    for (ns, dev) in [(&lab.client, "eth0"), (&lab.gateway, LAN_IFACE)] {
        ns.ip(&["link", "set", dev, "mtu", "9000"]);
    }
    let pins = PinBase::new("bench-nonlin");
    let valve = attach(&lab, &gateway_cfg(&pins, 4096))?;
    let mac = lab.client_mac();
    let gw_mac = lab.gateway.mac(LAN_IFACE);
    valve.open(MacAddr(mac), Allowance::default())?;
    let udp = L4::Udp {
        sport: 4000,
        dport: 9,
    };
    // 6000 L3 bytes: more than a page, so AF_PACKET leaves only the 14-byte Ethernet header
    // linear; 1500: the whole frame linear. Same headers, same verdict (paid).
    let nonlinear = Frame::new(mac, gw_mac).ipv4(CLIENT_IP, UPSTREAM_IP, udp.clone(), 6000 - 28);
    let linear = Frame::new(mac, gw_mac).ipv4(CLIENT_IP, UPSTREAM_IP, udp, 1500 - 28);
    let (rounds, per_round) = if o.quick { (5, 2_000) } else { (15, 10_000) };
    let _stats = Valve::enable_run_stats()?;
    let mut samples: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        eprintln!("[bench] non-linear round {}/{rounds}", r + 1);
        for (i, f) in [&linear, &nonlinear].into_iter().enumerate() {
            let (t0, n0) = valve.run_stats(Hook::TcIngress)?;
            let f = f.clone();
            lab.client
                .run(move || send_nonlinear_n("eth0", &f, per_round))?;
            let (t1, n1) = valve.run_stats(Hook::TcIngress)?;
            if n1 > n0 {
                samples[i].push((t1 - t0) as f64 / (n1 - n0) as f64);
            }
        }
    }
    let v = valve.verdicts()?;
    writeln!(
        out,
        "### Non-linear skb: a paid upload with its headers outside the linear area, real \
         TC ingress on a veth ({rounds} rounds × {per_round} frames per arm, interleaved; \
         `BPF_ENABLE_STATS` run_time_ns / run_cnt, its own clock reads included)\n"
    )?;
    writeln!(out, "| frame | median ns per run | IQR ns |")?;
    writeln!(out, "|---|---:|---:|")?;
    for (i, name) in [
        "linear (1 500 B, all headers linear)",
        "non-linear (6 000 B, only Ethernet linear: pulled)",
    ]
    .into_iter()
    .enumerate()
    {
        let st = stats(&samples[i]);
        writeln!(
            out,
            "| {name} | {:.1} | {:.1}–{:.1} |",
            st.median, st.q1, st.q3
        )?;
    }
    writeln!(
        out,
        "\nVerdicts over both arms: pass_paid {}, drop_malformed {}.\n",
        v.packets(tollgate::valve::Verdict::PassPaid),
        v.packets(tollgate::valve::Verdict::DropMalformed)
    )?;
    detach(valve);
    Ok(())
}
