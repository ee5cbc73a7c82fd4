//! `cargo xtask bench dataplane`: data-plane cost, measured side by side in one invocation.
//!
//! 1. `BPF_PROG_TEST_RUN` ns/packet for each packet class at 1 % and 100 % of 100 000 clients.
//! 2. iperf3 TCP throughput client → gateway → upstream in a three-namespace lab: no program,
//!    tollgate TC and tollgate XDP, at 1, 1 000 and 10 000 clients in the maps.
//!
//! Prints a Markdown report and writes it to `BENCHMARKS.md` (section "Data plane").

use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use anyhow::{bail, Context, Result};
use tollgate::valve::{Allowance, DataPlaneMode, Gates, Hook, MacAddr, Valve, ValveConfig};
use tollgate_tests::{
    frames::{Frame, L4},
    netns::{Lab3, LAN_IFACE},
    pins::PinBase,
};

const FILL_MAX: u32 = 100_000;
const REPEAT: u32 = 200_000;

fn dummy_mac(i: u32) -> MacAddr {
    let b = i.to_be_bytes();
    MacAddr([0x0a, 0xee, b[0], b[1], b[2], b[3]])
}

fn fill(valve: &Valve, n: u32) -> Result<()> {
    for i in 0..n {
        valve.open(dummy_mac(i), Allowance::default())?;
    }
    Ok(())
}

fn testrun_table(out: &mut String) -> Result<()> {
    let client = [0x02, 0, 0, 0, 0, 0x11];
    let gw = [0x02, 0, 0, 0, 0, 0x01];
    let cl4 = Ipv4Addr::new(10, 0, 0, 2);
    let gw4 = Ipv4Addr::new(10, 0, 0, 1);
    let net4 = Ipv4Addr::new(198, 51, 100, 7);
    let up = Frame::new(client, gw);
    let stranger = Frame::new([0x02, 0, 0, 0, 0, 0x99], gw);
    let tcp = L4::Tcp {
        sport: 40000,
        dport: 443,
    };
    let classes: Vec<(&str, Hook, Vec<u8>)> = vec![
        (
            "paid IPv4 TCP upload (1500 B)",
            Hook::TcIngress,
            up.ipv4(cl4, net4, tcp.clone(), 1460),
        ),
        (
            "paid IPv4 TCP download (1500 B)",
            Hook::TcEgress,
            Frame::new(gw, client).ipv4(
                net4,
                cl4,
                L4::Tcp {
                    sport: 443,
                    dport: 40000,
                },
                1460,
            ),
        ),
        (
            "paid IPv6 TCP upload",
            Hook::TcIngress,
            up.ipv6(
                "fd00::2".parse()?,
                "2001:db8::7".parse()?,
                &[],
                tcp.clone(),
                1400,
            ),
        ),
        (
            "paid VLAN-tagged IPv4",
            Hook::TcIngress,
            up.clone().vlan(7).ipv4(cl4, net4, tcp.clone(), 1460),
        ),
        (
            "paid, XDP ingress",
            Hook::XdpIngress,
            up.ipv4(cl4, net4, tcp.clone(), 1460),
        ),
        (
            "unpaid, dropped",
            Hook::TcIngress,
            stranger.ipv4(cl4, net4, tcp.clone(), 1460),
        ),
        (
            "unpaid DNS to gateway (garden)",
            Hook::TcIngress,
            stranger.ipv4(
                cl4,
                gw4,
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
            stranger.ipv4(cl4, Ipv4Addr::new(203, 0, 113, 9), tcp.clone(), 1460),
        ),
        (
            "unpaid IPv6 behind 3 ext. headers",
            Hook::TcIngress,
            stranger.ipv6(
                "fd00::2".parse()?,
                "2001:db8::7".parse()?,
                &[0, 60, 43],
                tcp,
                1400,
            ),
        ),
        ("ARP", Hook::TcIngress, stranger.arp()),
    ];
    let fills = [FILL_MAX / 100, FILL_MAX];
    let mut rows: Vec<(String, Vec<f64>)> =
        classes.iter().map(|c| (c.0.to_string(), vec![])).collect();
    for n in fills {
        let pins = PinBase::new("bench-testrun");
        let mut cfg = ValveConfig::new("lo");
        cfg.pin_base = pins.path().to_path_buf();
        cfg.gateway_v4 = Some(gw4);
        cfg.garden = vec!["203.0.113.0/24".parse()?];
        let valve = Valve::load(&cfg)?;
        eprintln!("[bench] filling {n} clients");
        fill(&valve, n - 1)?;
        valve.open(MacAddr(client), Allowance::default())?;
        for (i, (_, hook, frame)) in classes.iter().enumerate() {
            let r = valve.test_run(*hook, frame, REPEAT)?;
            rows[i].1.push(r.duration.as_nanos() as f64);
        }
    }
    writeln!(
        out,
        "### BPF_PROG_TEST_RUN, ns per packet (kernel-measured, {REPEAT} repeats)\n"
    )?;
    writeln!(
        out,
        "| packet class | {} clients (1 %) | {} clients (100 %) |",
        fills[0], fills[1]
    )?;
    writeln!(out, "|---|---:|---:|")?;
    for (name, v) in rows {
        writeln!(out, "| {name} | {:.0} | {:.0} |", v[0], v[1])?;
    }
    writeln!(out)?;
    Ok(())
}

/// One iperf3 run (3 s, one TCP flow), client → upstream, or reverse. Gbit/s.
fn iperf(lab: &Lab3, reverse: bool) -> Result<f64> {
    let mut cmd = lab.client.command("iperf3");
    cmd.args(["-c", "10.78.0.2", "-t", "3", "-J"]);
    if reverse {
        cmd.arg("-R");
    }
    let out = cmd.output().context("iperf3 client")?;
    if !out.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 json")?;
    Ok(bps / 1e9)
}

fn throughput_table(out: &mut String) -> Result<()> {
    let lab = Lab3::new("bench");
    let mut server = lab
        .upstream
        .command("iperf3")
        .args(["-s", "-B", "10.78.0.2"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("iperf3 server (apt-get install iperf3)")?;
    std::thread::sleep(Duration::from_millis(500));
    let client_mac = MacAddr(lab.client_mac());
    let mut rows = Vec::new();
    let base = (iperf(&lab, false)?, iperf(&lab, true)?);
    rows.push(("no program".to_string(), base));
    for mode in [DataPlaneMode::Tc, DataPlaneMode::Xdp] {
        for n in [1u32, 1_000, 10_000] {
            let pins = PinBase::new("bench-iperf");
            let mut cfg = ValveConfig::new(LAN_IFACE);
            cfg.pin_base = pins.path().to_path_buf();
            cfg.mode = mode;
            cfg.gateway_v4 = Some(Ipv4Addr::new(10, 77, 0, 1));
            let valve = {
                let cfg = cfg.clone();
                lab.gateway.run(move || Valve::attach(&cfg))?
            };
            fill(&valve, n - 1)?;
            valve.open(client_mac, Allowance::default())?;
            let r = (iperf(&lab, false)?, iperf(&lab, true)?);
            let g = valve.gate(client_mac)?.context("client gate")?;
            eprintln!(
                "[bench] {mode:?} {n}: {r:?}, metered {} bytes",
                g.usage.bytes()
            );
            rows.push((
                format!(
                    "tollgate {}, {n} clients",
                    format!("{mode:?}").to_uppercase()
                ),
                r,
            ));
            drop(valve);
            drop(pins); // unpin: the links detach
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    writeln!(
        out,
        "### TCP throughput through the gateway (iperf3, one flow, 3 s, Gbit/s)\n"
    )?;
    writeln!(
        out,
        "| setup | upload (client → upstream) | × baseline | download (-R) | × baseline |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (name, (u, d)) in rows {
        writeln!(
            out,
            "| {name} | {u:.2} | {:.3} | {d:.2} | {:.3} |",
            u / base.0,
            d / base.1
        )?;
    }
    writeln!(out)?;
    Ok(())
}

fn main() -> Result<()> {
    let mut out = String::new();
    let m = tollgate_tests::bench::machine();
    writeln!(out, "## Data plane\n")?;
    writeln!(
        out,
        "{} Single runs: read the ratios rather than the absolute numbers.\n",
        m.describe("cargo xtask bench dataplane")
    )?;
    testrun_table(&mut out)?;
    throughput_table(&mut out)?;
    print!("{out}");
    let path = tollgate_tests::bench::write_section("## Data plane", &out)?;
    eprintln!("[bench] wrote {path}");
    Ok(())
}
