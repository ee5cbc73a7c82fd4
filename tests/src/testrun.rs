//! `BPF_PROG_TEST_RUN` labs: the data plane loaded (never attached) on `lo` with its own pins,
//! its pinned maps read behind the valve's back, and an older schema's pins made with bpftool
//! for the upgrade tests.
//!
//! ```text
//!  load(tag, |cfg| ..)          ──> Valve::load on lo, pins under a fresh PinBase
//!  pinned_policy(&pins, mac) / raw_usage(&pins, mac) / write_pinned_record(&pins, r, p)
//!                               <─> the current schema's pinned policy table / USAGE[slot]
//!  OldPins::new(&pins, "v3")    ──> <pins>/v3/: `create` maps, `update` entries (bpftool),
//!                                   in whatever layout the test writes byte by byte
//! ```

use std::path::PathBuf;

use aya::maps::{Array, Map, MapData};
use tollgate::valve::{Valve, ValveConfig};
use tollgate_common::{index, maps, MacKey, Policy, Usage, SCHEMA_VERSION};

use crate::pins::PinBase;

/// Loads the data plane on `lo` (for `BPF_PROG_TEST_RUN`) with pins under a fresh
/// [`PinBase`] named after `tag`; `change` sets the rest of the configuration.
pub fn load(tag: &str, change: impl FnOnce(&mut ValveConfig)) -> (Valve, PinBase) {
    let pins = PinBase::new(tag);
    let mut cfg = ValveConfig::new("lo");
    cfg.pin_base = pins.path().to_path_buf();
    change(&mut cfg);
    let valve = Valve::load(&cfg).expect("load the eBPF object (root and BPF required)");
    (valve, pins)
}

fn pinned_array<V: aya::Pod>(pins: &PinBase, map: &str) -> Array<MapData, V> {
    let path = pins.path().join(format!("v{SCHEMA_VERSION}")).join(map);
    let md = MapData::from_pin(&path).expect("pinned map");
    Array::try_from(Map::Array(md)).expect("an array")
}

/// `mac`'s record in the current schema's pinned policy table, found behind the valve's back
/// the way the kernel finds it (its index walk): the record's number and the policy.
pub fn pinned_policy(pins: &PinBase, mac: [u8; 6]) -> Option<(u32, Policy)> {
    let (idx, rec) = (
        pinned_array::<u64>(pins, maps::INDEX),
        pinned_array::<Policy>(pins, maps::POLICY),
    );
    let word = |i: u32| idx.get(&i, 0).expect("index word");
    let key = MacKey::new(mac).word();
    let (home, fp) = index::hash(key, word(0), word(1));
    for pos in index::HEADER + home as u32..index::HEADER + home as u32 + index::MAX_PROBE {
        let e = word(pos);
        if e == 0 {
            return None;
        }
        if let Some(r) = index::record(e).filter(|_| e >> index::RECORD_BITS == fp) {
            let p = rec.get(&r, 0).expect("record");
            if p.mac == key {
                return Some((r, p));
            }
        }
    }
    None
}

/// Overwrites record `r` of the pinned policy table in place (a stale or hostile writer).
pub fn write_pinned_record(pins: &PinBase, r: u32, p: Policy) {
    pinned_array::<Policy>(pins, maps::POLICY)
        .set(r, p, 0)
        .expect("write record");
}

/// The raw USAGE slot of `mac` (the kernel's shaping state included), read from the pins.
pub fn raw_usage(pins: &PinBase, mac: [u8; 6]) -> Usage {
    let slot = pinned_policy(pins, mac).expect("policy").1.slot;
    pinned_array::<Usage>(pins, maps::USAGE)
        .get(&slot, 0)
        .expect("usage slot")
}

/// Keeps the calling thread on `cpu` (so several threads running programs hit the maps from
/// different CPUs at once).
pub fn run_on_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// An older schema's pin directory (`<pins>/<version>/`), filled with bpftool the way that
/// release's daemon left it, for the upgrade tests.
pub struct OldPins {
    dir: PathBuf,
}

impl OldPins {
    pub fn new(pins: &PinBase, version: &str) -> Self {
        let dir = pins.path().join(version);
        std::fs::create_dir_all(&dir).expect("old schema pin dir");
        Self { dir }
    }

    /// Where `map` is pinned.
    pub fn path(&self, map: &str) -> PathBuf {
        self.dir.join(map)
    }

    /// `bpftool map create` of `map` (`kind`: hash, array, ...), pinned and named `map`.
    pub fn create(&self, map: &str, kind: &str, key: usize, value: usize, entries: u32) {
        let path = self.path(map);
        bpftool(&[
            "map".into(),
            "create".into(),
            path.to_string_lossy().into_owned(),
            "type".into(),
            kind.into(),
            "key".into(),
            key.to_string(),
            "value".into(),
            value.to_string(),
            "entries".into(),
            entries.to_string(),
            "name".into(),
            map.into(),
        ]);
    }

    /// `bpftool map update` of one entry, key and value as raw bytes.
    pub fn update(&self, map: &str, key: &[u8], value: &[u8]) {
        let mut args: Vec<String> = vec![
            "map".into(),
            "update".into(),
            "pinned".into(),
            self.path(map).to_string_lossy().into_owned(),
            "key".into(),
        ];
        args.extend(key.iter().map(|b| b.to_string()));
        args.push("value".into());
        args.extend(value.iter().map(|b| b.to_string()));
        bpftool(&args);
    }
}

fn bpftool(args: &[String]) {
    let o = std::process::Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool");
    assert!(o.status.success(), "bpftool {args:?}: {o:?}");
}
