//! The built-in simulator: goflow2 JSON flows and siteflow probe results for every site, as bytes.
//!
//! Deterministic from its seed. Each site's router exports its own flows; sites take turns, so
//! each gets the same share of records, and each record carries `u × capacity / record rate`
//! bytes scaled by a random factor in [0.5, 1], where `u` follows the working day (Vietnam time),
//! so a site's traffic never exceeds its link. Exporters sample at 1, 100 or 1000 and the
//! records carry the sampled counts, as real exporters do. A few records arrive out of order
//! (within the lateness), too late (beyond it), or between addresses of no site.
//!
//! With ground truth enabled, the simulator tallies what a correct pipeline must report.

pub mod scenario;

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

pub use scenario::{Effect, Scenario};

use super::Source;
use crate::config::{Pace, SimulatorConfig};
use crate::enrich::Direction;
use crate::inventory::{Inventory, SiteIdx};
use crate::types::Format;
use crate::types::{Messages, PartitionId, SourceBatch};
use crate::window::{WindowSpec, window_start};

const NS: i64 = 1_000_000_000;
/// The simulator is one partition.
pub const PARTITION: PartitionId = 0;
/// Exporter of flows between addresses of no site.
const STRAY_EXPORTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 250);
/// Hosts of sites without prefixes (RFC 6598 shared address space). Their routers' flows enter
/// from the rest of the network through interface 2 and leave through it (`uplink_ifindex: 2`).
const BEHIND_ROUTERS: IpNet = IpNet::V4(ipnet::Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10));
/// The province's conference MCU (in the Department of Information and Communications' prefix).
const MCU: Ipv4Addr = Ipv4Addr::new(10, 100, 19, 10);
/// Sampling rates handed out to exporters in turn.
pub const SAMPLING_RATES: [u32; 3] = [1, 100, 1000];

/// Per (site, direction, window start) sums that a correct pipeline must report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub bytes: u64,
    pub packets: u64,
    pub records: u64,
}

/// What the simulator emitted, by its own count.
#[derive(Debug, Default, Clone)]
pub struct GroundTruth {
    pub flows: HashMap<(SiteIdx, Direction, i64), Tally>,
    /// The scenario's top-talker conversations, per (site, direction, window start): part of `flows`.
    pub talkers: HashMap<(SiteIdx, Direction, i64), Tally>,
    /// Probe results per (site, window start).
    pub probes: HashMap<(SiteIdx, i64), u64>,
    pub flow_records: u64,
    pub probe_records: u64,
    /// Interface samples of the sites' uplinks (Telegraf SNMP), one per uplink and probe round.
    pub counter_records: u64,
    pub late_flows: u64,
    pub unmatched_flows: u64,
}

/// The simulator source.
pub struct Simulator {
    cfg: SimulatorConfig,
    window: WindowSpec,
    inventory: Arc<Inventory>,
    scenario: Scenario,
    rng: fastrand::Rng,
    /// Sites in the order they take turns.
    order: Vec<SiteIdx>,
    turn: usize,
    /// Direction each site's next record goes (they alternate).
    next_out: Vec<bool>,
    /// Ground truth's view of event time: each exporter's newest flow end, and the newest of all.
    exporter_clocks: std::collections::HashMap<IpAddr, i64>,
    newest_flow_ns: i64,
    /// Per-site traffic factor in [0.6, 1].
    site_factor: Vec<f64>,
    start_ns: i64,
    end_ns: Option<i64>,
    /// Flow records generated so far (including skipped ones of sites in outage).
    generated: u64,
    next_probe_ns: i64,
    /// The uplinks' samples of the probe round just handed out, handed out next.
    pending_interfaces: Option<SourceBatch>,
    /// Each site's uplink octet counters `[in, out]`: every byte its records carry, sampled or
    /// not, late or not (the link carried them).
    octets: Vec<[u64; 2]>,
    sequence: u32,
    wall_start: Instant,
    truth: Option<Arc<Mutex<GroundTruth>>>,
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// Share of link capacity in use at a given hour of the day (Vietnam time, UTC+7), interpolated.
pub fn daily_utilisation(t_ns: i64) -> f64 {
    // Hours 0..24: quiet nights, busy office hours with a lunch dip.
    const SHAPE: [f64; 25] = [
        0.05, 0.04, 0.04, 0.04, 0.04, 0.05, 0.10, 0.25, 0.50, 0.60, 0.62, 0.55, 0.35, 0.40, 0.60, 0.62, 0.58, 0.40, 0.25, 0.20, 0.15, 0.10,
        0.08, 0.06, 0.05,
    ];
    let secs_of_day = (t_ns / NS + 7 * 3600).rem_euclid(86_400) as f64;
    let h = secs_of_day / 3600.0;
    let i = h.floor() as usize;
    SHAPE[i] + (SHAPE[i + 1] - SHAPE[i]) * (h - i as f64)
}

fn host_in(net: &IpNet, host: u32) -> Ipv4Addr {
    match net {
        IpNet::V4(n) => {
            let size = 1u64 << (32 - n.prefix_len());
            let offset = if size <= 2 { 0 } else { 1 + u64::from(host) % (size - 2) };
            Ipv4Addr::from(u32::from(n.network()) + offset as u32)
        }
        // The simulator speaks IPv4; an IPv6-only site gets flows through its IPv4 prefix if any.
        IpNet::V6(_) => Ipv4Addr::new(198, 18, 0, 1),
    }
}

impl Simulator {
    /// A simulator over `inventory`; `window` tells it how late "too late" must be.
    pub fn new(cfg: SimulatorConfig, window: WindowSpec, inventory: Arc<Inventory>, scenario: Scenario) -> Self {
        let mut rng = fastrand::Rng::with_seed(cfg.seed);
        let mut order: Vec<SiteIdx> = (0..inventory.len() as SiteIdx).collect();
        rng.shuffle(&mut order);
        let site_factor = (0..inventory.len()).map(|_| 0.6 + 0.4 * rng.f64()).collect();
        let duration_ns = cfg.duration_secs.map(|d| d as i64 * NS);
        let start_ns = match (cfg.start_unix_secs, cfg.pace) {
            (Some(s), _) => s as i64 * NS,
            (None, Pace::Realtime) => now_ns(),
            (None, Pace::Fast) => (now_ns() - duration_ns.unwrap_or(0)).div_euclid(NS) * NS,
        };
        Self {
            next_out: vec![false; inventory.len()],
            exporter_clocks: std::collections::HashMap::new(),
            newest_flow_ns: i64::MIN,
            window,
            scenario,
            rng,
            order,
            turn: 0,
            site_factor,
            start_ns,
            end_ns: duration_ns.map(|d| start_ns + d),
            generated: 0,
            next_probe_ns: start_ns,
            pending_interfaces: None,
            // Counters start anywhere: a device has been counting long before.
            octets: (0..inventory.len() as u64).map(|i| [i * 1_000_000_007, i * 999_999_937]).collect(),
            sequence: 0,
            wall_start: Instant::now(),
            truth: None,
            inventory,
            cfg,
        }
    }

    /// Makes the simulator tally the ground truth; returns the shared tally.
    pub fn track_truth(&mut self) -> Arc<Mutex<GroundTruth>> {
        let truth = Arc::new(Mutex::new(GroundTruth::default()));
        self.truth = Some(truth.clone());
        truth
    }

    pub fn start_ns(&self) -> i64 {
        self.start_ns
    }

    /// Event time of the `i`-th flow record.
    fn time_of(&self, i: u64) -> i64 {
        self.start_ns + (i128::from(i) * i128::from(NS) / i128::from(self.cfg.records_per_sec)) as i64
    }

    /// Flow records due by now (realtime pace).
    fn due_by_wall_clock(&self) -> u64 {
        (self.wall_start.elapsed().as_secs_f64() * self.cfg.records_per_sec as f64) as u64
    }

    fn finished(&self, t: i64) -> bool {
        self.end_ns.is_some_and(|end| t >= end)
    }

    fn effects(&self, site: SiteIdx, t: i64) -> impl Iterator<Item = &Effect> {
        self.scenario.active(site, t - self.start_ns)
    }

    fn probe_batch(&mut self, t: i64) -> Messages {
        let mut msgs = Messages::with_capacity(self.inventory.len(), self.inventory.len() * 160);
        let window_start_ns = window_start(t, self.window.size_ns());
        for s in 0..self.inventory.len() as SiteIdx {
            // Baselines by position in the hierarchy: the top level (province) is next to the
            // MCU, the bottom one (communes) furthest, any level between like districts.
            let depth = self.inventory.level_depth(&self.inventory.site(s).level).unwrap_or(0);
            let (mut rtt, mut jitter, mut loss) = if depth == 0 {
                (3.0, 0.8, 0.0)
            } else if depth + 1 == self.inventory.levels().len() {
                (28.0, 4.0, 0.0)
            } else {
                (12.0, 2.0, 0.0)
            };
            rtt *= 0.8 + 0.4 * self.rng.f64();
            jitter *= 0.5 + self.rng.f64();
            if self.rng.f64() < 0.02 {
                loss = 0.5;
            }
            // Congestion's queueing multiplies the baseline; a value a fault sets (high_rtt,
            // jitter, loss) replaces it, the last active fault in file order winning.
            let mut silent = false;
            let mut cut_off = false;
            let (mut set_rtt, mut set_jitter, mut set_loss) = (None, None, None);
            for effect in self.scenario.active(s, t - self.start_ns) {
                match *effect {
                    Effect::Outage | Effect::ProbeOutage => silent = true,
                    Effect::LinkDown | Effect::CutOff => cut_off = true,
                    Effect::HighRtt { rtt_ms } => set_rtt = Some(rtt_ms),
                    Effect::Jitter { jitter_ms } => set_jitter = Some(jitter_ms),
                    Effect::Loss { loss_pct } => set_loss = Some(loss_pct),
                    Effect::Congestion { .. } => {
                        rtt *= 4.0;
                        jitter *= 3.0;
                    }
                    Effect::TopTalker { .. } | Effect::SamplingMissing | Effect::LinkSpeed { .. } => {}
                }
            }
            if let Some(v) = set_rtt {
                rtt = v * (0.9 + 0.2 * self.rng.f64());
            }
            if let Some(v) = set_jitter {
                jitter = v * (0.9 + 0.2 * self.rng.f64());
            }
            if let Some(v) = set_loss {
                loss = v;
            }
            if silent {
                continue;
            }
            // Nothing answers a cut-off site's probes: every packet of the round is lost.
            if cut_off {
                (rtt, jitter, loss) = (0.0, 0.0, 100.0);
            }
            let site = &self.inventory.site(s).id;
            let _ = write!(
                msgs.buffer(),
                r#"{{"site":"{site}","time_ms":{},"target":"mcu.hagiang","rtt_ms":{rtt:.3},"jitter_ms":{jitter:.3},"loss_pct":{loss:.2},"sent":10}}"#,
                t / 1_000_000
            );
            msgs.end_message();
            if let Some(truth) = &self.truth {
                let mut truth = truth.lock().expect("truth lock");
                truth.probe_records += 1;
                *truth.probes.entry((s, window_start_ns)).or_default() += 1;
            }
        }
        msgs
    }

    /// Telegraf SNMP samples of every site's uplinks at `t` (inventory `uplinks`): octet
    /// counters, link state and speed. A site whose uplink is down reports it down with its
    /// counters still; a site cut off behind one, or silent, reports nothing.
    fn interface_batch(&mut self, t: i64) -> Messages {
        let mut msgs = Messages::with_capacity(self.inventory.len(), self.inventory.len() * 200);
        let mut count = 0;
        for s in 0..self.inventory.len() as SiteIdx {
            let mut oper = 1;
            let mut silent = false;
            let mut mbps = f64::from(self.inventory.site(s).link_mbps);
            for effect in self.scenario.active(s, t - self.start_ns) {
                match effect {
                    Effect::LinkDown => oper = 2,
                    Effect::LinkSpeed { mbps: m } => mbps = *m,
                    Effect::Outage | Effect::CutOff => silent = true,
                    _ => {}
                }
            }
            if silent {
                continue;
            }
            let site = self.inventory.site(s);
            let [in_octets, out_octets] = self.octets[usize::from(s)];
            for uplink in &site.uplinks {
                let _ = write!(
                    msgs.buffer(),
                    r#"{{"fields":{{"ifHCInOctets":{in_octets},"ifHCOutOctets":{out_octets},"ifOperStatus":{oper},"ifHighSpeed":{}}},"name":"interface","tags":{{"agent_host":"{}","ifName":"{}"}},"timestamp":{}}}"#,
                    mbps.round() as u64,
                    uplink.device,
                    uplink.interface,
                    t / NS
                );
                msgs.end_message();
                count += 1;
            }
        }
        if let Some(truth) = &self.truth {
            truth.lock().expect("truth lock").counter_records += count;
        }
        msgs
    }

    /// Writes the `i`-th flow record, or nothing when its site is silent.
    fn write_flow(&mut self, i: u64, msgs: &mut Messages, truth: &mut Option<std::sync::MutexGuard<'_, GroundTruth>>) {
        let t = self.time_of(i);
        let site_idx = self.order[self.turn];
        self.turn = (self.turn + 1) % self.order.len();
        let mut utilisation = daily_utilisation(t) * self.site_factor[usize::from(site_idx)];
        let mut noise = 0.5 + 0.5 * self.rng.f64();
        let mut talker = None;
        let mut sampling_missing = false;
        // The direction this record goes (records of a site alternate in and out).
        let outbound = self.next_out[usize::from(site_idx)];
        let direction = if outbound { Direction::Out } else { Direction::In };
        for effect in self.effects(site_idx, t) {
            match *effect {
                Effect::Outage | Effect::LinkDown | Effect::CutOff => return,
                Effect::Congestion { utilisation: u, direction: d } if d.is_none_or(|d| d == direction) => {
                    utilisation = u;
                    noise = 0.97 + 0.03 * noise;
                }
                // Every record whose index falls in the share (no random draw: other sites'
                // traffic stays the same with or without this fault).
                Effect::TopTalker { peer, share } if (i % 1000) < (share * 1000.0) as u64 => talker = Some(peer),
                Effect::SamplingMissing => sampling_missing = true,
                _ => {}
            }
        }
        let site = self.inventory.site(site_idx);
        let stray = self.rng.f64() < self.cfg.unmatched_ratio;
        // Event time: mostly now; some out of order within the lateness; a few far too late.
        let lateness = self.window.allowed_lateness.as_nanos() as i64;
        let mut event_t = t;
        if i > 1_000 && self.rng.f64() < self.cfg.too_late_ratio {
            event_t = t - (lateness + self.window.size_ns() + NS + self.rng.i64(0..30 * NS));
        } else if self.rng.f64() < self.cfg.out_of_order_ratio {
            event_t = t - self.rng.i64(0..(self.cfg.max_out_of_order_ms as i64 * 1_000_000).max(1));
        }
        let sampling = SAMPLING_RATES[usize::from(site_idx) % SAMPLING_RATES.len()];
        let per_direction_rate = self.cfg.records_per_sec as f64 / self.inventory.len() as f64 / 2.0;
        let true_bytes = (utilisation * site.capacity_bytes_per_sec() / per_direction_rate * noise).max(64.0) as u64;
        let bytes = (true_bytes / u64::from(sampling)).max(1);
        let packets = (true_bytes / 1_000 / u64::from(sampling)).max(1);
        if !stray {
            self.octets[usize::from(site_idx)][usize::from(outbound)] += bytes * u64::from(sampling);
        }

        self.next_out[usize::from(site_idx)] = !outbound;
        // A site without prefixes (a router as a site) gets hosts of the shared address space.
        let prefix = site.prefixes.first().copied().unwrap_or(BEHIND_ROUTERS);
        let local = host_in(&prefix, self.rng.u32(..));
        let remote = if self.rng.f64() < 0.2 && !prefix.contains(&std::net::IpAddr::V4(MCU)) {
            MCU
        } else {
            Ipv4Addr::new(203, 0, 113, self.rng.u8(1..255))
        };
        // A top talker is one conversation: the peer and one local host (the site's first + 9).
        let (local, remote) = match talker {
            Some(peer) => (host_in(&prefix, 9), peer),
            None => (local, remote),
        };
        let (exporter, src, dst) = if stray {
            // Between two addresses of no site (never the MCU, which is a site's address).
            (IpAddr::V4(STRAY_EXPORTER), Ipv4Addr::new(198, 51, 100, self.rng.u8(1..255)), Ipv4Addr::new(203, 0, 113, self.rng.u8(1..255)))
        } else {
            let exporter = site.exporter.unwrap_or(IpAddr::V4(STRAY_EXPORTER));
            if outbound { (exporter, local, remote) } else { (exporter, remote, local) }
        };
        let (in_if, out_if) = if outbound { (1, 2) } else { (2, 1) };
        let (proto, src_port, dst_port) = match self.rng.u8(0..10) {
            0..=6 => ("TCP", self.rng.u16(32768..61000), 443),
            7..=8 => ("UDP", self.rng.u16(32768..61000), 3478),
            _ => ("ICMP", 0, 0),
        };
        // The talker's conversation is one HTTPS download (the draws above still happen).
        let (proto, src_port, dst_port) = if talker.is_some() { ("TCP", 51000, 443) } else { (proto, src_port, dst_port) };
        self.sequence = self.sequence.wrapping_add(1);
        let sampling_field = if sampling_missing { 0 } else { sampling };
        let _ = write!(
            msgs.buffer(),
            r#"{{"type":"NETFLOW_V9","time_received_ns":{},"sequence_num":{},"sampling_rate":{sampling_field},"sampler_address":"{exporter}","time_flow_start_ns":{},"time_flow_end_ns":{event_t},"bytes":{bytes},"packets":{packets},"src_addr":"{src}","dst_addr":"{dst}","etype":"IPv4","proto":"{proto}","src_port":{src_port},"dst_port":{dst_port},"in_if":{in_if},"out_if":{out_if},"src_mac":"00:00:00:00:00:00","dst_mac":"00:00:00:00:00:00","ip_tos":0,"tcp_flags":0,"src_as":0,"dst_as":0,"src_net":"0.0.0.0/0","dst_net":"0.0.0.0/0"}}"#,
            t + 500_000_000,
            self.sequence,
            event_t - 2 * NS,
        );
        msgs.end_message();

        if let Some(truth) = truth {
            truth.flow_records += 1;
            // The lateness rule, from its definition: behind its own exporter's newest record by
            // more than the lateness, or behind the newest record of all by the horizon.
            let end = window_start(event_t, self.window.size_ns()) + self.window.size_ns();
            let own = self.exporter_clocks.get(&exporter).copied();
            let horizon = self.window.correction_horizon.max(self.window.allowed_lateness).as_nanos() as i64;
            let late = own.is_some_and(|m| end <= m - lateness)
                || (self.newest_flow_ns != i64::MIN && end <= self.newest_flow_ns.saturating_sub(horizon));
            if !stray {
                let clock = self.exporter_clocks.entry(exporter).or_insert(event_t);
                *clock = (*clock).max(event_t);
                self.newest_flow_ns = self.newest_flow_ns.max(event_t);
            }
            if stray {
                truth.unmatched_flows += 1;
            } else if late {
                truth.late_flows += 1;
            } else {
                let key = (site_idx, direction, window_start(event_t, self.window.size_ns()));
                let add = |tally: &mut Tally| {
                    tally.bytes += bytes * u64::from(sampling);
                    tally.packets += packets * u64::from(sampling);
                    tally.records += 1;
                };
                add(truth.flows.entry(key).or_default());
                if talker.is_some() {
                    add(truth.talkers.entry(key).or_default());
                }
            }
        }
    }

    /// Produces the next batch: probe results when a probe round is due, else flow records.
    pub async fn next(&mut self) -> Option<SourceBatch> {
        loop {
            if let Some(batch) = self.pending_interfaces.take() {
                return Some(batch);
            }
            let t = self.time_of(self.generated);
            if self.finished(t) {
                return None;
            }
            if t >= self.next_probe_ns {
                let probe_t = self.next_probe_ns;
                self.next_probe_ns += self.cfg.probe_interval_secs as i64 * NS;
                let messages = self.probe_batch(probe_t);
                let interfaces = self.interface_batch(probe_t);
                if !interfaces.is_empty() {
                    self.pending_interfaces = Some(SourceBatch {
                        partition: PARTITION,
                        format: Format::TelegrafJson,
                        event_time: self.cfg.event_time,
                        messages: interfaces,
                        received: Instant::now(),
                        offsets: Vec::new(),
                    });
                }
                return Some(SourceBatch {
                    partition: PARTITION,
                    format: Format::SiteflowProbeJson,
                    event_time: self.cfg.event_time,
                    messages,
                    received: Instant::now(),
                    offsets: Vec::new(),
                });
            }
            let mut n = self.cfg.batch_records as u64;
            if self.cfg.pace == Pace::Realtime {
                // Hand out batches about every 100 ms: one small batch per record would make
                // the per-batch work (a DataFusion run) dominate.
                let min_batch = (self.cfg.records_per_sec / 10).clamp(1, n);
                let due = self.due_by_wall_clock();
                if due < self.generated + min_batch {
                    let missing = (self.generated + min_batch - due) as f64;
                    let wait = Duration::from_secs_f64(missing / self.cfg.records_per_sec as f64);
                    tokio::time::sleep(wait.clamp(Duration::from_millis(1), Duration::from_millis(100))).await;
                    continue;
                }
                n = n.min(due - self.generated);
            }
            // Stop at the next probe round or the end, so probes interleave in event-time order.
            let mut messages = Messages::with_capacity(n as usize, n as usize * 440);
            let truth = self.truth.clone();
            let mut guard = truth.as_ref().map(|t| t.lock().expect("truth lock"));
            for _ in 0..n {
                let t = self.time_of(self.generated);
                if t >= self.next_probe_ns || self.finished(t) {
                    break;
                }
                self.write_flow(self.generated, &mut messages, &mut guard);
                self.generated += 1;
            }
            drop(guard);
            if messages.is_empty() {
                continue;
            }
            return Some(SourceBatch {
                partition: PARTITION,
                format: Format::Goflow2Json,
                event_time: self.cfg.event_time,
                messages,
                received: Instant::now(),
                offsets: Vec::new(),
            });
        }
    }
}

impl Source for Simulator {
    fn next_batch(&mut self) -> impl std::future::Future<Output = Option<SourceBatch>> + Send {
        self.next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WindowSpec {
        WindowSpec {
            size: Duration::from_secs(10),
            allowed_lateness: Duration::from_secs(5),
            publish_delay: Duration::from_secs(5),
            max_exporter_skew: Duration::from_secs(60),
            correction_horizon: Duration::from_secs(600),
            idle_partition_timeout: Duration::from_secs(30),
        }
    }

    fn fast(seed: u64) -> SimulatorConfig {
        SimulatorConfig {
            seed,
            pace: Pace::Fast,
            start_unix_secs: Some(1_764_000_000),
            duration_secs: Some(20),
            records_per_sec: 500,
            ..Default::default()
        }
    }

    async fn all_bytes(mut sim: Simulator) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = sim.next().await {
            for m in b.messages.iter() {
                out.extend_from_slice(m);
                out.push(b'\n');
            }
        }
        out
    }

    #[tokio::test]
    async fn same_seed_same_records() {
        let inv = Arc::new(Inventory::embedded());
        let a = all_bytes(Simulator::new(fast(7), spec(), inv.clone(), Scenario::default())).await;
        let b = all_bytes(Simulator::new(fast(7), spec(), inv.clone(), Scenario::default())).await;
        let c = all_bytes(Simulator::new(fast(8), spec(), inv, Scenario::default())).await;
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.len() > 10_000 * 300, "20 s at 500/s plus probes");
    }

    /// A probe-only outage keeps the site's flows and drops its probes; one-direction
    /// congestion fills that direction only (23:00 in Vietnam: the other stays near idle).
    #[tokio::test]
    async fn probe_outage_and_one_direction_congestion() {
        let inv = Arc::new(Inventory::embedded());
        let text = "faults:\n  - {kind: probe_outage, sites: [dong-van.lung-cu]}\n  - {kind: congestion, sites: [meo-vac.pai-lung], direction: in, utilisation: 0.95}\n";
        let scenario = Scenario::parse(text, "s.yaml", &inv).unwrap();
        let mut sim = Simulator::new(fast(7), spec(), inv.clone(), scenario);
        let truth = sim.track_truth();
        while sim.next().await.is_some() {}
        let truth = truth.lock().unwrap();
        let (lung_cu, pai_lung) = (inv.by_id("dong-van.lung-cu").unwrap(), inv.by_id("meo-vac.pai-lung").unwrap());
        assert!(!truth.probes.keys().any(|(s, _)| *s == lung_cu), "no probe results from the probe outage");
        assert!(truth.probes.keys().any(|(s, _)| *s == pai_lung));
        let bytes = |site, d| truth.flows.iter().filter(|((s, dir, _), _)| *s == site && *dir == d).map(|(_, t)| t.bytes).sum::<u64>();
        assert!(bytes(lung_cu, Direction::In) > 0 && bytes(lung_cu, Direction::Out) > 0, "flows continue");
        let capacity_20s = inv.site(pai_lung).capacity_bytes_per_sec() * 20.0;
        let (rin, rout) = (bytes(pai_lung, Direction::In) as f64 / capacity_20s, bytes(pai_lung, Direction::Out) as f64 / capacity_20s);
        assert!((0.8..1.05).contains(&rin), "congested direction at {rin} of capacity");
        assert!(rout < 0.1, "the other direction stays at the night's level: {rout}");
    }

    #[test]
    fn traffic_stays_under_capacity() {
        for h in 0..24 * 4 {
            let u = daily_utilisation(h * 900 * NS);
            assert!((0.0..=1.0).contains(&u), "{u}");
        }
        // 10:00 in Vietnam is busier than 03:00.
        assert!(daily_utilisation(3 * 3600 * NS) > daily_utilisation(20 * 3600 * NS));
    }
}
