//! Prometheus metrics: `serve --metrics-listen` and `pype-agent run --metrics-listen`, scraped
//! over HTTP during and after a real run and read with prometheus_client's OpenMetrics parser.

use std::time::{Duration, Instant};

use tests::{Agent, Cluster, LONG, OpenMetricsParser, Proc, Scrape, T};

/// The address in a `metrics listening addr=...` log line.
fn metrics_addr(p: &Proc) -> String {
    let line = p.wait_for(&["metrics listening"], T);
    line.split("addr=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().to_string()
}

/// Scrapes `addr` until `ok` holds (gauges filled in the background, reports that come with
/// heartbeats), or panics with the last page after `timeout`.
fn scrape_until(
    om: &OpenMetricsParser,
    addr: &str,
    timeout: Duration,
    ok: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + timeout;
    loop {
        let s = om.scrape(addr);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "no scrape of {addr} showed what was expected:\n{s:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Steps fetch their inputs and store their outputs through the coordinator.
const SNAPSHOT: (&str, &str) = ("PYPE_OVERLAY_MODE", "snapshot");

#[test]
fn a_scrape_during_and_after_a_run_shows_what_the_run_did() {
    let Some(om) = OpenMetricsParser::find("metrics::a_scrape_during_and_after_a_run_shows_what_the_run_did")
    else {
        return;
    };
    let listen = ("PYPE_METRICS_LISTEN", "127.0.0.1:0");
    let fx = Cluster::new()
        .env(listen.0, listen.1)
        .serve()
        .agent(Agent::named("m1").env(listen.0, listen.1).env(SNAPSHOT.0, SNAPSHOT.1).label("pool=a"))
        .agent(Agent::named("m2").env(listen.0, listen.1).env(SNAPSHOT.0, SNAPSHOT.1));
    let coord = fx.coord();
    let caddr = metrics_addr(&coord.proc);
    let aaddrs: Vec<String> = fx.agents.iter().map(metrics_addr).collect();
    coord.proc.wait_for_nth(&["agent joined"], 2, LONG);

    std::fs::create_dir_all(fx.p("data/in")).unwrap();
    std::fs::create_dir_all(fx.p("marks")).unwrap();
    // Random: the store's zstd cannot shrink it, so its size is known.
    let mut input = vec![0u8; 3_000_000];
    rand::fill(&mut input[..]);
    std::fs::write(fx.p("data/in/data.bin"), &input).unwrap();
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "metered"
data_root = "{d}/data"
[[steps]]
name = "make"
command = "mkdir -p {{data_root}}/out && head -c 1000000 {{data_root}}/in/data.bin > {{data_root}}/out/part.bin"
inputs = ["in/data.bin"]
outputs = ["out/part.bin"]
[[steps]]
name = "flaky"
command = "if [ ! -e {d}/marks/flaky.once ]; then touch {d}/marks/flaky.once; exit 3; fi; mkdir -p {{data_root}}/out && echo ok > {{data_root}}/out/flaky.txt"
outputs = ["out/flaky.txt"]
retries = 1
[[steps]]
name = "wait"
command = "while [ ! -e {d}/marks/go ]; do sleep 0.1; done; cp {{data_root}}/out/part.bin {{data_root}}/out/copy.bin"
inputs = ["out/part.bin"]
outputs = ["out/copy.bin"]
"#,
    );
    let mut cmd = fx.command();
    cmd.args(["run", "--coordinator", &coord.addr.to_string(), pipeline.to_str().unwrap()]);
    let mut run = Proc::spawn_keeping_stdout("run", cmd);

    // During the run: `wait` holds until the test lets it go.
    coord.proc.wait_for(&["step started", "step=\"wait\""], LONG);
    coord.proc.wait_for(&["step harvested", "step=\"flaky\""], LONG);
    // `step harvested` is logged just before the run marks the step succeeded: a scrape in
    // between still counts it running, so look again until it has settled.
    let settle = std::time::Instant::now() + T;
    let mut during = om.scrape(&caddr);
    while during.sum("pype_steps", &[("state", "running")]) != 1.0 && std::time::Instant::now() < settle {
        std::thread::sleep(std::time::Duration::from_millis(50));
        during = om.scrape(&caddr);
    }
    assert_eq!(during.sum("pype_steps", &[("state", "running")]), 1.0, "{during:#?}");
    assert_eq!(during.sum("pype_agents", &[("state", "ready")]), 2.0, "{during:#?}");
    assert_eq!(during.sum("pype_agents", &[("state", "draining")]), 0.0, "{during:#?}");
    assert_eq!(during.sum("pype_agents_by_label", &[("label", "pool=a")]), 1.0, "{during:#?}");
    assert_eq!(during.sum("pype_agents_by_label", &[("label", "none")]), 1.0, "{during:#?}");
    let running_on_agents: f64 =
        aaddrs.iter().map(|a| om.scrape(a).sum("pype_agent_steps_running", &[])).sum();
    assert_eq!(running_on_agents, 1.0);

    std::fs::write(fx.p("marks/go"), "").unwrap();
    assert!(run.wait_exit(LONG).success(), "{}\n{}", run.dump(), coord.proc.dump());

    let after = om.scrape(&caddr);
    // The run's steps left `pype_steps` with it; what they became stays counted.
    assert_eq!(after.sum("pype_steps", &[]), 0.0, "{after:#?}");
    assert_eq!(after.sum("pype_steps_ended_total", &[("state", "succeeded")]), 3.0, "{after:#?}");
    assert_eq!(after.sum("pype_steps_ended_total", &[("state", "failed")]), 0.0, "{after:#?}");
    assert_eq!(after.sum("pype_retries_total", &[("kind", "command")]), 1.0, "{after:#?}");
    assert_eq!(after.sum("pype_retries_total", &[("kind", "infrastructure")]), 0.0, "{after:#?}");
    assert_eq!(after.sum("pype_attempts_total", &[("outcome", "succeeded")]), 3.0, "{after:#?}");
    assert_eq!(after.sum("pype_attempts_total", &[("outcome", "command_failed")]), 1.0, "{after:#?}");
    // Four attempts were dispatched and ended: each is in both histograms once.
    assert_eq!(after.sum("pype_dispatch_latency_seconds_count", &[]), 4.0, "{after:#?}");
    assert_eq!(after.sum("pype_step_duration_seconds_count", &[]), 4.0, "{after:#?}");
    // `wait` waited for the test for a while: its duration is in the sum.
    assert!(after.sum("pype_step_duration_seconds_sum", &[("outcome", "succeeded")]) > 0.2, "{after:#?}");
    // The 3 MB input went to an agent; part.bin, copy.bin and flaky.txt came back.
    assert!(
        after.sum("pype_transfer_bytes_total", &[("direction", "to_agent")]) >= 3_000_000.0,
        "{after:#?}"
    );
    assert!(
        after.sum("pype_transfer_bytes_total", &[("direction", "from_agent")]) >= 2_000_000.0,
        "{after:#?}"
    );
    assert!(after.sum("pype_transfers_total", &[("direction", "from_agent")]) >= 3.0, "{after:#?}");
    assert!(after.has("pype_cost_dollars") || !after.has("pype_instances"), "families are all there");

    // The store's size is measured in the background: it shows within a scrape or two.
    let stored = scrape_until(&om, &caddr, Duration::from_secs(25), |s| {
        s.sum("pype_store_snapshots", &[]) >= 4.0 && s.sum("pype_store_bytes", &[]) >= 4_000_000.0
    });
    // 3 MB of input and 1 MB of part.bin; copy.bin has the same bytes and is stored once.
    assert!(stored.sum("pype_store_bytes", &[]) < 4_500_000.0, "{stored:#?}");

    // Each agent's own page, and the coordinator's sum of what they report with heartbeats.
    let agents: Vec<Scrape> = aaddrs.iter().map(|a| om.scrape(a)).collect();
    let total = |name: &str, labels: &[(&str, &str)]| agents.iter().map(|s| s.sum(name, labels)).sum::<f64>();
    assert_eq!(total("pype_agent_steps_total", &[("outcome", "succeeded")]), 3.0);
    assert_eq!(total("pype_agent_steps_total", &[("outcome", "failed")]), 1.0);
    assert_eq!(total("pype_agent_steps_running", &[]), 0.0);
    let (hits, misses) = (
        total("pype_agent_cache_total", &[("result", "hit")]),
        total("pype_agent_cache_total", &[("result", "miss")]),
    );
    assert!(misses >= 1.0, "the input was fetched: {agents:#?}");
    assert!(total("pype_agent_transfer_bytes_total", &[("direction", "fetched")]) >= 3_000_000.0);
    assert!(total("pype_agent_transfer_bytes_total", &[("direction", "stored")]) >= 2_000_000.0);
    assert!(total("pype_agent_cache_bytes", &[]) >= 3_000_000.0, "{agents:#?}");
    scrape_until(&om, &caddr, Duration::from_secs(10), |s| {
        s.sum("pype_agent_cache_total", &[("result", "hit")]) == hits
            && s.sum("pype_agent_cache_total", &[("result", "miss")]) == misses
            && s.sum("pype_agent_cache_bytes", &[]) >= 3_000_000.0
    });
}
