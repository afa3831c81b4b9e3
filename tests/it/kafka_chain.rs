//! The real collection chain: a pcap written here → softflowd (NetFlow v9, then IPFIX) →
//! pmacct nfacctd → the broker (nfacctd's Kafka plugin, JSON) → siteflow. Per-site bytes must
//! equal the pcap's (computed here from the packets written) and nfacctd's (what it published).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::kafka_support::{Broker, Instance, read_flow_results, sites, wait_until};
use std::os::unix::process::CommandExt;

use crate::support::write;

/// nfacctd forks its core and plugin processes: kill its whole process group when done.
struct ProcessGroup(std::process::Child);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).status();
        let _ = self.0.wait();
    }
}

/// A pcap file (Ethernet frames carrying IPv4/TCP), and the IP bytes per site and direction.
struct Pcap {
    frames: Vec<(f64, Vec<u8>)>,
    /// (site id, `in`/`out`) → IP bytes (what NetFlow counts as octets).
    truth: BTreeMap<(String, String), u64>,
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum >> 16) + (sum & 0xffff);
    }
    !(sum as u16)
}

/// One Ethernet frame with an IPv4 TCP segment of `payload` bytes.
fn frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&1u32.to_be_bytes()); // seq
    tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
    tcp.extend_from_slice(&[5 << 4, 0x18]); // header length, PSH+ACK
    tcp.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum (unchecked), urgent
    tcp.resize(20 + payload, b'x');
    let total = (20 + tcp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut eth = vec![0u8; 12];
    eth.extend_from_slice(&[0x08, 0x00]);
    eth.extend_from_slice(&ip);
    eth.extend_from_slice(&tcp);
    eth
}

impl Pcap {
    fn new() -> Self {
        Self { frames: Vec::new(), truth: BTreeMap::new() }
    }

    /// A TCP conversation: `packets` segments alternating between the two ends, from `start_s`.
    fn conversation(&mut self, a: [u8; 4], b: [u8; 4], start_s: f64, packets: usize, size: impl Fn(usize) -> usize) {
        for i in 0..packets {
            let (src, dst, sport, dport) = if i % 2 == 0 { (a, b, 51000, 443) } else { (b, a, 443, 51000) };
            self.frames.push((start_s + i as f64 * 0.05, frame(src, dst, sport, dport, size(i))));
        }
    }

    /// Records the conversations' bytes for the site owning `inside` (a /24 of the inventory).
    fn count_site(&mut self, site: &str, inside: [u8; 4]) {
        for (_, f) in &self.frames {
            let (src, dst) = (&f[26..30], &f[30..34]);
            let ip_bytes = (f.len() - 14) as u64;
            let dir = if dst == inside {
                "in"
            } else if src == inside {
                "out"
            } else {
                continue;
            };
            *self.truth.entry((site.to_string(), dir.to_string())).or_default() += ip_bytes;
        }
    }

    fn write(&self, path: &Path) {
        let mut out = Vec::new();
        for v in [
            0xa1b2c3d4u32.to_le_bytes().as_slice(),
            &2u16.to_le_bytes(),
            &4u16.to_le_bytes(),
            &[0; 8],
            &65535u32.to_le_bytes(),
            &1u32.to_le_bytes(),
        ] {
            out.extend_from_slice(v);
        }
        let mut frames = self.frames.clone();
        frames.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (t, f) in &frames {
            out.extend_from_slice(&(t.trunc() as u32).to_le_bytes());
            out.extend_from_slice(&((t.fract() * 1e6) as u32).to_le_bytes());
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f);
        }
        std::fs::write(path, out).unwrap();
    }
}

/// The directory holding a librdkafka new enough for the broker (Debian's pmacct is linked
/// against an older one); `scripts/test.sh` puts it there.
fn librdkafka_dir() -> PathBuf {
    std::env::var_os("TEST_LIBRDKAFKA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/siteflow/librdkafka"))
}

fn run_softflowd(pcap: &Path, collector: &str, version: &str, log: &Path) {
    let out = Command::new("softflowd").args(["-r", pcap.to_str().unwrap(), "-n", collector, "-v", version, "-D"]).output().unwrap();
    std::fs::write(log, [out.stdout.as_slice(), out.stderr.as_slice()].concat()).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("netflow packets"), "softflowd -v {version}: {text}");
}

#[test]
fn softflowd_to_nfacctd_to_siteflow_gives_the_pcap_bytes_per_site() {
    let dir = super::test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("pmacct.flows", 1);

    // nfacctd: NetFlow v9/IPFIX in, one JSON message per flow out to the broker.
    let port = crate::support::free_addr().port();
    let (host, kafka_port) = (broker.addr.ip(), broker.addr.port());
    let conf = write(
        dir.path(),
        "nfacctd.conf",
        &format!(
            "nfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\ntimestamps_secs: true\ntimestamps_since_epoch: true\n\
             aggregate[k]: peer_src_ip, src_host, dst_host, src_port, dst_port, proto, timestamp_start, timestamp_end\n\
             plugins: kafka[k]\nkafka_output[k]: json\nkafka_topic[k]: pmacct.flows\n\
             kafka_broker_host[k]: {host}\nkafka_broker_port[k]: {kafka_port}\nkafka_refresh_time[k]: 1\n"
        ),
    );
    let nfacctd_log = std::fs::File::create(dir.path().join("nfacctd.log")).unwrap();
    let _nfacctd = ProcessGroup(
        Command::new("nfacctd")
            .args(["-f", conf.to_str().unwrap()])
            .env("LD_LIBRARY_PATH", librdkafka_dir())
            .process_group(0)
            .stdout(Stdio::from(nfacctd_log.try_clone().unwrap()))
            .stderr(Stdio::from(nfacctd_log))
            .spawn()
            .expect("nfacctd (pmacct) is installed by scripts/test.sh"),
    );
    std::thread::sleep(Duration::from_secs(2));

    // Two pcaps, a minute apart: conversations of four sites with outside hosts, plus
    // background traffic of no site. The background also works around softflowd's NetFlow v9
    // header, whose record count covers only its flow records while nfacctd stops reading a
    // packet after that many records, templates included: with too few flows in a packet,
    // nfacctd reads the templates and drops the data (seen with softflowd 1.1, pmacct 1.7.7).
    let all = sites();
    let chosen = [&all[0], &all[60], &all[120], &all[200]];
    let now = chrono::Utc::now().timestamp() as f64;
    let start = (now / 10.0).floor() * 10.0 - 300.0;
    let mut truth: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (run, version) in [(0, "9"), (1, "10")] {
        let mut pcap = Pcap::new();
        let t0 = start + f64::from(run) * 60.0;
        for k in 0..4u8 {
            pcap.conversation([198, 51, 100, 1 + k], [198, 51, 100, 200], t0 + f64::from(k) * 0.01, 4, |_| 100);
        }
        for (s, site) in chosen.iter().enumerate() {
            let inside = [site.net[0], site.net[1], site.net[2], 10 + s as u8];
            let mut one = Pcap::new();
            one.conversation(inside, [203, 0, 113, 5 + s as u8], t0 + 2.0 + s as f64, 40 + 10 * s, |i| 200 + (i * 37 + s * 101) % 1200);
            one.count_site(&site.id, inside);
            for (k, v) in &one.truth {
                *truth.entry(k.clone()).or_default() += v;
            }
            pcap.frames.extend(one.frames);
        }
        let path = dir.path().join(format!("run{run}.pcap"));
        pcap.write(&path);
        run_softflowd(&path, &format!("127.0.0.1:{port}"), version, &dir.path().join(format!("softflowd-v{version}.log")));
    }
    let expected_records = 2 * (4 * 2 + chosen.len() * 2);

    // What nfacctd published: per site and direction, from the records' addresses.
    let published = broker.read_all("pmacct.flows", expected_records, Duration::from_secs(60));
    let nfacctd_log = || std::fs::read_to_string(dir.path().join("nfacctd.log")).unwrap_or_default();
    assert_eq!(published.len(), expected_records, "records published by nfacctd; its log:\n{}", nfacctd_log());
    let mut by_nfacctd: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (payload, _) in &published {
        for line in String::from_utf8_lossy(payload).lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let net = |field: &str| -> [u8; 3] {
                let o: Vec<u8> = v[field].as_str().unwrap().split('.').take(3).map(|x| x.parse().unwrap()).collect();
                [o[0], o[1], o[2]]
            };
            for (field, dir) in [("ip_dst", "in"), ("ip_src", "out")] {
                if let Some(site) = chosen.iter().find(|s| s.net == net(field)) {
                    *by_nfacctd.entry((site.id.clone(), dir.to_string())).or_default() += v["bytes"].as_u64().unwrap();
                }
            }
        }
    }
    assert_eq!(by_nfacctd, truth, "nfacctd's bytes per site differ from the pcap's");
    assert_eq!(truth.len(), 2 * chosen.len(), "every site has traffic both ways");

    // A sentinel an hour later closes every window.
    let producer = broker.producer();
    let site0 = chosen[0];
    let sentinel = format!(
        r#"{{"peer_ip_src":"127.0.0.1","ip_src":"203.0.113.1","ip_dst":"{}.{}.{}.9","timestamp_end":"{}.000000","packets":1,"bytes":1}}"#,
        site0.net[0],
        site0.net[1],
        site0.net[2],
        now as i64 + 3600
    );
    crate::kafka_support::send(&producer, "pmacct.flows", 0, sentinel.as_bytes());
    crate::kafka_support::flush(&producer);

    let checkpoints = dir.path().join("ckpt");
    let a = Instance::start(dir.path(), "a", &broker, &[("pmacct.flows", "pmacct_json")], &checkpoints, "");
    let end_s = now as i64 + 60;
    let per_site = || {
        let mut out: BTreeMap<(String, String), u64> = BTreeMap::new();
        for ((site, dir, w), (bytes, _, _)) in read_flow_results(&checkpoints) {
            if w < end_s {
                *out.entry((site, dir)).or_default() += bytes;
            }
        }
        out
    };
    let ok = wait_until(Duration::from_secs(120), || per_site() == truth);
    assert!(ok, "siteflow's bytes per site: {:?}\npcap's: {truth:?}\n{}", per_site(), a.log_summary());
    // Background traffic belongs to no site: counted as unmatched, never dropped silently.
    assert!(a.metric("siteflow_records_unmatched_total", "table=\"flows\"").unwrap_or(0.0) >= 16.0, "{}", a.log_summary());
}

/// Long flows in `event_time: spread`: two sites' 90 s conversations at a steady rate go through
/// softflowd (IPFIX, absolute times) and nfacctd to the broker. softflowd reading a pcap does not
/// apply its active timeout (`-t maxlife`, measured: one 90 s flow either way), so the capture
/// is cut into 20 s pieces, one softflowd run each, which exports what a 20 s active timeout
/// would; one site's conversation is left whole (one record per direction over 9+ windows).
/// Per window, siteflow's bytes equal those of the pcap's packets in that window within a
/// packet at each piece's edges; placed by their end (`flow_end`) they would be far off.
#[test]
fn softflowd_long_flows_spread_over_their_windows_match_the_pcap_per_window() {
    let dir = super::test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("pmacct.flows", 1);
    let port = crate::support::free_addr().port();
    let (host, kafka_port) = (broker.addr.ip(), broker.addr.port());
    let conf = write(
        dir.path(),
        "nfacctd.conf",
        &format!(
            "nfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\ntimestamps_since_epoch: true\n\
             aggregate[k]: peer_src_ip, src_host, dst_host, src_port, dst_port, proto, timestamp_start, timestamp_end\n\
             plugins: kafka[k]\nkafka_output[k]: json\nkafka_topic[k]: pmacct.flows\n\
             kafka_broker_host[k]: {host}\nkafka_broker_port[k]: {kafka_port}\nkafka_refresh_time[k]: 1\n"
        ),
    );
    let nfacctd_log = std::fs::File::create(dir.path().join("nfacctd.log")).unwrap();
    let _nfacctd = ProcessGroup(
        Command::new("nfacctd")
            .args(["-f", conf.to_str().unwrap()])
            .env("LD_LIBRARY_PATH", librdkafka_dir())
            .process_group(0)
            .stdout(Stdio::from(nfacctd_log.try_clone().unwrap()))
            .stderr(Stdio::from(nfacctd_log))
            .spawn()
            .expect("nfacctd (pmacct) is installed by scripts/test.sh"),
    );
    std::thread::sleep(Duration::from_secs(2));

    // Two sites, each one TCP conversation of 90 s with an outside host: a segment every 0.1 s,
    // alternating directions, fixed sizes per direction. Starts 3 s into a window.
    let all = sites();
    let chosen = [&all[10], &all[150]];
    let now = chrono::Utc::now().timestamp() as f64;
    let t0 = (now / 10.0).floor() * 10.0 - 600.0 + 3.0;
    let mut conversations = Vec::new();
    for (s, site) in chosen.iter().enumerate() {
        let inside = [site.net[0], site.net[1], site.net[2], 20 + s as u8];
        let mut p = Pcap::new();
        p.conversation(inside, [203, 0, 113, 40 + s as u8], t0 + s as f64 * 0.02, 1800, |i| if i % 2 == 0 { 500 } else { 1000 });
        conversations.push((site.id.clone(), inside, p));
    }
    // The pcap's bytes per (site, direction, window).
    let mut truth: BTreeMap<(String, String, i64), u64> = BTreeMap::new();
    for (site, inside, p) in &conversations {
        for (t, f) in &p.frames {
            let dir = if f[30..34] == inside[..] { "in" } else { "out" };
            let w = (t / 10.0).floor() as i64 * 10;
            *truth.entry((site.clone(), dir.to_string(), w)).or_default() += (f.len() - 14) as u64;
        }
    }
    // Site 0 in 20 s pieces (what a 20 s active timeout exports), site 1 whole.
    let mut runs: Vec<Pcap> = Vec::new();
    for piece in 0..5 {
        let mut p = Pcap::new();
        let (from, to) = (t0 + f64::from(piece) * 20.0, t0 + f64::from(piece + 1) * 20.0);
        p.frames = conversations[0].2.frames.iter().filter(|(t, _)| *t >= from && *t < to).cloned().collect();
        if piece == 0 {
            p.frames.extend(conversations[1].2.frames.iter().cloned());
        }
        runs.push(p);
    }
    for (k, p) in runs.iter().enumerate() {
        let path = dir.path().join(format!("piece{k}.pcap"));
        p.write(&path);
        let out = Command::new("softflowd")
            .args(["-r", path.to_str().unwrap(), "-n", &format!("127.0.0.1:{port}"), "-v", "10", "-A", "milli", "-D"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("netflow packets"), "softflowd: {text}");
        std::thread::sleep(Duration::from_millis(1500));
    }
    let expected_records = 5 * 2 + 2;
    let published = broker.read_all("pmacct.flows", expected_records, Duration::from_secs(60));
    let nfacctd_log = || std::fs::read_to_string(dir.path().join("nfacctd.log")).unwrap_or_default();
    assert_eq!(published.len(), expected_records, "records published by nfacctd; its log:\n{}", nfacctd_log());

    // A sentinel an hour later closes every window (to a site: a flow of no site never reaches
    // the windows, so it would move no clock).
    let producer = broker.producer();
    let n = chosen[0].net;
    let sentinel = format!(
        r#"{{"peer_ip_src":"127.0.0.1","ip_src":"203.0.113.1","ip_dst":"{}.{}.{}.9","timestamp_start":"{t}.000000","timestamp_end":"{t}.000000","packets":1,"bytes":1}}"#,
        n[0],
        n[1],
        n[2],
        t = now as i64 + 3600
    );
    crate::kafka_support::send(&producer, "pmacct.flows", 0, sentinel.as_bytes());
    crate::kafka_support::flush(&producer);

    // The lateness covers the longest flow: its early pieces arrive with its record.
    let checkpoints = dir.path().join("ckpt");
    let a = Instance::start_with_env(
        dir.path(),
        "a",
        &broker,
        &[("pmacct.flows", "pmacct_json, event_time: spread")],
        &checkpoints,
        "",
        &[("SITEFLOW_WINDOW__ALLOWED_LATENESS_MS", "120000")],
    );
    let got = || -> BTreeMap<(String, String, i64), u64> {
        read_flow_results(&checkpoints).into_iter().filter(|((_, _, w), _)| *w < now as i64).map(|(k, v)| (k, v.0)).collect()
    };
    let total = |m: &BTreeMap<(String, String, i64), u64>| m.values().sum::<u64>();
    let ok = wait_until(Duration::from_secs(120), || total(&got()) == total(&truth));
    let got = got();
    assert!(ok, "siteflow's bytes: {got:?}\npcap's: {truth:?}\n{}", a.log_summary());
    // Within two packets (1040 IP bytes at most) per window: the edges of the pieces.
    let tolerance = 2 * 1040;
    for key in truth.keys().chain(got.keys()) {
        let (want, have) = (truth.get(key).copied().unwrap_or(0), got.get(key).copied().unwrap_or(0));
        assert!(want.abs_diff(have) <= tolerance, "{key:?}: siteflow {have}, pcap {want}\n{got:?}");
    }
    // Placed by their end, the same records would be off by whole windows of traffic.
    let mut by_end: BTreeMap<(String, String, i64), u64> = BTreeMap::new();
    for (payload, _) in &published {
        for line in String::from_utf8_lossy(payload).lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let end: f64 = v["timestamp_end"].as_str().unwrap().parse().unwrap();
            let dst: Vec<u8> = v["ip_dst"].as_str().unwrap().split('.').map(|x| x.parse().unwrap()).collect();
            for (site, inside, _) in &conversations {
                let src: Vec<u8> = v["ip_src"].as_str().unwrap().split('.').map(|x| x.parse().unwrap()).collect();
                let dir = if dst == inside {
                    "in"
                } else if src == inside {
                    "out"
                } else {
                    continue;
                };
                *by_end.entry((site.clone(), dir.to_string(), (end / 10.0).floor() as i64 * 10)).or_default() +=
                    v["bytes"].as_u64().unwrap();
            }
        }
    }
    let worst_by_end = truth.keys().map(|k| truth[k].abs_diff(by_end.get(k).copied().unwrap_or(0))).max().unwrap();
    assert!(worst_by_end > 20 * tolerance, "flow_end's worst window is off by {worst_by_end} bytes");
    assert!(a.metric("siteflow_flows_spread_rows_total", "").unwrap_or(0.0) >= 20.0, "{}", a.log_summary());
}
