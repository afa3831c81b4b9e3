//! A real Kafka-protocol broker (Tansu), a producer of known traffic with its own ground truth,
//! siteflow instances reading from the broker, and a reader of their results logs.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::support::{KillOnDrop, free_addr, repo, siteflow, write};

/// The `tansu` binary: on PATH or in cargo's bin directory (the test script installs it).
pub fn tansu() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU") {
        return PathBuf::from(p);
    }
    let home =
        std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let candidate = home.join("bin/tansu");
    if candidate.exists() { candidate } else { PathBuf::from("tansu") }
}

fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {addr} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Tansu broker on a free loopback port, its topics in SQLite on disk (they survive restarts).
/// Not the `memory://` engine: Tansu 0.6.0's in-memory engine answers a fetch from an offset
/// inside a record batch with the *next* batch, silently skipping the rest of that batch, which
/// any consumer resuming mid-batch (after a restart or a seek) would lose.
pub struct Broker {
    pub addr: SocketAddr,
    storage: String,
    dir: PathBuf,
    log: PathBuf,
    child: Option<KillOnDrop>,
}

impl Broker {
    /// Starts a broker keeping its topics in `dir`.
    pub fn start(dir: &Path) -> Self {
        let addr = free_addr();
        // Tansu reads the path after `sqlite://` as relative: run it in `dir`.
        let storage = "sqlite://tansu.db".to_string();
        let mut b = Self { addr, storage, dir: dir.to_path_buf(), log: dir.join("tansu.log"), child: None };
        b.restart();
        b
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    pub fn brokers(&self) -> String {
        self.addr.to_string()
    }

    /// Starts the broker process (again).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(tansu())
            .args(["broker", "--listener-url", &self.url(), "--advertised-listener-url", &self.url(), "--storage-engine", &self.storage])
            .current_dir(&self.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tansu ({}): {e}; scripts/test.sh installs it", tansu().display()));
        self.child = Some(KillOnDrop(child));
        wait_for_port(self.addr, Duration::from_secs(30));
    }

    /// Stops the broker (SIGKILL).
    pub fn stop(&mut self) {
        self.child = None;
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        self.create_topic_with(name, partitions, &[]);
    }

    /// Creates a topic with topic configs, e.g. `cleanup.policy=compact`.
    pub fn create_topic_with(&self, name: &str, partitions: u32, configs: &[&str]) {
        let (url, partitions) = (self.url(), partitions.to_string());
        let mut args = vec!["topic", "create", name, "--broker", &url, "--partitions", &partitions];
        for c in configs {
            args.extend(["--config", c]);
        }
        let out = Command::new(tansu()).args(&args).output().unwrap();
        assert!(out.status.success(), "tansu topic create {name}: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn producer(&self) -> ThreadedProducer<DefaultProducerContext> {
        ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            .create()
            .expect("producer")
    }

    /// Reads every message of a topic (all partitions) with their headers, until `expected` or a timeout.
    pub fn read_all(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<(Vec<u8>, BTreeMap<String, String>)> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
        // Assigned by hand from the beginning: no consumer group involved.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", "reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < expected && Instant::now() < deadline {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else { continue };
            let mut headers = BTreeMap::new();
            if let Some(h) = m.headers() {
                for header in h.iter() {
                    headers.insert(header.key.to_string(), String::from_utf8_lossy(header.value.unwrap_or_default()).to_string());
                }
            }
            out.push((m.payload().unwrap_or_default().to_vec(), headers));
        }
        out
    }
}

/// Produces one message to a partition, retrying while the local queue is full.
pub fn send(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, partition: i32, payload: &[u8]) {
    let mut record: BaseRecord<'_, (), [u8]> = BaseRecord::to(topic).partition(partition).payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                std::thread::sleep(Duration::from_millis(5));
                record = back;
            }
        }
    }
}

pub fn flush(producer: &ThreadedProducer<DefaultProducerContext>) {
    producer.flush(Duration::from_secs(300)).expect("all messages delivered");
}

/// A site and its prefix, from the inventory.
#[derive(Debug, Clone)]
pub struct Site {
    pub id: String,
    /// First three octets of its IPv4 /24.
    pub net: [u8; 3],
}

pub fn sites() -> Vec<Site> {
    let mut r = csv::Reader::from_path(repo().join("pipelines/hagiang/sites.csv")).unwrap();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            let prefix = rec.get(8).unwrap();
            let octets: Vec<u8> = prefix.split('/').next().unwrap().split('.').take(3).map(|o| o.parse().unwrap()).collect();
            Site { id: rec.get(0).unwrap().to_string(), net: [octets[0], octets[1], octets[2]] }
        })
        .collect()
}

/// Per (site, direction, window start in seconds): bytes, packets, records.
pub type Totals = BTreeMap<(String, String, i64), (u64, u64, u64)>;

/// Known flow traffic: every record's site and direction are decided here, so the totals it
/// keeps are independent of siteflow's enrichment.
pub struct Traffic {
    pub sites: Vec<Site>,
    pub window_secs: i64,
    pub start_ns: i64,
    pub truth: Totals,
    rng: fastrand::Rng,
}

/// One generated flow.
pub struct Flow {
    pub site: usize,
    pub inbound: bool,
    pub t_ns: i64,
    pub bytes: u64,
    pub packets: u64,
    pub sampling: u64,
}

impl Traffic {
    pub fn new(seed: u64, start_ns: i64) -> Self {
        Self { sites: sites(), window_secs: 10, start_ns, truth: Totals::new(), rng: fastrand::Rng::with_seed(seed) }
    }

    /// A flow at `t_ns` for a random site, counted in the ground truth.
    pub fn flow(&mut self, t_ns: i64) -> Flow {
        let site = self.rng.usize(..self.sites.len());
        let inbound = self.rng.bool();
        let bytes = self.rng.u64(40..1_500_000);
        let packets = self.rng.u64(1..1000);
        let sampling = [1, 1, 100, 1000][self.rng.usize(..4)];
        let f = Flow { site, inbound, t_ns, bytes, packets, sampling };
        self.count(&f);
        f
    }

    fn key(&self, f: &Flow) -> (String, String, i64) {
        let w = f.t_ns.div_euclid(1_000_000_000 * self.window_secs) * self.window_secs;
        (self.sites[f.site].id.clone(), if f.inbound { "in" } else { "out" }.to_string(), w)
    }

    pub fn count(&mut self, f: &Flow) {
        let e = self.truth.entry(self.key(f)).or_default();
        e.0 += f.bytes * f.sampling;
        e.1 += f.packets * f.sampling;
        e.2 += 1;
    }

    /// Takes a flow back out of the ground truth (it was turned into a bad record).
    pub fn uncount(&mut self, f: &Flow) {
        let key = self.key(f);
        let e = self.truth.get_mut(&key).expect("the flow was counted");
        e.0 -= f.bytes * f.sampling;
        e.1 -= f.packets * f.sampling;
        e.2 -= 1;
        if e.2 == 0 {
            self.truth.remove(&key);
        }
    }

    /// Adds the ground truth of traffic produced after this one.
    pub fn absorb(&mut self, later: Traffic) {
        for (k, v) in later.truth {
            let e = self.truth.entry(k).or_default();
            e.0 += v.0;
            e.1 += v.1;
            e.2 += v.2;
        }
    }

    /// goflow2 JSON of a flow, exported by an unknown router: the site is the destination's
    /// (inbound) or the source's (outbound).
    pub fn goflow2_json(&mut self, f: &Flow) -> String {
        self.goflow2_json_from(f, "192.0.2.1")
    }

    /// As [`Traffic::goflow2_json`], exported by the router at `exporter` (not a site's).
    pub fn goflow2_json_from(&mut self, f: &Flow, exporter: &str) -> String {
        let n = self.sites[f.site].net;
        let inside = format!("{}.{}.{}.{}", n[0], n[1], n[2], self.rng.u8(2..250));
        let outside = format!("203.0.113.{}", self.rng.u8(1..250));
        let (src, dst) = if f.inbound { (outside, inside) } else { (inside, outside) };
        format!(
            r#"{{"type":"NETFLOW_V9","time_received_ns":{},"sampling_rate":{},"sampler_address":"{exporter}","time_flow_start_ns":{},"time_flow_end_ns":{},"bytes":{},"packets":{},"src_addr":"{src}","dst_addr":"{dst}","etype":"IPv4","proto":"TCP","src_port":51000,"dst_port":443}}"#,
            f.t_ns + 5_000_000,
            f.sampling,
            f.t_ns - 1_000_000_000,
            f.t_ns,
            f.bytes,
            f.packets
        )
    }

    pub fn rng(&mut self) -> &mut fastrand::Rng {
        &mut self.rng
    }
}

/// Sums the flows results logs under a checkpoint directory (every partition's log).
pub fn read_flow_results(checkpoint_dir: &Path) -> Totals {
    let mut totals = Totals::new();
    let root = checkpoint_dir.join("results/flows");
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "jsonl") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for line in text.lines() {
                // A line cut by a crash is cut off on restore; skip one being written right now.
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
                let ws = v["window_start"].as_str().unwrap();
                let t = chrono::NaiveDateTime::parse_from_str(ws, "%Y-%m-%dT%H:%M:%S%.f").unwrap().and_utc().timestamp();
                let key = (v["site"].as_str().unwrap().to_string(), v["direction"].as_str().unwrap().to_string(), t);
                let e = totals.entry(key).or_default();
                e.0 += v["bytes"].as_u64().unwrap();
                e.1 += v["packets"].as_u64().unwrap();
                e.2 += v["records"].as_u64().unwrap();
            }
        }
    }
    totals
}

/// Only the windows that start before `end_s` (leaves out the sentinels' windows).
pub fn before(totals: &Totals, end_s: i64) -> Totals {
    totals.iter().filter(|((_, _, w), _)| *w < end_s).map(|(k, v)| (k.clone(), *v)).collect()
}

/// An instance's SQL `site_windows` before `end_s`, as totals; `None` if SQL does not answer.
/// Panics on two rows of one site, direction and window.
pub fn sql_window_totals(i: &Instance, end_s: i64) -> Option<Totals> {
    let query = format!(
        "SELECT site, direction, CAST(window_start AS BIGINT) / 1000000000 AS w, bytes, packets, records FROM site_windows \
         WHERE window_start < to_timestamp_seconds({end_s})"
    );
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut resp = agent.post(format!("http://{}/api/sql?format=csv", i.http)).header("Content-Type", "text/plain").send(&query).ok()?;
    if resp.status() != 200 {
        return None;
    }
    let csv = resp.body_mut().read_to_string().ok()?;
    let mut sql = Totals::new();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let key = (f[0].to_string(), f[1].to_string(), f[2].parse().unwrap());
        let prev = sql.insert(key, (f[3].parse().unwrap(), f[4].parse().unwrap(), f[5].parse().unwrap()));
        assert!(prev.is_none(), "{}: one row per site, direction and window: {line}", i.log.display());
    }
    Some(sql)
}

/// A short description of how two totals differ.
pub fn diff(expected: &Totals, got: &Totals) -> String {
    let missing = expected.keys().filter(|k| !got.contains_key(*k)).count();
    let extra = got.keys().filter(|k| !expected.contains_key(*k)).count();
    let wrong: Vec<_> = expected.iter().filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v)).take(3).collect();
    let sum = |t: &Totals| t.values().fold((0u64, 0u64), |a, v| (a.0 + v.0, a.1 + v.2));
    format!(
        "{} expected keys, {} got; {missing} missing, {extra} extra; expected (bytes, records) {:?}, got {:?}; first wrong: {:?}",
        expected.len(),
        got.len(),
        sum(expected),
        sum(got),
        wrong.iter().map(|(k, v)| (k, v, got.get(*k))).collect::<Vec<_>>()
    )
}

/// Waits until `check` holds or the timeout passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until `check` holds, for as long as `progress` keeps changing: fails only after
/// `stall` without any change (a slow machine takes longer, a stalled pipeline fails).
pub fn wait_while_progressing<P: PartialEq>(stall: Duration, mut check: impl FnMut() -> bool, mut progress: impl FnMut() -> P) -> bool {
    let (mut last, mut since) = (progress(), Instant::now());
    loop {
        if check() {
            return true;
        }
        let now = progress();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > stall {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A siteflow instance reading from the broker.
pub struct Instance {
    pub config: PathBuf,
    /// Extra environment (`SITEFLOW_...` overrides).
    pub env: Vec<(String, String)>,
    pub http: SocketAddr,
    pub log: PathBuf,
    child: Option<KillOnDrop>,
}

impl Instance {
    /// Writes a config for `topics` (name, format) and starts siteflow with it.
    /// `extra` is more YAML; without a `decode:` section, records up to a day ahead are accepted.
    pub fn start(dir: &Path, name: &str, broker: &Broker, topics: &[(&str, &str)], checkpoint_dir: &Path, extra: &str) -> Self {
        Self::start_with_env(dir, name, broker, topics, checkpoint_dir, extra, &[])
    }

    /// As [`Instance::start`], with extra environment variables (e.g. `SITEFLOW_KAFKA__...`).
    pub fn start_with_env(
        dir: &Path,
        name: &str,
        broker: &Broker,
        topics: &[(&str, &str)],
        checkpoint_dir: &Path,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let extra = if extra.contains("decode:") { extra.to_string() } else { format!("decode: {{ max_future_secs: 86400 }}\n{extra}") };
        let http = free_addr();
        let topics_yaml: String = topics.iter().map(|(t, f)| format!("    - {{ name: {t}, format: {f} }}\n")).collect();
        let config = write(
            dir,
            &format!("{name}.yaml"),
            &format!(
                "source: {{ kind: kafka }}\n\
                 kafka:\n  brokers: \"{}\"\n  group_id: siteflow-test\n  batch_linger_ms: 20\n  topics:\n{topics_yaml}  properties:\n    session.timeout.ms: \"6000\"\n    heartbeat.interval.ms: \"500\"\n\
                 checkpoint: {{ dir: \"{}\", interval_secs: 1 }}\n\
                 window: {{ size_secs: 10, allowed_lateness_ms: 5000, idle_partition_timeout_secs: 600 }}\n\
                 http: {{ listen: \"{http}\" }}\n{extra}",
                broker.brokers(),
                checkpoint_dir.display()
            ),
        );
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut i = Self { config, env, http, log: dir.join(format!("{name}.log")), child: None };
        i.restart();
        i
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = siteflow()
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,librdkafka=warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(KillOnDrop(child));
    }

    /// SIGKILL: no flush, no checkpoint, no commit.
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// SIGTERM, then waits for the process to stop (it checkpoints and leaves the group).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.0.id().to_string()]).status();
            let _ = c.0.wait();
        }
    }

    /// Whether the process is still running (it never exits by itself on data).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.0.try_wait().unwrap().is_none())
    }

    /// The log's first and last lines, for a failure message.
    pub fn log_summary(&self) -> String {
        let metrics = crate::support::http_get(self.http, "/metrics").map(|(_, b)| b).unwrap_or_default();
        let interesting: Vec<&str> = metrics
            .lines()
            .filter(|l| !l.starts_with('#') && l.starts_with("siteflow_") && !l.starts_with("siteflow_site") && !l.ends_with(" 0"))
            .filter(|l| !l.contains("_bucket") && !l.starts_with("siteflow_readiness") && !l.starts_with("siteflow_district"))
            .collect();
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let head = lines.iter().take(15).copied().collect::<Vec<_>>().join("\n");
        let tail = lines.iter().rev().take(40).rev().copied().collect::<Vec<_>>().join("\n");
        format!("--- {} ({} lines) ---\n{head}\n...\n{tail}\n--- metrics ---\n{}", self.log.display(), lines.len(), interesting.join("\n"))
    }

    /// A counter or gauge from /metrics (summed over its label sets that contain `labels`).
    pub fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let (_, body) = crate::support::http_get(self.http, "/metrics").ok()?;
        let mut total = None;
        for line in body.lines() {
            if line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']) && line.contains(labels) {
                let v: f64 = line.rsplit(' ').next()?.parse().ok()?;
                *total.get_or_insert(0.0) += v;
            }
        }
        total
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
