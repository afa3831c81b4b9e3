//! The deployment files under deploy/: each is checked with the tool made for it, every
//! siteflow configuration they mount passes `siteflow check` at the path where it is mounted,
//! and the pieces agree with each other (topics, ports, volumes, labels, the image's user).
//!
//! Tools: promtool, amtool, nfacctd, systemd-analyze (Debian packages) and a Python venv with
//! check-jsonschema (ships the Compose Specification schema), kubernetes-validate (ships the
//! Kubernetes schemas) and cloudcoil-models-prometheus-operator (models generated from the
//! Prometheus Operator CRDs). scripts/test.sh installs all of them; a missing one fails the
//! test, naming what to install. The venv is $HOME/.cache/siteflow/venv unless
//! TEST_DEPLOY_VENV names another.
//!
//! `dockerfile_build_steps_run_here` runs the Dockerfile's release build: slow the first time on
//! a machine (a release build of everything), incremental afterwards.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_yaml::Value;

use crate::support::{free_addr, http_get, repo, siteflow};

/// The cargo command of deploy/Dockerfile's builder stage; this test runs exactly it.
const DOCKER_BUILD: &str = "cargo build --release --locked --bin siteflow";
/// Kubernetes versions the manifests are validated against (oldest and newest in the schemas).
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// Packages of debian:bookworm-slim the binary may link against without installing them.
const BASE_IMAGE_PACKAGES: [&str; 2] = ["libc6", "libgcc-s1"];

// ---------------------------------------------------------------------------------------------
// Helpers

fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(&read(path))
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// A system tool; fails the test if it is missing.
fn system_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: apt-get install {package} (scripts/test.sh does)"))
}

fn venv() -> PathBuf {
    match std::env::var_os("TEST_DEPLOY_VENV") {
        Some(v) => PathBuf::from(v),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/siteflow/venv"),
    }
}

/// A tool of the Python venv; fails the test if it is missing.
fn venv_tool(name: &str) -> PathBuf {
    let p = venv().join("bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/test.sh, which creates the venv {} with check-jsonschema, \
         kubernetes-validate and cloudcoil-models-prometheus-operator",
        p.display(),
        venv().display()
    );
    p
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs a command that must succeed; returns stdout + stderr.
fn succeeds(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{}", out.status, text(&out));
    text(&out)
}

fn fails(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(!out.status.success(), "{cmd:?} should have failed:\n{}", text(&out));
    text(&out)
}

/// Copies a file or a directory tree (into `dst`, like Docker's COPY of a directory).
fn copy_into(src: &Path, dst: &Path) {
    if src.is_dir() {
        std::fs::create_dir_all(dst).unwrap();
        for entry in std::fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            copy_into(&entry.path(), &dst.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(src, dst).unwrap_or_else(|e| panic!("copy {} → {}: {e}", src.display(), dst.display()));
    }
}

/// `root` + an absolute path inside it.
fn inside(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// `siteflow check` on a configuration file; must pass.
fn siteflow_check(config: &Path) -> String {
    let out = succeeds(siteflow().args(["check", "--config"]).arg(config).env_remove("RUST_LOG"));
    assert!(out.contains(": ok"), "siteflow check said:\n{out}");
    out
}

/// The parsed YAML of a siteflow configuration.
fn siteflow_config(path: &Path) -> Value {
    yaml(path)
}

fn listen_port(config: &Value) -> u16 {
    s(&config["http"]["listen"]).rsplit(':').next().unwrap().parse().unwrap()
}

/// Topic name → format of a siteflow configuration.
fn config_topics(config: &Value) -> BTreeMap<String, String> {
    config["kafka"]["topics"]
        .as_sequence()
        .expect("kafka.topics")
        .iter()
        .map(|t| (s(&t["name"]).to_string(), s(&t["format"]).to_string()))
        .collect()
}

/// A child process whose whole process group is killed when dropped.
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).stderr(Stdio::null()).status();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// deploy/Dockerfile

/// One instruction of a Dockerfile: its stage (0-based), keyword and arguments.
struct Instruction {
    stage: usize,
    keyword: String,
    args: String,
}

fn dockerfile() -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut stage = None::<usize>;
    let mut pending = String::new();
    for line in read(&deploy("Dockerfile")).lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            pending.push_str(body);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let full = std::mem::take(&mut pending);
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stage = Some(stage.map_or(0, |s| s + 1));
        }
        let args = args.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push(Instruction { stage: stage.expect("FROM first"), keyword, args });
    }
    out
}

fn last_stage(ins: &[Instruction]) -> usize {
    ins.iter().map(|i| i.stage).max().unwrap()
}

/// The value of a single-valued instruction of the runtime stage (JSON form parsed).
fn runtime_json(ins: &[Instruction], keyword: &str) -> Vec<String> {
    let last = last_stage(ins);
    let i = ins.iter().rfind(|i| i.stage == last && i.keyword == keyword).unwrap_or_else(|| panic!("no {keyword}"));
    serde_json::from_str(&i.args).unwrap_or_else(|e| panic!("{keyword} is not in JSON form ({e}): {}", i.args))
}

/// The image's file system as the runtime stage's COPY instructions (those from the build
/// context) lay it out, in a fresh directory.
fn image_root() -> tempfile::TempDir {
    let ins = dockerfile();
    let last = last_stage(&ins);
    let root = tempfile::tempdir().unwrap();
    let mut copied = 0;
    for i in ins.iter().filter(|i| i.stage == last && i.keyword == "COPY") {
        let words: Vec<&str> = i.args.split_whitespace().collect();
        if words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        let paths: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
        let (dst, srcs) = paths.split_last().unwrap();
        for src in srcs {
            copy_into(&repo().join(src), &inside(root.path(), dst));
            copied += 1;
        }
    }
    assert!(copied > 0, "the runtime stage copies nothing from the build context");
    root
}

#[test]
fn dockerfile_default_configuration_passes_siteflow_check_in_the_image_layout() {
    let ins = dockerfile();
    let last = last_stage(&ins);
    assert_eq!(runtime_json(&ins, "ENTRYPOINT"), ["siteflow"]);
    let cmd = runtime_json(&ins, "CMD");
    assert_eq!(cmd[..2], ["run", "--config"], "CMD runs the pipeline");
    let root = image_root();
    let config_path = inside(root.path(), &cmd[2]);
    siteflow_check(&config_path);

    let runtime = |k: &str| ins.iter().filter(|i| i.stage == last && i.keyword == k).map(|i| i.args.clone()).collect::<Vec<_>>();
    assert!(
        runtime("COPY").iter().any(|a| a.starts_with("--from=builder") && a.ends_with(" /usr/local/bin/siteflow")),
        "binary in /usr/local/bin"
    );
    assert_eq!(runtime("USER"), ["siteflow:siteflow"], "runs as the non-root user");
    let run_lines = runtime("RUN").join("\n");
    assert!(run_lines.contains("--uid 10001") && run_lines.contains("--gid 10001"), "uid/gid 10001:\n{run_lines}");

    // The configuration's port is the one exposed and probed; its checkpoints are on the volume.
    let config = siteflow_config(&config_path);
    let port = listen_port(&config);
    assert!(s(&config["http"]["listen"]).starts_with("0.0.0.0:"), "reachable from outside the container");
    assert_eq!(runtime("EXPOSE"), [port.to_string()]);
    assert!(runtime("HEALTHCHECK")[0].contains(&format!("/dev/tcp/127.0.0.1/{port}")), "healthcheck probes the configured port");
    let volume = runtime("VOLUME")[0].clone();
    assert!(s(&config["checkpoint"]["dir"]).starts_with(&volume), "checkpoint dir on the VOLUME {volume}");
}

#[test]
fn dockerfile_healthcheck_probes_a_running_siteflow() {
    let ins = dockerfile();
    let last = last_stage(&ins);
    let hc = &ins.iter().find(|i| i.stage == last && i.keyword == "HEALTHCHECK").expect("HEALTHCHECK").args;
    let json = &hc[hc.find("CMD [").expect("HEALTHCHECK CMD in JSON form") + 4..];
    let argv: Vec<String> = serde_json::from_str(json).unwrap();
    assert_eq!(argv[0], "bash", "debian:bookworm-slim has bash, not curl");
    let addr = free_addr();
    let argv: Vec<String> =
        argv.iter().map(|a| a.replace("/dev/tcp/127.0.0.1/9898", &format!("/dev/tcp/127.0.0.1/{}", addr.port()))).collect();
    let probe = || Command::new(&argv[0]).args(&argv[1..]).output().unwrap().status.success();

    assert!(!probe(), "healthy with nothing listening");
    let mut demo = Group(
        siteflow()
            .args(["demo", "--listen", &addr.to_string()])
            .current_dir(repo())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while http_get(addr, "/healthz").ok().map(|(c, _)| c) != Some(200) {
        assert!(started.elapsed() < Duration::from_secs(60), "siteflow demo did not answer /healthz");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(probe(), "the HEALTHCHECK command fails against a running siteflow");
    let _ = demo.0.kill();
    let _ = demo.0.wait();
    assert!(!probe(), "healthy after siteflow stopped");
}

/// Runs the builder stage's cargo command and strip step here, and checks that every shared
/// library of the result comes from a package the runtime stage installs (or the base image
/// has). The Docker build uses /src/target; here the shared CARGO_TARGET_DIR keeps it
/// incremental.
#[test]
fn dockerfile_build_steps_run_here() {
    let ins = dockerfile();
    let builder: Vec<&Instruction> = ins.iter().filter(|i| i.stage == 0).collect();
    assert!(builder[0].args.starts_with("rust:") && builder[0].args.ends_with(" AS builder"), "builder stage: {}", builder[0].args);
    let runs: Vec<&str> = builder.iter().filter(|i| i.keyword == "RUN").map(|i| i.args.as_str()).collect();
    let cargo: Vec<&&str> = runs.iter().filter(|r| r.starts_with("cargo ")).collect();
    assert_eq!(cargo, [&DOCKER_BUILD], "the Dockerfile's cargo command is the one this test runs");
    // What the build reads must be in the build context it copies (build.rs sets the build facts).
    let copies: Vec<&str> = builder.iter().filter(|i| i.keyword == "COPY").flat_map(|i| i.args.split_whitespace()).collect();
    for needed in ["Cargo.toml", "Cargo.lock", "build.rs", "src"] {
        assert!(copies.contains(&needed), "the builder stage copies {needed}: {copies:?}");
    }
    let strip = runs.iter().find(|r| r.starts_with("objcopy ")).expect("strip step");
    assert_eq!(*strip, "objcopy --strip-debug target/release/siteflow /siteflow");

    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"));
    let argv: Vec<&str> = DOCKER_BUILD.split(' ').collect();
    succeeds(Command::new(argv[0]).args(&argv[1..]).current_dir(repo()).env("CARGO_TARGET_DIR", &target).env("CARGO_TERM_COLOR", "never"));
    let built = target.join("release/siteflow");
    let out = tempfile::tempdir().unwrap();
    let stripped = out.path().join("siteflow");
    succeeds(Command::new("objcopy").arg("--strip-debug").arg(&built).arg(&stripped));
    let version = succeeds(Command::new(&stripped).arg("--version"));
    assert!(version.starts_with("siteflow "), "{version}");
    let (full, small) = (std::fs::metadata(&built).unwrap().len(), std::fs::metadata(&stripped).unwrap().len());
    assert!(small < full, "stripping saves nothing: {full} → {small} bytes");

    // Run-time packages of the image.
    let last = last_stage(&ins);
    let install = ins
        .iter()
        .filter(|i| i.stage == last && i.keyword == "RUN")
        .find_map(|i| i.args.split("apt-get install").nth(1).map(str::to_string))
        .expect("runtime apt-get install");
    let packages: BTreeSet<&str> = install.split("&&").next().unwrap().split_whitespace().filter(|w| !w.starts_with('-')).collect();
    assert!(packages.contains("ca-certificates"), "TLS to brokers needs CA certificates: {packages:?}");
    let ldd = succeeds(Command::new(system_tool("ldd", "libc-bin")).arg(&stripped));
    let mut libs = 0;
    for line in ldd.lines() {
        let Some(path) = line.split("=>").nth(1).and_then(|r| r.split_whitespace().next()) else { continue };
        assert!(path.starts_with('/'), "unresolved library: {line}");
        let real = std::fs::canonicalize(path).unwrap();
        // Debian's usr-merge: the package may list either /lib/... or /usr/lib/...
        let alternatives = [real.clone(), PathBuf::from(real.to_string_lossy().replacen("/usr/lib/", "/lib/", 1)), PathBuf::from(path)];
        let owner = alternatives
            .iter()
            .find_map(|p| {
                let out = Command::new("dpkg").arg("-S").arg(p).output().ok()?;
                out.status.success().then(|| String::from_utf8_lossy(&out.stdout).split(':').next().unwrap().to_string())
            })
            .unwrap_or_else(|| panic!("no Debian package owns {path}"));
        assert!(
            packages.contains(owner.as_str()) || BASE_IMAGE_PACKAGES.contains(&owner.as_str()),
            "the binary needs {path} from package {owner}, which the runtime stage does not install ({packages:?})"
        );
        libs += 1;
    }
    assert!(libs >= 3, "ldd found too few libraries:\n{ldd}");
}

// ---------------------------------------------------------------------------------------------
// deploy/compose

fn compose() -> Value {
    yaml(&deploy("compose/compose.yaml"))
}

/// (source, target) of a service's bind mounts (sources relative to the compose file), and the
/// named volumes as (name, target).
fn mounts(service: &Value) -> (Vec<(PathBuf, String)>, Vec<(String, String)>) {
    let (mut binds, mut named) = (Vec::new(), Vec::new());
    for v in service["volumes"].as_sequence().into_iter().flatten() {
        let parts: Vec<&str> = s(v).split(':').collect();
        if parts[0].starts_with('.') || parts[0].starts_with('/') {
            binds.push((deploy("compose").join(parts[0]), parts[1].to_string()));
        } else {
            named.push((parts[0].to_string(), parts[1].to_string()));
        }
    }
    (binds, named)
}

/// A service's file system: `base` (or an empty directory) with its bind mounts applied.
fn mounted_root(service: &Value, base: Option<tempfile::TempDir>) -> tempfile::TempDir {
    let root = base.unwrap_or_else(|| tempfile::tempdir().unwrap());
    for (src, target) in mounts(service).0 {
        assert!(src.exists(), "mount source {} does not exist", src.display());
        copy_into(&src, &inside(root.path(), &target));
    }
    root
}

#[test]
fn compose_file_matches_the_compose_specification() {
    let check = venv_tool("check-jsonschema");
    let file = deploy("compose/compose.yaml");
    succeeds(Command::new(&check).args(["--builtin-schema", "vendor.compose-spec"]).arg(&file));
    // The schema is strict: a misspelt key fails (so the pass above means something).
    let bad = tempfile::tempdir().unwrap();
    let misspelt = bad.path().join("compose.yaml");
    std::fs::write(&misspelt, read(&file).replace("stop_grace_period:", "stop_grace_periods:")).unwrap();
    let out = fails(Command::new(&check).args(["--builtin-schema", "vendor.compose-spec"]).arg(&misspelt));
    assert!(out.contains("stop_grace_periods"), "{out}");
}

#[test]
fn compose_siteflow_services_share_checkpoints_and_pass_siteflow_check() {
    let c = compose();
    let sf = &c["services"]["siteflow"];
    assert_eq!(sf["deploy"]["replicas"].as_u64(), Some(2), "two instances in one group");
    let build = &sf["build"];
    let dockerfile = deploy("compose").join(s(&build["context"])).join(s(&build["dockerfile"]));
    assert_eq!(std::fs::canonicalize(dockerfile).unwrap(), std::fs::canonicalize(deploy("Dockerfile")).unwrap());

    let command: Vec<&str> = sf["command"].as_sequence().unwrap().iter().map(s).collect();
    assert_eq!(command[..2], ["run", "--config"]);
    let root = mounted_root(sf, Some(image_root()));
    let config_path = inside(root.path(), command[2]);
    siteflow_check(&config_path);
    let config = siteflow_config(&config_path);

    // One named volume, mounted by every replica, holds the checkpoint directory.
    let checkpoint_dir = s(&config["checkpoint"]["dir"]);
    let (_, named) = mounts(sf);
    let (volume, _) = named.iter().find(|(_, t)| checkpoint_dir.starts_with(t.as_str())).expect("checkpoint dir on a named volume");
    assert!(c["volumes"].as_mapping().unwrap().contains_key(volume.as_str()), "volume {volume} declared");
    assert_eq!(s(&config["kafka"]["group_id"]), "siteflow");
    assert!(sf["environment"]["SITEFLOW_KAFKA__GROUP_ID"].as_str().is_none_or(|g| g == "siteflow"));
    assert_eq!(s(&config["kafka"]["brokers"]), "kafka:9092");

    // Each producer writes the topic siteflow reads with the matching format; kafka-init
    // creates every topic (auto-creation is off), the dead-letter topic too.
    let topics = config_topics(&config);
    let init = s(&c["services"]["kafka-init"]["command"][0]);
    let created: BTreeSet<&str> = init.split("for topic in ").nth(1).unwrap().split(';').next().unwrap().split_whitespace().collect();
    let mut wanted: BTreeSet<&str> = topics.keys().map(String::as_str).collect();
    wanted.insert(s(&config["kafka"]["dead_letter_topic"]));
    assert_eq!(created, wanted, "kafka-init creates exactly siteflow's topics");
    // The two stages: the ingest service hands on through the internal topic, the site stage
    // (the `siteflow` service) shares its verdicts through the readiness topic.
    for topic in [s(&config["scale_out"]["topic"]), s(&config["scale_out"]["readiness_topic"]), s(&config["scale_out"]["windows_topic"])] {
        assert!(init.contains(&format!("--topic {topic} ")), "kafka-init creates {topic}");
    }
    let command = |service: &str| c["services"][service]["command"].as_sequence().unwrap().iter().map(s).collect::<Vec<_>>().join(" ");
    assert!(command("siteflow").ends_with("--stage site"), "{}", command("siteflow"));
    assert!(command("siteflow-ingest").ends_with("--stage ingest"), "{}", command("siteflow-ingest"));
    assert_eq!(c["services"]["siteflow-ingest"]["volumes"], sf["volumes"], "both stages mount the config and the checkpoints");
    assert_eq!(c["services"]["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"].as_str(), Some("false"));

    let goflow2: Vec<&str> = c["services"]["goflow2"]["command"].as_sequence().unwrap().iter().map(s).collect();
    let topic = goflow2.iter().find_map(|a| a.strip_prefix("-transport.kafka.topic=")).unwrap();
    assert_eq!(topics[topic], "goflow2_protobuf");
    assert!(goflow2.contains(&"-format=bin"), "goflow2 protobuf is -format=bin");
    assert!(goflow2.contains(&"-transport.kafka.brokers=kafka:9092"));
    let mapping = yaml(&deploy("compose/goflow2/mapping.yaml"));
    assert_eq!(mapping["formatter"]["key"][0].as_str(), Some("sampler_address"));

    let nfacctd = read(&deploy("compose/pmacct/nfacctd.conf"));
    let key = |k: &str| nfacctd.lines().find_map(|l| l.strip_prefix(&format!("{k}: "))).unwrap_or_else(|| panic!("nfacctd.conf: {k}"));
    assert_eq!(topics[key("kafka_topic[siteflow]")], "pmacct_json");
    assert_eq!(key("kafka_output[siteflow]"), "json");
    assert_eq!(key("nfacctd_renormalize"), "false", "siteflow applies the sampling rate itself");
    assert!(key("kafka_refresh_time[siteflow]").parse::<u64>().unwrap() * 1000 < 5000, "cache purge well within the lateness");

    let telegraf = telegraf_conf();
    let out = &telegraf["outputs"]["kafka"][0];
    assert_eq!(topics[out["topic"].as_str().unwrap()], "telegraf_json");
    assert_eq!(out["data_format"].as_str(), Some("json"));
    assert_eq!(out["brokers"][0].as_str(), Some("kafka:9092"));
}

/// deploy/compose/telegraf/telegraf.conf parsed by Python's tomllib, as JSON.
fn telegraf_conf() -> serde_json::Value {
    let out = succeeds(
        Command::new(venv_tool("python"))
            .args(["-c", "import json, sys, tomllib; print(json.dumps(tomllib.load(open(sys.argv[1], 'rb'))))"])
            .arg(deploy("compose/telegraf/telegraf.conf")),
    );
    serde_json::from_str(&out).unwrap()
}

#[test]
fn compose_telegraf_pings_addresses_of_sites() {
    let telegraf = telegraf_conf();
    let mut sites = csv::Reader::from_path(repo().join("pipelines/hagiang/sites.csv")).unwrap();
    let col = sites.headers().unwrap().iter().position(|h| h == "prefix").unwrap();
    let prefixes: Vec<ipnet::IpNet> =
        sites.records().flat_map(|r| r.unwrap()[col].split_whitespace().map(|p| p.parse().unwrap()).collect::<Vec<_>>()).collect();
    let ping = &telegraf["inputs"]["ping"][0];
    let urls = ping["urls"].as_array().unwrap();
    assert!(!urls.is_empty());
    for url in urls {
        let addr: IpAddr = url.as_str().unwrap().parse().unwrap();
        assert!(prefixes.iter().any(|p| p.contains(&addr)), "{addr} is in no site's prefix: siteflow could not place its results");
    }
    // Fresh enough for the readiness policy: a round at least every 2 windows.
    let interval = telegraf["agent"]["interval"].as_str().unwrap().trim_end_matches('s').parse::<u64>().unwrap();
    assert!(interval < 20, "ping interval {interval}s: sites would turn unknown");
}

#[test]
fn compose_prometheus_config_and_rules_pass_promtool() {
    let c = compose();
    let prom = &c["services"]["prometheus"];
    let root = mounted_root(prom, None);
    let config_arg = prom["command"].as_sequence().unwrap().iter().find_map(|a| s(a).strip_prefix("--config.file=")).unwrap();
    let config = inside(root.path(), config_arg);
    let out = succeeds(Command::new(system_tool("promtool", "prometheus")).args(["check", "config"]).arg(&config));
    assert!(out.contains("SUCCESS: 2 rule files found"), "the rules are mounted where rule_files looks:\n{out}");

    // The scrape job the rules expect finds the siteflow service on its configured port.
    let sf_config = siteflow_config(&deploy("compose/siteflow.yaml"));
    let p = yaml(&config);
    let job = p["scrape_configs"].as_sequence().unwrap().iter().find(|j| j["job_name"].as_str() == Some("siteflow")).expect("job siteflow");
    let dns = &job["dns_sd_configs"][0];
    assert_eq!(dns["names"][0].as_str(), Some("siteflow"));
    let scraped: BTreeSet<&str> = dns["names"].as_sequence().unwrap().iter().map(s).collect();
    let instances: BTreeSet<&str> = c["services"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, v)| v["image"].as_str().is_some_and(|i| i.starts_with("siteflow:")))
        .map(|(k, _)| s(k))
        .collect();
    assert_eq!(scraped, instances, "every siteflow service of both stages is scraped");
    assert_eq!(dns["port"].as_u64(), Some(u64::from(listen_port(&sf_config))));
    assert_eq!(p["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0].as_str(), Some("alertmanager:9093"));
    assert!(c["services"]["alertmanager"].is_mapping());
}

#[test]
fn compose_alertmanager_config_passes_amtool() {
    let c = compose();
    let am = &c["services"]["alertmanager"];
    let root = mounted_root(am, None);
    let config_arg = am["command"].as_sequence().unwrap().iter().find_map(|a| s(a).strip_prefix("--config.file=")).unwrap();
    succeeds(Command::new(system_tool("amtool", "prometheus-alertmanager")).args(["check-config"]).arg(inside(root.path(), config_arg)));
    // Inhibitions name alerts that exist.
    let alerts = read(&deploy("prometheus/rules/alerts.yml"));
    let am_config = read(&inside(root.path(), config_arg));
    for name in ["PipelineLagging", "TelemetryStale", "SiteReadinessUnknown"] {
        assert!(am_config.contains(name) && alerts.contains(&format!("alert: {name}")), "{name}");
    }
}

#[test]
fn compose_grafana_provisioning_points_at_the_compose_prometheus() {
    let c = compose();
    let grafana = &c["services"]["grafana"];
    let root = mounted_root(grafana, None);
    let ds = yaml(&inside(root.path(), "/etc/grafana/provisioning/datasources/siteflow.yml"));
    let ds = &ds["datasources"][0];
    let original = yaml(&deploy("grafana/provisioning/datasources/siteflow.yml"));
    assert_eq!(ds["uid"], original["datasources"][0]["uid"], "the dashboards refer to this uid");
    let port = c["services"]["prometheus"]["ports"][0].as_str().unwrap().rsplit(':').next().unwrap();
    assert_eq!(ds["url"].as_str(), Some(format!("http://prometheus:{port}").as_str()));
    // The dashboards provider's path holds the dashboards.
    let provider = yaml(&inside(root.path(), "/etc/grafana/provisioning/dashboards/siteflow.yml"));
    let path = s(&provider["providers"][0]["options"]["path"]);
    assert!(inside(root.path(), path).join("province-overview.json").is_file(), "dashboards at {path}");
}

/// nfacctd (pmacct) reads the configuration without a warning: pmacct only warns about
/// unknown keys and goes on. Run here with the listen address and broker made local.
#[test]
fn compose_nfacctd_config_is_accepted_by_nfacctd() {
    let nfacctd = system_tool("nfacctd", "pmacct");
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = free_addr().port();
    let original = read(&deploy("compose/pmacct/nfacctd.conf"));
    let mut replaced = 0;
    let conf: String = original
        .lines()
        .map(|l| {
            let new = match l {
                "nfacctd_port: 2100" => format!("nfacctd_ip: 127.0.0.1\nnfacctd_port: {port}"),
                "kafka_broker_host[siteflow]: kafka" => "kafka_broker_host[siteflow]: 127.0.0.1".to_string(),
                "kafka_broker_port[siteflow]: 9092" => format!("kafka_broker_port[siteflow]: {dead}"),
                _ => return format!("{l}\n"),
            };
            replaced += 1;
            format!("{new}\n")
        })
        .collect();
    assert_eq!(replaced, 3, "the lines this test makes local changed");
    let path = dir.path().join("nfacctd.conf");
    std::fs::write(&path, conf).unwrap();
    let log = dir.path().join("nfacctd.log");
    let file = std::fs::File::create(&log).unwrap();
    let _nfacctd =
        Group(Command::new(nfacctd).arg("-f").arg(&path).stdout(file.try_clone().unwrap()).stderr(file).process_group(0).spawn().unwrap());
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("waiting for NetFlow/IPFIX data") && text.contains("( siteflow/kafka )") {
            let complaints: Vec<&str> = text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
            assert!(complaints.is_empty(), "nfacctd complains about the configuration:\n{text}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "nfacctd did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// deploy/kubernetes

fn kubernetes_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn is_operator_resource(path: &Path) -> bool {
    yaml_docs(path).iter().any(|d| d["apiVersion"].as_str().is_some_and(|a| a.starts_with("monitoring.coreos.com/")))
}

/// The one object of `kind` among the manifests.
fn manifest(kind: &str) -> Value {
    let all: Vec<Value> = kubernetes_files().iter().flat_map(|p| yaml_docs(p)).filter(|d| d["kind"].as_str() == Some(kind)).collect();
    assert_eq!(all.len(), 1, "one {kind}");
    all.into_iter().next().unwrap()
}

#[test]
fn kubernetes_manifests_match_the_kubernetes_schemas() {
    let validate = venv_tool("kubernetes-validate");
    let core: Vec<PathBuf> = kubernetes_files().into_iter().filter(|p| !is_operator_resource(p)).collect();
    assert!(core.len() >= 6, "{core:?}");
    for version in KUBERNETES_VERSIONS {
        let out = succeeds(Command::new(&validate).args(["--strict", "-k", version]).args(&core));
        // It only warns (and exits 0) for a kind it has no schema for: none of these.
        assert!(!out.contains("WARN") && !out.contains("ERROR"), "{out}");
        assert_eq!(out.matches(" passed for resource ").count(), core.len(), "{out}");
    }
    // --strict rejects unknown fields.
    let bad = tempfile::tempdir().unwrap();
    let misspelt = bad.path().join("statefulset.yaml");
    std::fs::write(&misspelt, read(&deploy("kubernetes/statefulset.yaml")).replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:"))
        .unwrap();
    fails(Command::new(&validate).args(["--strict", "-k", KUBERNETES_VERSIONS[1]]).arg(&misspelt));
}

/// Validates PodMonitor and PrometheusRule documents with the pydantic models that
/// cloudcoil-models-prometheus-operator generates from the operator's CRD schemas, made strict
/// (unknown fields are errors; a real cluster would silently prune them).
const CRD_CHECK: &str = r#"
import inspect, sys, yaml, pydantic
from cloudcoil import apimachinery
from cloudcoil.models.prometheus_operator import v1
models = [c for m in (apimachinery, v1) for _, c in inspect.getmembers(m, inspect.isclass)
          if issubclass(c, pydantic.BaseModel) and c.__module__ == m.__name__]
for c in models:
    c.model_config["extra"] = "forbid"
for _ in range(3):
    for c in models:
        c.model_rebuild(force=True)
kinds = {"PodMonitor": v1.PodMonitor, "PrometheusRule": v1.PrometheusRule}
failed = 0
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path, encoding="utf-8")):
        try:
            kinds[doc["kind"]].model_validate(doc)
            print(f"{path}: {doc['kind']} {doc['metadata']['name']}: valid")
        except (pydantic.ValidationError, KeyError) as e:
            failed += 1
            print(f"{path}: {e}")
sys.exit(1 if failed else 0)
"#;

#[test]
fn prometheus_operator_resources_match_their_crds() {
    let python = venv_tool("python");
    let files: Vec<PathBuf> = kubernetes_files().into_iter().filter(|p| is_operator_resource(p)).collect();
    let kinds: BTreeSet<String> = files.iter().flat_map(|p| yaml_docs(p)).map(|d| s(&d["kind"]).to_string()).collect();
    assert_eq!(kinds, BTreeSet::from(["PodMonitor".to_string(), "PrometheusRule".to_string()]));
    let out = succeeds(Command::new(&python).args(["-c", CRD_CHECK]).args(&files));
    assert_eq!(out.matches(": valid").count(), files.len(), "{out}");
    // Strict: a misspelt field fails.
    let bad = tempfile::tempdir().unwrap();
    let misspelt = bad.path().join("podmonitor.yaml");
    std::fs::write(&misspelt, read(&deploy("kubernetes/podmonitor.yaml")).replace("scrapeTimeout:", "scrapeTimout:")).unwrap();
    let out = fails(Command::new(&python).args(["-c", CRD_CHECK]).arg(&misspelt));
    assert!(out.contains("scrapeTimout"), "{out}");
}

#[test]
fn prometheus_rules_for_kubernetes_are_the_repository_rules() {
    succeeds(Command::new("python3").arg(deploy("kubernetes/generate-prometheusrules.py")).arg("--check"));
    let promtool = system_tool("promtool", "prometheus");
    let dir = tempfile::tempdir().unwrap();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(deploy("prometheus/rules")).unwrap().map(|e| e.unwrap().path()).collect();
    sources.sort();
    assert!(!sources.is_empty());
    for src in sources {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        let rule = yaml(&deploy(&format!("kubernetes/prometheusrule-{stem}.yaml")));
        assert_eq!(rule["kind"].as_str(), Some("PrometheusRule"));
        assert_eq!(rule["spec"]["groups"], yaml(&src)["groups"], "prometheusrule-{stem}.yaml has the groups of {}", src.display());
        // What the operator hands to Prometheus: the spec as a rule file.
        let file = dir.path().join(format!("{stem}.yml"));
        std::fs::write(&file, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
        succeeds(Command::new(&promtool).args(["check", "rules"]).arg(&file));
    }
}

#[test]
fn kubernetes_configmap_config_passes_siteflow_check_where_the_statefulset_mounts_it() {
    let sts = manifest("StatefulSet");
    let pod = &sts["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    let volumes = pod["volumes"].as_sequence().unwrap();
    let config_mount = mounts.iter().find(|m| m["name"].as_str() == Some("config")).unwrap();
    let config_volume = volumes.iter().find(|v| v["name"].as_str() == Some("config")).unwrap();
    let cm = manifest("ConfigMap");
    assert_eq!(config_volume["configMap"]["name"], cm["metadata"]["name"]);
    let text = s(&cm["data"][s(&config_mount["subPath"])]);

    let root = image_root();
    let args: Vec<&str> = container["args"].as_sequence().unwrap().iter().map(s).collect();
    assert_eq!(args[..2], ["run", "--config"]);
    assert_eq!(args[2], s(&config_mount["mountPath"]), "siteflow reads the mounted file");
    let config_path = inside(root.path(), args[2]);
    std::fs::write(&config_path, text).unwrap();
    siteflow_check(&config_path);
    let config = siteflow_config(&config_path);

    // Ports and probes.
    let port = listen_port(&config);
    assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(u64::from(port)));
    assert_eq!(container["ports"][0]["name"].as_str(), Some("http"));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));

    // Checkpoints on the shared ReadWriteMany claim; history on each pod's own claim.
    let mount_of = |dir: &str| mounts.iter().find(|m| dir.starts_with(s(&m["mountPath"]))).map(|m| s(&m["name"]).to_string());
    let ckpt = mount_of(s(&config["checkpoint"]["dir"])).expect("checkpoint dir on a volume");
    let ckpt_volume = volumes.iter().find(|v| v["name"].as_str() == Some(ckpt.as_str())).unwrap();
    let pvc = manifest("PersistentVolumeClaim");
    assert_eq!(ckpt_volume["persistentVolumeClaim"]["claimName"], pvc["metadata"]["name"]);
    assert_eq!(pvc["spec"]["accessModes"][0].as_str(), Some("ReadWriteMany"), "shared by all pods");
    let history = mount_of(s(&config["history"]["dir"])).expect("history dir on a volume");
    assert!(
        sts["spec"]["volumeClaimTemplates"].as_sequence().unwrap().iter().any(|t| t["metadata"]["name"].as_str() == Some(history.as_str()))
    );

    // The image's user, read-only root, nothing to escalate.
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(10001));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(container["resources"]["requests"]["memory"].is_string() && container["resources"]["limits"]["memory"].is_string());

    // The two stages: the StatefulSet runs the site stage, a Deployment the ingest stage, on
    // the same image, configuration and checkpoint claim.
    let args_of = |c: &Value| c["args"].as_sequence().unwrap().iter().map(s).collect::<Vec<_>>().join(" ");
    assert!(args_of(container).ends_with("--stage site"), "{}", args_of(container));
    for topic in ["topic", "readiness_topic", "windows_topic"] {
        assert!(config["scale_out"][topic].as_str().is_some_and(|t| !t.is_empty()), "scale_out.{topic} set");
    }
    let ingest = manifest("Deployment");
    let ingest_pod = &ingest["spec"]["template"]["spec"];
    let ingest_container = &ingest_pod["containers"][0];
    assert!(args_of(ingest_container).ends_with("--stage ingest"), "{}", args_of(ingest_container));
    assert_eq!(
        ingest_container["args"].as_sequence().unwrap()[..3],
        container["args"].as_sequence().unwrap()[..3],
        "the same configuration file"
    );
    assert_eq!(ingest_container["image"], container["image"]);
    let ingest_mounts = ingest_container["volumeMounts"].as_sequence().unwrap();
    let ingest_volumes = ingest_pod["volumes"].as_sequence().unwrap();
    let volume_at = |mounts: &[Value], volumes: &[Value], dir: &str| -> Value {
        let m = mounts.iter().find(|m| dir.starts_with(s(&m["mountPath"]))).unwrap_or_else(|| panic!("{dir} on a volume"));
        volumes.iter().find(|v| v["name"] == m["name"]).cloned().unwrap_or_else(|| panic!("volume {:?}", m["name"]))
    };
    let checkpoint_dir = s(&config["checkpoint"]["dir"]);
    assert_eq!(volume_at(ingest_mounts, ingest_volumes, checkpoint_dir)["persistentVolumeClaim"]["claimName"], pvc["metadata"]["name"]);
    assert!(volume_at(ingest_mounts, ingest_volumes, s(&config["history"]["dir"]))["emptyDir"].is_mapping());
    assert_eq!(volume_at(ingest_mounts, ingest_volumes, args[2])["configMap"]["name"], cm["metadata"]["name"]);
    assert_eq!(ingest_pod["securityContext"], pod["securityContext"]);
    assert_eq!(ingest_container["securityContext"], container["securityContext"]);

    // Selectors: each controller and disruption budget takes its own stage's pods only, the
    // API services the site stage's, and the PodMonitor both, under the job the rules select.
    let site_labels = &sts["spec"]["template"]["metadata"]["labels"];
    let ingest_labels = &ingest["spec"]["template"]["metadata"]["labels"];
    let selects = |selector: &Value, labels: &Value| selector.as_mapping().unwrap().iter().all(|(k, v)| &labels[k] == v);
    let selects_only = |selector: &Value, labels: &Value| {
        let other = if labels == site_labels { ingest_labels } else { site_labels };
        selects(selector, labels) && !selects(selector, other)
    };
    assert!(selects_only(&sts["spec"]["selector"]["matchLabels"], site_labels));
    assert!(selects_only(&ingest["spec"]["selector"]["matchLabels"], ingest_labels));
    let budgets: Vec<Value> =
        kubernetes_files().iter().flat_map(|p| yaml_docs(p)).filter(|d| d["kind"].as_str() == Some("PodDisruptionBudget")).collect();
    assert_eq!(budgets.len(), 2, "one per stage");
    let budget_of = |labels: &Value| budgets.iter().filter(|b| selects_only(&b["spec"]["selector"]["matchLabels"], labels)).count();
    assert_eq!((budget_of(site_labels), budget_of(ingest_labels)), (1, 1));
    let pm = manifest("PodMonitor");
    for labels in [site_labels, ingest_labels] {
        assert!(selects(&pm["spec"]["selector"]["matchLabels"], labels));
        assert_eq!(labels[s(&pm["spec"]["jobLabel"])].as_str(), Some("siteflow"), "job=\"siteflow\" as the rules expect");
    }
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"].as_str(), Some("http"));
    assert_eq!(ingest_container["ports"], container["ports"]);
    let services: Vec<Value> =
        kubernetes_files().iter().flat_map(|p| yaml_docs(p)).filter(|d| d["kind"].as_str() == Some("Service")).collect();
    assert_eq!(services.len(), 2);
    for svc in &services {
        assert!(selects_only(&svc["spec"]["selector"], site_labels), "{:?} routes to the site stage", svc["metadata"]["name"]);
        assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(u64::from(port)));
    }
    assert!(
        services
            .iter()
            .any(|svc| svc["metadata"]["name"] == sts["spec"]["serviceName"] && svc["spec"]["clusterIP"].as_str() == Some("None"))
    );
}

// ---------------------------------------------------------------------------------------------
// deploy/systemd

#[test]
fn systemd_unit_verifies_and_is_sandboxed() {
    let analyze = system_tool("systemd-analyze", "systemd");
    let unit = read(&deploy("systemd/siteflow.service"));
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[..3], ["/usr/local/bin/siteflow", "run", "--config"]);
    let config_abs = argv[3];

    // The install layout of the unit's header: /etc/siteflow/siteflow.yaml + pipelines/.
    let root = tempfile::tempdir().unwrap();
    let config = inside(root.path(), config_abs);
    copy_into(&deploy("systemd/siteflow.yaml"), &config);
    copy_into(&repo().join("pipelines"), &config.parent().unwrap().join("pipelines"));
    siteflow_check(&config);
    let parsed = siteflow_config(&config);
    let state = s(&parsed["checkpoint"]["dir"]);
    let state_dir = unit.lines().find_map(|l| l.strip_prefix("StateDirectory=")).unwrap();
    assert!(
        state.starts_with(&format!("/var/lib/{state_dir}/")),
        "checkpoints in the StateDirectory (writable under ProtectSystem=strict)"
    );
    assert!(s(&parsed["history"]["dir"]).starts_with(&format!("/var/lib/{state_dir}/")));

    // systemd-analyze verify needs the binary and the files to exist: point the unit at the
    // built binary and the temporary layout.
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_siteflow"));
    let rewritten = unit.replace("/usr/local/bin/siteflow", binary.to_str().unwrap()).replace(config_abs, config.to_str().unwrap());
    let units = tempfile::tempdir().unwrap();
    let path = units.path().join("siteflow.service");
    std::fs::write(&path, &rewritten).unwrap();
    let out = succeeds(Command::new(&analyze).arg("verify").arg(&path));
    // verify exits 0 on unknown keys and other mistakes, only printing them: any output fails.
    assert!(out.trim().is_empty(), "systemd-analyze verify:\n{out}");
    let bad = units.path().join("misspelt.service");
    std::fs::write(&bad, rewritten.replace("ProtectHome=", "ProtectHomes=")).unwrap();
    assert!(text(&output(Command::new(&analyze).arg("verify").arg(&bad))).contains("ProtectHomes"), "verify reports unknown keys");

    // The unit's ExecStartPre is the check that just passed.
    let pre = rewritten.lines().find_map(|l| l.strip_prefix("ExecStartPre=")).unwrap();
    let pre: Vec<&str> = pre.split_whitespace().collect();
    succeeds(Command::new(pre[0]).args(&pre[1..]));

    // The sandbox: systemd's own exposure score, 0 (locked down) to 10 (unprotected).
    let out = succeeds(Command::new(&analyze).args(["security", "--offline=yes", "--no-pager"]).arg(&path));
    let score: f64 = out
        .lines()
        .find_map(|l| l.split("Overall exposure level for siteflow.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no exposure level:\n{out}"))
        .parse()
        .unwrap();
    assert!(score <= 2.0, "exposure level {score} (≤ 2.0 expected):\n{out}");
    for key in
        ["User=siteflow", "Type=simple", "KillSignal=SIGTERM", "Restart=on-failure", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n"]
    {
        assert!(unit.contains(key), "{key}");
    }
}

// ---------------------------------------------------------------------------------------------
// docs/operations.md

/// Metric names in the operator's guide and the deployment files exist: in docs/metrics.md
/// or as a recording rule.
#[test]
fn operations_guide_names_only_real_metrics_and_has_a_runbook_per_alert() {
    let guide = read(&repo().join("docs/operations.md"));
    let metrics_doc = read(&repo().join("docs/metrics.md"));
    let recording = read(&deploy("prometheus/rules/recording.yml"));
    let mut known: BTreeSet<String> = BTreeSet::new();
    for line in recording.lines().filter_map(|l| l.trim().strip_prefix("- record: ")) {
        known.insert(line.trim().to_string());
    }
    let names = |t: &str| -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let bytes = t.as_bytes();
        let mut i = 0;
        while let Some(pos) = t[i..].find("siteflow_") {
            let start = i + pos;
            let before = start.checked_sub(1).map(|b| bytes[b]);
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_') {
                end += 1;
            }
            // Skip parts of longer identifiers (record names like district:siteflow_...).
            if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b':' || b == b'_') {
                out.insert(t[start..end].trim_end_matches('_').to_string());
            }
            i = end;
        }
        out
    };
    let documented = names(&metrics_doc);
    // Families named after SQL columns, documented as `siteflow_site_probe_<column>`.
    let families: Vec<String> = metrics_doc
        .split("_<column>")
        .filter_map(|before| before.rfind("siteflow_").map(|i| &before[i..]))
        .filter(|f| f.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        .map(str::to_string)
        .collect();
    let exists = |n: &str| {
        let base = n.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum");
        documented.contains(n)
            || documented.contains(base)
            || known.iter().any(|k| k.contains(n))
            || families.iter().any(|f| !f.is_empty() && n.starts_with(&format!("{f}_")))
    };
    let mut files = vec![repo().join("docs/operations.md")];
    for dir in ["compose", "kubernetes", "systemd", "container"] {
        for entry in walk(&deploy(dir)) {
            files.push(entry);
        }
    }
    files.push(deploy("Dockerfile"));
    let mut unknown = Vec::new();
    for file in &files {
        // Generated PrometheusRules repeat deploy/prometheus/rules, checked against the same doc there.
        if file.file_name().is_some_and(|n| n.to_string_lossy().starts_with("prometheusrule-")) {
            continue;
        }
        for name in names(&read(file)) {
            // Configuration and object names that merely start with siteflow_ are not metrics.
            if name.starts_with("siteflow_") && !exists(&name) {
                unknown.push(format!("{}: {name}", file.display()));
            }
        }
    }
    assert!(unknown.is_empty(), "metric names found neither in docs/metrics.md nor in the recording rules:\n{}", unknown.join("\n"));

    // A runbook section per alert.
    let alerts = read(&deploy("prometheus/rules/alerts.yml"));
    for alert in alerts.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(guide.contains(&format!("### {alert}")), "docs/operations.md has no runbook section `### {alert}`");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
