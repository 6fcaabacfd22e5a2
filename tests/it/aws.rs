//! The `aws` provider and the S3 snapshot store against moto's server (a real AWS API
//! emulator on 127.0.0.1, started per test from the venv `ci-setup` installs).
//!
//! For EC2 the test plays the hypervisor: for each instance the coordinator launches, it reads
//! the user-data back from moto (DescribeInstanceAttribute), and starts a `pype-agent` with
//! exactly that configuration, in its own work dir and network namespace; when the instance
//! is terminated in moto, its agent is killed.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, InstanceStateName, ResourceType, Tag, TagSpecification};
use base64::Engine as _;
use tests::{Cluster, Lan, MOTO_SECRET, Moto, Proc, Signal, T, example_in, run_id};

const LONG: Duration = Duration::from_secs(240);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// The shared fixture (every coordinator process with moto's credentials in its
/// environment), moto, and a runtime for the test's own SDK calls; derefs to the [`Cluster`].
struct Fx {
    cluster: Cluster,
    moto: Moto,
    rt: tokio::runtime::Runtime,
}

impl Deref for Fx {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Fx {
    fn new(test: &str, moto_host: &str) -> Option<Fx> {
        let moto = Moto::start_on(test, moto_host)?;
        let mut cluster = Cluster::new();
        for (k, v) in moto.env() {
            cluster = cluster.env(k, &v);
        }
        Some(Fx { cluster, moto, rt: rt() })
    }

    /// `run --provider aws --provider-config CFG EXTRA... PIPELINE`.
    fn start_aws_run(&self, state: &Path, cfg: &Path, pipeline: &Path, extra: &[&str]) -> Proc {
        let mut args = vec!["--provider", "aws", "--provider-config", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.push(pipeline.to_str().unwrap());
        self.start_run_at(state, &args, &[])
    }

    /// An image moto knows.
    fn image_id(&self) -> String {
        let ec2 = self.moto.ec2();
        let out = self.rt.block_on(ec2.describe_images().send()).unwrap();
        out.images().first().and_then(|i| i.image_id()).expect("moto has no images").to_string()
    }

    /// Provider config: moto's endpoint, three instance types, `coordinator_host` where the
    /// agents reach the coordinator.
    fn provider_config(&self, coordinator_host: &str) -> PathBuf {
        self.provider_config_at(coordinator_host, &self.moto.endpoint, "")
    }

    /// `extra`: more lines for the `[aws]` table.
    fn provider_config_at(&self, coordinator_host: &str, endpoint: &str, extra: &str) -> PathBuf {
        self.moto.create_instance_profile("pype-agent");
        let path = self.p("provider.toml");
        let text = format!(
            "boot_timeout_secs = 60\nsweep_interval_secs = 2\norphan_timeout_secs = 600\nmax_instances = 2\n\
             coordinator_host = \"{coordinator_host}\"\n\
             [aws]\nendpoint_url = \"{}\"\nregion = \"us-east-1\"\nimage_id = \"{}\"\n\
             instance_profile = \"pype-agent\"\nmax_attempts = 3\n{extra}\n\
             instance_types = [\n\
               {{ name = \"m5.2xlarge\", cpus = 8, memory_gib = 32.0, price = 0.384 }},\n\
               {{ name = \"t3.small\", cpus = 2, memory_gib = 2.0, price = 0.0208 }},\n\
               {{ name = \"t3.large\", cpus = 2, memory_gib = 8.0, price = 0.0832 }},\n]\n",
            endpoint,
            self.image_id()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// EC2 instances carrying `key=value`: (id, state, type, tags).
    fn instances(
        &self,
        key: &str,
        value: Option<&str>,
    ) -> Vec<(String, String, String, BTreeMap<String, String>)> {
        let ec2 = self.moto.ec2();
        let f = match value {
            Some(v) => Filter::builder().name(format!("tag:{key}")).values(v).build(),
            None => Filter::builder().name("tag-key").values(key).build(),
        };
        let out = self.rt.block_on(ec2.describe_instances().filters(f).send()).unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                let tags = i
                    .tags()
                    .iter()
                    .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
                    .collect();
                (
                    i.instance_id().unwrap().to_string(),
                    i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default(),
                    i.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
                    tags,
                )
            })
            .collect()
    }
}

fn alive(state: &str) -> bool {
    state == InstanceStateName::Pending.as_str() || state == InstanceStateName::Running.as_str()
}

/// `write_files` of a `#cloud-config` user-data: path -> decoded content.
fn write_files(user_data: &str) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    let (mut path, mut encoding) = (None::<String>, String::new());
    for line in user_data.lines() {
        let t = line.trim_start().trim_start_matches("- ");
        if let Some(p) = t.strip_prefix("path: ") {
            path = Some(p.trim().to_string());
        } else if let Some(e) = t.strip_prefix("encoding: ") {
            encoding = e.trim().to_string();
        } else if let Some(c) = t.strip_prefix("content: ")
            && let Some(p) = path.take()
        {
            let raw = base64::engine::general_purpose::STANDARD.decode(c.trim()).unwrap();
            let bytes = if encoding.starts_with("gz") {
                let mut s = Vec::new();
                flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut s).unwrap();
                s
            } else {
                raw
            };
            out.insert(p, bytes);
        }
    }
    out
}

/// One instance the hypervisor booted.
struct Booted {
    ec2_id: String,
    user_data: String,
    env: BTreeMap<String, String>,
    /// Tags of the instance's volumes, read while it ran (they go with it).
    volume_tags: Vec<BTreeMap<String, String>>,
    agent: Proc,
}

/// Watches moto for instances of any pype coordinator and "boots" each: its agent runs with
/// the configuration in its user-data, in its own dir and network namespace (when `lan`).
struct Hypervisor {
    stop: Arc<AtomicBool>,
    booted: Arc<Mutex<Vec<Booted>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hypervisor {
    fn start(moto: &Moto, agent_bin: &Path, dir: &Path, lan: Option<Arc<Lan>>) -> Hypervisor {
        let stop = Arc::new(AtomicBool::new(false));
        let booted: Arc<Mutex<Vec<Booted>>> = Arc::default();
        let ec2 = moto.ec2();
        let (s, b, bin, dir) = (stop.clone(), booted.clone(), agent_bin.to_path_buf(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            let rt = rt();
            while !s.load(Ordering::Relaxed) {
                let f = Filter::builder().name("tag-key").values("pype:coordinator").build();
                let Ok(out) = rt.block_on(ec2.describe_instances().filters(f).send()) else { continue };
                for i in out.reservations().iter().flat_map(|r| r.instances()) {
                    let id = i.instance_id().unwrap().to_string();
                    let state =
                        i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default();
                    let mut booted = b.lock().unwrap();
                    match booted.iter_mut().find(|x| x.ec2_id == id) {
                        // Terminated: the machine is gone, and its agent with it.
                        Some(x) if !alive(&state) => {
                            let _ = x.agent.child.kill();
                        }
                        Some(_) => {}
                        None if alive(&state) => {
                            // A machine without user-data boots, but no agent starts on it.
                            if let Some(m) = boot(&rt, &ec2, &id, &bin, &dir, lan.as_deref()) {
                                booted.push(m);
                            }
                        }
                        None => {}
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            for x in b.lock().unwrap().iter_mut() {
                let _ = x.agent.child.kill();
            }
        });
        Hypervisor { stop, booted, thread: Some(thread) }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads the instance's user-data from moto and starts its agent as cloud-init would.
fn boot(
    rt: &tokio::runtime::Runtime,
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    bin: &Path,
    dir: &Path,
    lan: Option<&Lan>,
) -> Option<Booted> {
    let attr = rt
        .block_on(
            ec2.describe_instance_attribute()
                .instance_id(id)
                .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
                .send(),
        )
        .unwrap();
    let b64 = attr.user_data().and_then(|u| u.value())?;
    let vols = rt
        .block_on(
            ec2.describe_volumes()
                .filters(Filter::builder().name("attachment.instance-id").values(id).build())
                .send(),
        )
        .unwrap();
    let volume_tags = vols
        .volumes()
        .iter()
        .map(|v| {
            v.tags().iter().map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string())).collect()
        })
        .collect();
    let user_data =
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap();
    let files = write_files(&user_data);
    let env_text = String::from_utf8(files["/etc/pype/agent.env"].clone()).unwrap();
    let mut env: BTreeMap<String, String> = env_text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // The machine's root is this instance's dir.
    let root = dir.join(id);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("ca.pem"), &files["/etc/pype/ca.pem"]).unwrap();
    let registry = env["PYPE_SNAPSHOT_REGISTRY"].clone();
    if let Some(r) = files.get(&registry) {
        std::fs::write(root.join("snapshot_registry.json"), r).unwrap();
    }
    let mut local = env.clone();
    local.insert("PYPE_CA".into(), root.join("ca.pem").display().to_string());
    local.insert("PYPE_AGENT_STATE_DIR".into(), root.join("agent").display().to_string());
    local.insert("PYPE_SNAPSHOT_REGISTRY".into(), root.join("snapshot_registry.json").display().to_string());
    // Powering off is the hypervisor's business: the process just ends.
    local.insert("PYPE_ORPHAN_ACTION".into(), "exit".into());
    let conf = root.join("agent.env");
    std::fs::write(&conf, local.iter().map(|(k, v)| format!("{k}={v}\n")).collect::<String>()).unwrap();
    let mut cmd = match lan {
        Some(lan) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &lan.host()]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("run").arg("--config").arg(&conf);
    env.insert("EC2_ID".into(), id.to_string());
    let agent = Proc::spawn(&format!("agent on {id}"), cmd);
    Some(Booted { ec2_id: id.to_string(), user_data, env, volume_tags, agent })
}

/// The example pipeline with `--provider aws`: each instance's agent runs with its user-data's
/// configuration in its own network namespace; instances and volumes are tagged from creation,
/// typed as the cheapest that fits, and all terminated when the run ends.
#[test]
fn example_pipeline_on_ec2_instances() {
    let Some(lan) = Lan::new("example_pipeline_on_ec2_instances") else { return };
    let lan = Arc::new(lan);
    let Some(fx) = Fx::new("example_pipeline_on_ec2_instances", "127.0.0.1") else { return };
    let pipeline = example_in(fx.dir.path());
    let gw = lan.gateway();
    let cfg = fx.provider_config(&gw);
    let mut hv = Hypervisor::start(&fx.moto, &fx.bins.agent, &fx.p("machines"), Some(lan.clone()));
    let state = fx.p("state");
    let listen = format!("{gw}:0");
    let started = std::time::Instant::now();
    let mut run = fx.start_aws_run(&state, &cfg, &pipeline, &["--listen", &listen]);
    let status = run.wait_exit(LONG);
    let wall_h = started.elapsed().as_secs_f64() / 3600.0;
    assert!(status.success(), "{}", run.dump());
    let id = run_id(&run.wait_for(&["run started"], T));
    assert!(run.count(&["ec2 call", "op=\"RunInstances\"", "request_id="]) >= 1, "RunInstances not logged");
    let summary = std::fs::read_to_string(fx.p("out/summary.txt")).unwrap();
    assert!(summary.starts_with("sequences\t800\n"), "{summary}");
    let status_out = fx.cli_ok(&["status", &id]);
    for step in ["generate", "gc-1", "gc-2", "gc-3", "gc-4", "summary"] {
        let line = status_out.lines().find(|l| l.split_whitespace().next() == Some(step)).unwrap();
        assert!(line.contains("succeeded") && line.contains("pype-i-"), "{step}: {line}");
    }
    hv.stop();
    let booted = std::mem::take(&mut *hv.booted.lock().unwrap());
    assert!(!booted.is_empty(), "no instance was booted");
    for b in &booted {
        assert!(b.user_data.starts_with("#cloud-config\n"), "{}", b.user_data);
        assert!(
            !b.user_data.contains(MOTO_SECRET) && !b.user_data.contains("AWS_"),
            "AWS secret in user-data"
        );
        let (_, state, ty, tags) =
            fx.instances("pype:instance", Some(&b.env["PYPE_INSTANCE_ID"])).into_iter().next().unwrap();
        // Terminated at the end of the run.
        assert!(!alive(&state), "{} still {state}", b.ec2_id);
        // The cheapest type with the step's one cpu.
        assert_eq!(ty, "t3.small");
        assert_eq!(tags.get("pype:run"), Some(&id));
        assert!(tags["pype:coordinator"].starts_with("pype-"), "{tags:?}");
        // The step it was sized for; empty for the one started while the run planned.
        assert!(
            ["", "generate", "gc-1", "gc-2", "gc-3", "gc-4", "summary"].contains(&tags["pype:step"].as_str())
        );
        let token = &b.env["PYPE_TOKEN"];
        assert_eq!(tags["pype:instance-secret-hash"], blake3::hash(token.as_bytes()).to_hex()[..32]);
        // The agent enrolled under the instance's id and worked.
        assert!(b.agent.count(&["enrolled"]) >= 1, "{}", b.agent.dump());
        // The volumes carry the tags from creation too.
        assert!(!b.volume_tags.is_empty(), "no volume for {}", b.ec2_id);
        for v in &b.volume_tags {
            assert_eq!(v.get("pype:instance"), Some(&b.env["PYPE_INSTANCE_ID"]), "{v:?}");
            assert_eq!(v.get("pype:coordinator"), tags.get("pype:coordinator"), "{v:?}");
        }
    }
    assert!(booted.len() >= 2, "only {} instance(s) booted", booted.len());
    // What it cost: each t3.small at its configured $0.0208 an hour, for its life.
    tests::check_cost(&fx.cli_ok(&["status", &id, "--json"]), booted.len(), 0.0208, wall_h);
    assert!(fx.cli_ok(&["status", &id]).contains("\ncost "), "status shows the run's cost");
    let stepped =
        fx.instances("pype:run", Some(&id)).iter().filter(|(_, _, _, t)| !t["pype:step"].is_empty()).count();
    assert!(stepped >= 1, "no instance was sized for a step");
    // Nothing of this coordinator is left running.
    assert!(fx.instances("pype:coordinator", None).iter().all(|(_, s, _, _)| !alive(s)));
}

/// A coordinator SIGKILLed between RunInstances and recording the id: on restart its
/// instance is found by tag and terminated, as is a tagged instance the database does not
/// know; another coordinator's instance is left alone.
#[test]
fn killed_after_run_instances_then_reconciled() {
    let Some(fx) = Fx::new("killed_after_run_instances_then_reconciled", "127.0.0.1") else { return };
    let pipeline = example_in(fx.dir.path());
    let cfg = fx.provider_config("127.0.0.1");
    let state = fx.p("state");
    let args = ["--provider", "aws", "--provider-config", cfg.to_str().unwrap(), pipeline.to_str().unwrap()];
    let mut run = fx.start_run_at(&state, &args, &[("PYPE_FAULT_KILL_AFTER_CREATE", "1")]);
    let status = run.wait_exit(T);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(Signal::KILL.as_raw()), "{}", run.dump());
    let run1 = run_id(&run.wait_for(&["run started"], T));
    let ca = std::fs::read_to_string(state.join("ca.pem")).unwrap();
    let tag = format!("pype-{}", &blake3::hash(ca.as_bytes()).to_hex()[..12]);
    let leaked = fx.instances("pype:coordinator", Some(&tag));
    assert_eq!(leaked.len(), 1, "{leaked:?}");
    assert!(alive(&leaked[0].1));
    // A tagged instance nobody recorded, and one of another coordinator.
    let ec2 = fx.moto.ec2();
    let launch = |coordinator: &str| {
        let spec = TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .tags(Tag::builder().key("pype:coordinator").value(coordinator).build())
            .build();
        let out = fx
            .rt
            .block_on(
                ec2.run_instances()
                    .image_id(fx.image_id())
                    .min_count(1)
                    .max_count(1)
                    .tag_specifications(spec)
                    .send(),
            )
            .unwrap();
        out.instances()[0].instance_id().unwrap().to_string()
    };
    let stranger = launch(&tag);
    let foreign = launch("pype-0123456789ab");
    let listing =
        fx.cli_ok(&["instances", "--provider", "aws", "--provider-config", cfg.to_str().unwrap(), "list"]);
    assert!(listing.contains(&format!("{stranger} ")) && listing.contains("not accounted for"), "{listing}");
    // Restart: the run resumes, the reconciler ends both leftovers before anything else.
    let mut hv = Hypervisor::start(&fx.moto, &fx.bins.agent, &fx.p("machines"), None);
    let mut resumed = fx.start_run_at(
        &state,
        &["--resume", &run1, "--provider", "aws", "--provider-config", cfg.to_str().unwrap()],
        &[],
    );
    let status = resumed.wait_exit(LONG);
    assert!(status.success(), "{}", resumed.dump());
    assert!(resumed.count(&["left by a previous coordinator"]) >= 2, "{}", resumed.dump());
    hv.stop();
    let by_id: HashMap<String, String> =
        fx.instances("pype:coordinator", None).into_iter().map(|(id, s, _, _)| (id, s)).collect();
    assert!(!alive(&by_id[&leaked[0].0]), "the leaked instance is {}", by_id[&leaked[0].0]);
    assert!(!alive(&by_id[&stranger]), "the unknown tagged instance is {}", by_id[&stranger]);
    assert!(alive(&by_id[&foreign]), "another coordinator's instance was touched");
    assert!(by_id.iter().filter(|(id, _)| **id != foreign).all(|(_, s)| !alive(s)), "{by_id:?}");
}

/// `p.toml`: `big` writes 12 MiB of seeded random bytes (three 5 MiB parts), `small` a line,
/// `use` their checksums.
fn s3_pipeline(dir: &Path) -> PathBuf {
    let d = dir.display();
    let text = format!(
        "name = \"s3\"\ndata_root = \"{d}/data\"\n\
         [[steps]]\nname = \"big\"\n\
         command = \"mkdir -p {{{{data_root}}}} && python3 -c 'import random,sys; random.seed(7); sys.stdout.buffer.write(random.randbytes(12 << 20))' > {{{{data_root}}}}/big.bin\"\n\
         outputs = [\"big.bin\"]\n\
         [[steps]]\nname = \"small\"\n\
         command = \"mkdir -p {{{{data_root}}}}/sub && echo hello > {{{{data_root}}}}/sub/small.txt\"\n\
         outputs = [\"sub/small.txt\"]\n\
         [[steps]]\nname = \"use\"\n\
         command = \"sha256sum {{{{data_root}}}}/big.bin {{{{data_root}}}}/sub/small.txt | cut -c1-64 > {{{{data_root}}}}/sums.txt\"\n\
         inputs = [\"big.bin\", \"sub/small.txt\"]\noutputs = [\"sums.txt\"]\n"
    );
    let path = dir.join("p.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn registry_shape(state: &Path) -> BTreeMap<String, String> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("snapshot_registry.json")).unwrap()).unwrap();
    let map = json.as_object().unwrap();
    let entries = map.get("entries").and_then(|e| e.as_object()).unwrap_or(map);
    entries
        .iter()
        .map(|(k, v)| {
            let tail = k.rsplit("/data/").next().unwrap().to_string();
            (tail, v["in_snapshot_path"].as_str().unwrap_or("").rsplit("/data/").next().unwrap().to_string())
        })
        .collect()
}

/// The S3 store: snapshots are manifests and packed blobs; agents upload the packs of the
/// blobs the store lacks and read the blobs they lack with byte ranges, at presigned URLs; the
/// run leaves the same registry and outputs as one on the local store; a pack corrupted in
/// the bucket is refused by its digests.
#[test]
fn s3_store_direct_transfers_and_digest() {
    let Some(fx) = Fx::new("s3_store_direct_transfers_and_digest", "127.0.0.1") else { return };
    let s3 = fx.moto.s3();
    fx.rt.block_on(s3.create_bucket().bucket("pype-test").send()).unwrap();
    // The same pipeline on the local store and on S3, in two dirs.
    let mut outs = Vec::new();
    for kind in ["local", "s3"] {
        let dir = fx.p(kind);
        std::fs::create_dir_all(dir.join("state")).unwrap();
        if kind == "s3" {
            std::fs::write(
                dir.join("state/coordinator.toml"),
                format!(
                    "[store]\nkind = \"s3\"\nbucket = \"pype-test\"\nprefix = \"runs/snapshots\"\nregion = \"us-east-1\"\n\
                     endpoint_url = \"{}\"\nforce_path_style = true\npart_size_mib = 5\npresign_ttl_secs = 300\n",
                    fx.moto.endpoint
                ),
            )
            .unwrap();
        }
        let p = s3_pipeline(&dir);
        let mut run = fx.start_run_at(&dir.join("state"), &["--agents", "2", p.to_str().unwrap()], &[]);
        assert!(run.wait_exit(LONG).success(), "{}", run.dump());
        if kind == "s3" {
            // Blobs went between agents and the bucket, never through the coordinator: what
            // a relayed fetch line counts is the manifest alone.
            let dump = run.dump();
            assert!(run.count(&["transfer done", "direction=\"store-direct\""]) >= 3, "{dump}");
            assert!(run.count(&["download handed out", "direction=\"fetch-direct\""]) >= 1, "{dump}");
            assert_eq!(run.count(&["transfer done", "direction=\"store\""]), 0, "{dump}");
            for line in
                dump.lines().filter(|l| l.contains("transfer done") && l.contains("direction=\"fetch\""))
            {
                let wire: u64 = line
                    .split("wire_bytes=")
                    .nth(1)
                    .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(u64::MAX);
                assert!(wire < 64 << 10, "blob bytes relayed by the coordinator: {line}");
            }
        }
        let sums = std::fs::read_to_string(dir.join("data/sums.txt")).unwrap();
        outs.push((registry_shape(&dir.join("state")), sums));
    }
    assert_eq!(outs[0].0, outs[1].0, "registries differ");
    assert_eq!(outs[0].0.len(), 3, "{:?}", outs[0].0);
    assert_eq!(outs[0].1, outs[1].1, "outputs differ");
    // Objects: a manifest and an index per snapshot, packs with their indexes, no archives.
    let listed =
        fx.rt.block_on(s3.list_objects_v2().bucket("pype-test").prefix("runs/snapshots/").send()).unwrap();
    let objects: Vec<(String, i64)> =
        listed.contents().iter().map(|o| (o.key().unwrap().to_string(), o.size().unwrap_or(0))).collect();
    let keys: Vec<&String> = objects.iter().map(|(k, _)| k).collect();
    assert!(!keys.iter().any(|k| k.ends_with(".tar.zst")), "{keys:?}");
    assert_eq!(keys.iter().filter(|k| k.contains("/cas/manifests/")).count(), 3, "{keys:?}");
    assert_eq!(keys.iter().filter(|k| k.ends_with(".json")).count(), 3, "{keys:?}");
    let packs: Vec<&(String, i64)> =
        objects.iter().filter(|(k, _)| k.contains("/cas/packs/") && !k.ends_with(".idx")).collect();
    let indexes = keys.iter().filter(|k| k.contains("/cas/packs/") && k.ends_with(".idx")).count();
    assert!(!packs.is_empty() && packs.len() == indexes, "{keys:?}");
    // Corrupt the pack holding the 12 MiB output, drop the agents' caches, and re-run the
    // step that reads it: the agent refuses the bytes by their digests.
    let (big_key, _) = packs.iter().max_by_key(|(_, size)| *size).map(|p| (*p).clone()).unwrap();
    let obj = fx.rt.block_on(s3.get_object().bucket("pype-test").key(&big_key).send()).unwrap();
    let mut bytes = fx.rt.block_on(obj.body.collect()).unwrap().into_bytes().to_vec();
    assert!(bytes.len() > 12 << 20, "the 12 MiB output is in one pack: {} bytes", bytes.len());
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fx.rt.block_on(s3.put_object().bucket("pype-test").key(&big_key).body(bytes.into()).send()).unwrap();
    let state = fx.p("s3/state");
    let _ = std::fs::remove_dir_all(state.join("local-agents"));
    let p = fx.p("s3/p.toml");
    let mut run = fx.start_run_at(&state, &["--agents", "1", "--force", "use", p.to_str().unwrap()], &[]);
    let status = run.wait_exit(LONG);
    assert!(!status.success(), "a corrupted input was accepted:\n{}", run.dump());
    let agent_log = std::fs::read_to_string(state.join("local-agents/agent-1/agent.log")).unwrap_or_default();
    let refused = "does not match its digest and length";
    assert!(
        agent_log.contains(refused) || run.dump().contains(refused),
        "no digest error:\n{agent_log}\n{}",
        run.dump()
    );
}

/// Throttling is retried by the SDK with backoff and never reaches the run; a capacity error
/// keeps the step queued, and the next create takes the next cheapest type that fits.
/// `tests/aws/fault_proxy.py` in front of moto: `throttles` throttled RunInstances, then
/// `capacity_errors` capacity errors for `capacity_type`. Returns the proxy and its endpoint.
fn fault_proxy(fx: &Fx, throttles: u32, capacity_type: &str, capacity_errors: u32) -> (Proc, String) {
    fault_proxy_with(fx, &[&throttles.to_string(), capacity_type, &capacity_errors.to_string()])
}

/// The fault proxy with its arguments after the upstream URL.
fn fault_proxy_with(fx: &Fx, args: &[&str]) -> (Proc, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("aws/fault_proxy.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(&fx.moto.endpoint).args(args);
    let proxy = Proc::spawn("fault proxy", cmd);
    let line = proxy.wait_for(&["listening on"], T);
    let port = line.rsplit(' ').next().unwrap().trim().to_string();
    (proxy, format!("http://127.0.0.1:{port}"))
}

#[test]
fn throttling_retried_and_capacity_keeps_the_step_queued() {
    let Some(fx) = Fx::new("throttling_retried_and_capacity_keeps_the_step_queued", "127.0.0.1") else {
        return;
    };
    let (proxy, endpoint) = fault_proxy(&fx, 2, "t3.small", 1);
    let pipeline = example_in(fx.dir.path());
    let cfg = fx.provider_config_at("127.0.0.1", &endpoint, "");
    let _hv = Hypervisor::start(&fx.moto, &fx.bins.agent, &fx.p("machines"), None);
    let state = fx.p("state");
    let mut run = fx.start_aws_run(&state, &cfg, &pipeline, &["--max-agents", "1"]);
    let status = run.wait_exit(LONG);
    assert!(status.success(), "{}\n{}", run.dump(), proxy.dump());
    assert_eq!(proxy.count(&["injected RequestLimitExceeded"]), 2);
    assert_eq!(proxy.count(&["injected InsufficientInstanceCapacity"]), 1);
    // Throttling never surfaced; capacity did, as a wait, not a failure.
    assert_eq!(run.count(&["provisioning:", "RequestLimitExceeded"]), 0, "{}", run.dump());
    assert_eq!(
        run.count(&["no capacity for an instance: the step stays queued", "InsufficientInstanceCapacity"]),
        1
    );
    let id = run_id(&run.wait_for(&["run started"], T));
    let types: Vec<String> = fx.instances("pype:run", Some(&id)).into_iter().map(|(_, _, t, _)| t).collect();
    assert!(!types.is_empty() && types.iter().all(|t| t == "t3.large"), "{types:?}");
}

#[test]
fn spot_instances_carry_the_market_options_and_run_the_pipeline() {
    let Some(fx) = Fx::new("spot_instances_carry_the_market_options_and_run_the_pipeline", "127.0.0.1")
    else {
        return;
    };
    let (proxy, endpoint) = fault_proxy(&fx, 0, "none", 0);
    let pipeline = example_in(fx.dir.path());
    let cfg = fx.provider_config_at("127.0.0.1", &endpoint, "market = \"spot\"\nspot_max_price = \"0.05\"");
    let mut hv = Hypervisor::start(&fx.moto, &fx.bins.agent, &fx.p("machines"), None);
    let state = fx.p("state");
    let mut run = fx.start_aws_run(&state, &cfg, &pipeline, &[]);
    let status = run.wait_exit(LONG);
    assert!(status.success(), "{}\n{}", run.dump(), proxy.dump());
    hv.stop();
    // What went over the wire: a one-time spot request under the cap, ended with the instance.
    let requests = proxy.count(&["RunInstances "]);
    assert!(requests >= 1, "{}", proxy.dump());
    for want in [
        "InstanceMarketOptions.MarketType=spot",
        "InstanceMarketOptions.SpotOptions.MaxPrice=0.05",
        "InstanceMarketOptions.SpotOptions.SpotInstanceType=one-time",
        "InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior=terminate",
    ] {
        assert_eq!(proxy.count(&["RunInstances ", want]), requests, "{want}\n{}", proxy.dump());
    }
    // What EC2 made of it: spot instances, all of them gone at the end.
    let id = run_id(&run.wait_for(&["run started"], T));
    let ec2 = fx.moto.ec2();
    let f = Filter::builder().name("tag:pype:run").values(&id).build();
    let out = fx.rt.block_on(ec2.describe_instances().filters(f).send()).unwrap();
    let instances: Vec<_> = out.reservations().iter().flat_map(|r| r.instances()).collect();
    assert_eq!(instances.len(), requests, "{instances:?}");
    for i in instances {
        assert_eq!(i.instance_lifecycle().map(|l| l.as_str()), Some("spot"), "{i:?}");
        let state = i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default();
        assert!(!alive(&state), "{} is {state}", i.instance_id().unwrap_or_default());
    }
}

/// A subnet that does not exist: EC2 refuses every RunInstances, and after a few the run
/// fails saying so, long before its agent wait (3 minutes here) is over.
#[test]
fn a_subnet_that_does_not_exist_fails_the_run_at_once() {
    let Some(fx) = Fx::new("a_subnet_that_does_not_exist_fails_the_run_at_once", "127.0.0.1") else { return };
    let pipeline = example_in(fx.dir.path());
    let cfg =
        fx.provider_config_at("127.0.0.1", &fx.moto.endpoint, "subnet_id = \"subnet-0123456789abcdef0\"");
    let state = fx.p("state");
    let started = std::time::Instant::now();
    let mut run = fx.start_aws_run(&state, &cfg, &pipeline, &[]);
    assert!(!run.wait_exit(LONG).success(), "{}", run.dump());
    let line = run.wait_for(&["did not start"], T);
    assert!(
        line.contains("no instance can be created") && line.contains("InvalidSubnetID.NotFound"),
        "{line}\n{}",
        run.dump()
    );
    assert_eq!(run.count(&["the provider refuses to create instances as configured"]), 1, "{}", run.dump());
    assert_eq!(run.count(&["ec2 call", "RunInstances"]), 3, "{}", run.dump());
    assert!(started.elapsed() < Duration::from_secs(120), "took {:?}", started.elapsed());
    assert!(fx.instances("pype:coordinator", None).is_empty());
}

/// Mid-run, EC2 starts refusing RunInstances (a permission revoked) and the only agent dies:
/// the run fails, saying why, instead of waiting for an instance that cannot come.
#[test]
fn refused_creates_with_no_agent_left_fail_the_run() {
    let Some(fx) = Fx::new("refused_creates_with_no_agent_left_fail_the_run", "127.0.0.1") else { return };
    let (proxy, endpoint) = fault_proxy_with(&fx, &["0", "none", "0", "1"]);
    let pipeline = fx.p("p.toml");
    std::fs::write(&pipeline, "name = \"stall\"\n[[steps]]\nname = \"long\"\ncommand = \"sleep 60\"\n")
        .unwrap();
    let cfg = fx.provider_config_at("127.0.0.1", &endpoint, "");
    let hv = Hypervisor::start(&fx.moto, &fx.bins.agent, &fx.p("machines"), None);
    let state = fx.p("state");
    let mut run = fx.start_aws_run(&state, &cfg, &pipeline, &["--max-agents", "1"]);
    run.wait_for(&["step started", "step=\"long\""], LONG);
    for b in hv.booted.lock().unwrap().iter_mut() {
        let _ = b.agent.child.kill();
    }
    assert!(!run.wait_exit(LONG).success(), "{}", run.dump());
    run.wait_for(
        &["run stalled", "no agent is connected and no instance can be created", "UnauthorizedOperation"],
        T,
    );
    let line = run.wait_for(&["did not succeed"], T);
    assert!(line.contains("UnauthorizedOperation"), "{line}");
    assert_eq!(proxy.count(&["injected UnauthorizedOperation"]), 3, "{}", proxy.dump());
    let id = run_id(&run.wait_for(&["run started"], T));
    let left: Vec<_> =
        fx.instances("pype:run", Some(&id)).into_iter().filter(|(_, s, _, _)| alive(s)).collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Issue 19 point 1: small blobs are packed, so 40,000 small files make a few objects, not
/// 40,000; and a manifest far over a frame's limit (long names) goes through, since it is
/// sent as bytes, not in a frame (issue 16 point 8 refused such a direct upload).
#[test]
fn forty_thousand_small_files_make_a_few_packs_in_the_bucket() {
    let Some(fx) = Fx::new("forty_thousand_small_files_make_a_few_packs_in_the_bucket", "127.0.0.1") else {
        return;
    };
    let s3 = fx.moto.s3();
    fx.rt.block_on(s3.create_bucket().bucket("pype-index").send()).unwrap();
    let state = fx.p("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("coordinator.toml"),
        format!(
            "[store]\nkind = \"s3\"\nbucket = \"pype-index\"\nregion = \"us-east-1\"\n\
             endpoint_url = \"{}\"\nforce_path_style = true\npart_size_mib = 5\n",
            fx.moto.endpoint
        ),
    )
    .unwrap();
    // 40,000 distinct files with 240-character names: a manifest of more than 8 MiB.
    let d = fx.dir.path().display();
    let pipeline = fx.p("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "name = \"many\"\n[[steps]]\nname = \"many\"\n\
             command = \"python3 -c 'import os; os.makedirs(\\\"{d}/out\\\"); [open(\\\"{d}/out/%0240d\\\" % i, \\\"w\\\").write(\\\"file %d\\\" % i) for i in range(40000)]'\"\n\
             outputs = [\"{d}/out\"]\n"
        ),
    )
    .unwrap();
    let mut run = fx.start_run_at(&state, &["--agents", "1", pipeline.to_str().unwrap()], &[]);
    assert!(run.wait_exit(LONG).success(), "{}", run.dump());
    assert!(run.count(&["transfer done", "direction=\"store-direct\""]) >= 1, "{}", run.dump());
    let listed = fx.rt.block_on(s3.list_objects_v2().bucket("pype-index").send()).unwrap();
    let objects: Vec<(String, i64)> =
        listed.contents().iter().map(|o| (o.key().unwrap().to_string(), o.size().unwrap_or(0))).collect();
    let packs = objects.iter().filter(|(k, _)| k.contains("/cas/packs/") && !k.ends_with(".idx")).count();
    assert!((1..=2).contains(&packs), "40,000 small blobs in {packs} packs: {objects:?}\n{}", run.dump());
    assert!(objects.len() <= 2 * packs + 2, "{objects:?}\n{}", run.dump());
    let (_, manifest_size) =
        objects.iter().find(|(k, _)| k.contains("/cas/manifests/")).expect("no manifest");
    assert!(*manifest_size as u64 > protocol::MAX_FRAME_LEN as u64, "manifest of {manifest_size} bytes");
    // The outputs came back whole through the packs (written out by the coordinator).
    let back = std::fs::read_to_string(fx.dir.path().join("out").join(format!("{:0240}", 39_999))).unwrap();
    assert_eq!(back, "file 39999");
}

/// Issue 19 point 5: a snapshot an older coordinator stored in S3 as an archive
/// (`<id>.tar.zst` with its digest as metadata, and `<id>.json`) is still fetched by today's
/// agents, at a presigned URL and checked against its digest, and read by a step; the outputs
/// of that run are stored as manifest and packs beside it.
#[test]
fn an_archive_an_older_coordinator_stored_in_s3_is_still_read() {
    let Some(fx) = Fx::new("an_archive_an_older_coordinator_stored_in_s3_is_still_read", "127.0.0.1") else {
        return;
    };
    let s3 = fx.moto.s3();
    fx.rt.block_on(s3.create_bucket().bucket("pype-old").send()).unwrap();
    std::fs::create_dir_all(fx.state()).unwrap();
    std::fs::write(
        fx.state().join("coordinator.toml"),
        format!(
            "[store]\nkind = \"s3\"\nbucket = \"pype-old\"\nprefix = \"old\"\nregion = \"us-east-1\"\n\
             endpoint_url = \"{}\"\nforce_path_style = true\npart_size_mib = 5\n",
            fx.moto.endpoint
        ),
    )
    .unwrap();
    // The archive, as the older store wrote it.
    let src = fx.p("src");
    std::fs::create_dir_all(src.join("x")).unwrap();
    std::fs::write(src.join("x/hello.txt"), "from the old store\n").unwrap();
    let archive = fx.p("old.tar.zst");
    let (trailer, _) =
        transport::archive::write(&src, &[std::path::PathBuf::from("x")], &archive, 3).unwrap();
    let id = coordinator::store::snapshot_id_of(&trailer.digest);
    let (files, _) = transport::archive::index(&archive, transport::UnpackLimits::default()).unwrap();
    let meta = coordinator::store::meta_from_index(&id, trailer.bytes, &trailer.digest, files).unwrap();
    let put = |key: String, body: Vec<u8>, digest: Option<String>| {
        let mut req = s3.put_object().bucket("pype-old").key(key).body(body.into());
        if let Some(d) = digest {
            req = req.metadata("blake3", d);
        }
        fx.rt.block_on(req.send()).unwrap();
    };
    put(format!("old/{id}.tar.zst"), std::fs::read(&archive).unwrap(), Some(hex::encode(trailer.digest)));
    put(format!("old/{id}.json"), serde_json::to_vec(&meta).unwrap(), None);
    let reg = fx.p("reg.json");
    let input = fx.pstr("in/hello.txt");
    std::fs::write(
        &reg,
        serde_json::json!({ input.clone(): { "snapshot_id": id, "in_snapshot_path": "x/hello.txt" } })
            .to_string(),
    )
    .unwrap();
    fx.cli_ok(&["registry", "import", reg.to_str().unwrap()]);
    let p = fx.pipeline(
        "p.toml",
        "name = \"old\"\n[[steps]]\nname = \"copy\"\ncommand = \"cat {d}/in/hello.txt > {d}/copy.txt\"\n\
         inputs = [\"{d}/in/hello.txt\"]\noutputs = [\"{d}/copy.txt\"]\n",
    );
    let mut run = fx.start_run(&["--agents", "1", p.to_str().unwrap()]);
    assert!(run.wait_exit(LONG).success(), "{}", run.dump());
    let handed = ["download handed out", "direction=\"fetch-direct\"", &format!("snapshot={id}")];
    assert!(run.count(&handed) >= 1, "{}", run.dump());
    assert_eq!(std::fs::read_to_string(fx.p("copy.txt")).unwrap(), "from the old store\n");
    let listed = fx.rt.block_on(s3.list_objects_v2().bucket("pype-old").send()).unwrap();
    let keys: Vec<String> = listed.contents().iter().map(|o| o.key().unwrap().to_string()).collect();
    assert!(keys.iter().any(|k| k.starts_with("old/cas/manifests/")), "{keys:?}");
    assert!(keys.contains(&format!("old/{id}.tar.zst")), "the old archive stays: {keys:?}");
}
