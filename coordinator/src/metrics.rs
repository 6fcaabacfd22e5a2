//! The coordinator's Prometheus metrics: one registry for the process, fed where things
//! happen (the run's reporter, the server's transfers, the provisioner) and read at scrape
//! time. The only module naming prometheus-client.
//!
//! Like the log, the registry is one per process ([`get`]): every part of the coordinator
//! reports to it without being handed it. Gauges that describe a current state (agents, the
//! store's size) are filled at scrape time by hooks ([`Metrics::on_scrape`]); counters and
//! histograms are fed as events happen.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type L1 = [(&'static str, String); 1];
type L2 = [(&'static str, String); 2];
type L3 = [(&'static str, String); 3];
type Hist<L> = Family<L, Histogram, fn() -> Histogram>;
type Hook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// One label.
pub fn l1(k: &'static str, v: &str) -> L1 {
    [(k, v.to_string())]
}

/// A label value from a peer made safe for the text format (which the encoder does not
/// escape): at most 128 characters of `[A-Za-z0-9_.:/=-]`, anything else as `_`.
pub fn label_value(v: &str) -> String {
    v.chars()
        .take(128)
        .map(|c| if c.is_ascii_alphanumeric() || "_.:/=-".contains(c) { c } else { '_' })
        .collect()
}

/// Most agents whose last cache totals are remembered.
const MAX_AGENTS_SEEN: usize = 100_000;

/// Largest plausible growth of an agent's cache counters between two reports.
const MAX_CACHE_STEP: u64 = 1 << 20;

fn seconds_buckets() -> Histogram {
    // 1 ms .. about 9 hours.
    Histogram::new(exponential_buckets(0.001, 2.5, 18))
}

fn boot_buckets() -> Histogram {
    // 1 s .. about 17 minutes.
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// Every metric the coordinator exports. Names are the exported names without `_total`
/// (which OpenMetrics adds to counters).
pub struct Metrics {
    /// `pype_agents{state}`: connected agents, `ready` or `draining`.
    pub agents: Family<L1, Gauge>,
    /// `pype_agents_by_label{state,label}`: the same by scheduling label (`key=value`; an
    /// agent counts under each of its labels, `none` for an agent without).
    pub agents_by_label: Family<L2, Gauge>,
    /// `pype_steps{state}`: steps of the runs in progress, by state (`pending`, `ready`,
    /// `running`, `succeeded`, `skipped`, `pruned`, `failed`, `cancelled`).
    pub steps: Family<L1, Gauge>,
    /// `pype_steps_ended{state}`: steps that reached a final state, since the coordinator
    /// started.
    pub steps_ended: Family<L1, Counter>,
    /// `pype_attempts{outcome}`: attempts that ended, by how.
    pub attempts: Family<L1, Counter>,
    /// `pype_dispatch_latency_seconds`: a step ready to its attempt sent to an agent.
    pub dispatch_latency: Histogram,
    /// `pype_step_duration_seconds{outcome}`: an attempt dispatched to its result, transfers
    /// and setup included.
    pub step_duration: Hist<L1>,
    /// `pype_retries{kind}`: `command` or `infrastructure`.
    pub retries: Family<L1, Counter>,
    /// `pype_transfer_bytes{direction}`: snapshot content bytes moved, `to_agent` (fetches)
    /// or `from_agent` (stores).
    pub transfer_bytes: Family<L1, Counter>,
    /// `pype_transfer_wire_bytes{direction}`: what those transfers put on the wire.
    pub transfer_wire_bytes: Family<L1, Counter>,
    /// `pype_transfer_seconds{direction}`: time spent in them (bytes over seconds is the rate).
    pub transfer_seconds: Family<L1, Counter<f64, AtomicU64>>,
    /// `pype_transfer_rate_bytes_per_second{direction}`: the rate of the last transfer.
    pub transfer_rate: Family<L1, Gauge<f64, AtomicU64>>,
    /// `pype_transfers{direction}`.
    pub transfers: Family<L1, Counter>,
    /// `pype_store_bytes`: bytes the snapshot store holds (its blobs, or archives).
    pub store_bytes: Gauge,
    /// `pype_store_snapshots`.
    pub store_snapshots: Gauge,
    /// `pype_agent_cache{result}`: agents' snapshot cache lookups, `hit` or `miss`, as the
    /// agents report them.
    pub agent_cache: Family<L1, Counter>,
    /// `pype_agent_cache_bytes`: what the connected agents' caches hold.
    pub agent_cache_bytes: Gauge,
    /// `pype_instances{provider,state}`: instances this coordinator provisioned, by state.
    pub instances: Family<L2, Gauge>,
    /// `pype_provider_calls{provider,call,result}`: provider API calls; `result` is `ok` or
    /// the error's kind (`capacity`, `refused`, `transient`).
    pub provider_calls: Family<L3, Counter>,
    /// `pype_boot_seconds{provider}`: instance requested to its agent connected.
    pub boot_seconds: Hist<L1>,
    /// `pype_cost_dollars{part}`: what the instances of this coordinator cost so far
    /// (`steps`, `boot`, `idle`).
    pub cost: Family<L1, Gauge<f64, AtomicU64>>,
    hooks: Mutex<Vec<Hook>>,
    registry: Registry,
    /// Last cache counts each agent reported, to turn its totals into increments.
    cache_seen: Mutex<HashMap<String, (u64, u64)>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            agents: Family::default(),
            agents_by_label: Family::default(),
            steps: Family::default(),
            steps_ended: Family::default(),
            attempts: Family::default(),
            dispatch_latency: seconds_buckets(),
            step_duration: Family::new_with_constructor(seconds_buckets),
            retries: Family::default(),
            transfer_bytes: Family::default(),
            transfer_wire_bytes: Family::default(),
            transfer_seconds: Family::default(),
            transfer_rate: Family::default(),
            transfers: Family::default(),
            store_bytes: Gauge::default(),
            store_snapshots: Gauge::default(),
            agent_cache: Family::default(),
            agent_cache_bytes: Gauge::default(),
            instances: Family::default(),
            provider_calls: Family::default(),
            boot_seconds: Family::new_with_constructor(boot_buckets),
            cost: Family::default(),
            hooks: Mutex::new(Vec::new()),
            registry: Registry::default(),
            cache_seen: Mutex::new(HashMap::new()),
        };
        r.register("pype_agents", "Connected agents by state", m.agents.clone());
        r.register("pype_agents_by_label", "Connected agents by state and label", m.agents_by_label.clone());
        r.register("pype_steps", "Steps of the runs in progress by state", m.steps.clone());
        r.register("pype_steps_ended", "Steps that reached a final state", m.steps_ended.clone());
        r.register("pype_attempts", "Step attempts that ended, by outcome", m.attempts.clone());
        r.register(
            "pype_dispatch_latency_seconds",
            "A step ready to its attempt sent to an agent",
            m.dispatch_latency.clone(),
        );
        r.register(
            "pype_step_duration_seconds",
            "An attempt dispatched to its result",
            m.step_duration.clone(),
        );
        r.register("pype_retries", "Step retries by kind", m.retries.clone());
        r.register("pype_transfer_bytes", "Snapshot content bytes moved", m.transfer_bytes.clone());
        r.register(
            "pype_transfer_wire_bytes",
            "Bytes snapshot transfers put on the wire",
            m.transfer_wire_bytes.clone(),
        );
        r.register("pype_transfer_seconds", "Time spent in snapshot transfers", m.transfer_seconds.clone());
        r.register(
            "pype_transfer_rate_bytes_per_second",
            "Content rate of the last snapshot transfer",
            m.transfer_rate.clone(),
        );
        r.register("pype_transfers", "Snapshot transfers", m.transfers.clone());
        r.register("pype_store_bytes", "Bytes the snapshot store holds", m.store_bytes.clone());
        r.register("pype_store_snapshots", "Snapshots in the store", m.store_snapshots.clone());
        r.register("pype_agent_cache", "Agents' snapshot cache lookups", m.agent_cache.clone());
        r.register(
            "pype_agent_cache_bytes",
            "Bytes the connected agents' caches hold",
            m.agent_cache_bytes.clone(),
        );
        r.register("pype_instances", "Provisioned instances by provider and state", m.instances.clone());
        r.register("pype_provider_calls", "Provider API calls by result", m.provider_calls.clone());
        r.register("pype_boot_seconds", "Instance requested to its agent connected", m.boot_seconds.clone());
        r.register("pype_cost_dollars", "What provisioned instances cost so far", m.cost.clone());
        Metrics { registry: r, ..m }
    }

    /// Runs `hook` before each scrape, to set gauges from current state. A hook must not
    /// block: it runs on the scrape's task.
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(hook));
    }

    /// The OpenMetrics text of everything.
    pub fn render(&self) -> String {
        // One render at a time: a hook's `clear` must not meet another render's encoding.
        let hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        for hook in hooks.iter() {
            hook(self);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// A step moved from `from` to `to` (either may be none: entering or leaving a run).
    pub fn step_moved(&self, from: Option<&str>, to: Option<&str>) {
        if let Some(f) = from {
            self.steps.get_or_create(&l1("state", f)).dec();
        }
        if let Some(t) = to {
            self.steps.get_or_create(&l1("state", t)).inc();
            if matches!(t, "succeeded" | "skipped" | "pruned" | "failed" | "cancelled") {
                self.steps_ended.get_or_create(&l1("state", t)).inc();
            }
        }
    }

    /// One snapshot transfer ended.
    pub fn transfer(&self, direction: &str, bytes: u64, wire_bytes: u64, secs: f64) {
        let d = l1("direction", direction);
        self.transfers.get_or_create(&d).inc();
        self.transfer_bytes.get_or_create(&d).inc_by(bytes);
        self.transfer_wire_bytes.get_or_create(&d).inc_by(wire_bytes);
        self.transfer_seconds.get_or_create(&d).inc_by(secs);
        if secs > 0.0 {
            self.transfer_rate.get_or_create(&d).set(bytes as f64 / secs);
        }
    }

    /// An agent's running totals of cache hits and misses (they start over when the agent
    /// restarts): the counters grow by what is new since its last report.
    pub fn agent_cache_totals(&self, agent: &str, hits: u64, misses: u64) {
        let mut seen = self.cache_seen.lock().unwrap_or_else(|p| p.into_inner());
        let (h0, m0) = seen.get(agent).copied().unwrap_or((0, 0));
        let (dh, dm) = if hits < h0 || misses < m0 { (hits, misses) } else { (hits - h0, misses - m0) };
        // Agents that reconnect report the same totals again, so entries stay after a
        // disconnect; ephemeral instances' ids would pile up, hence a bound.
        if seen.len() >= MAX_AGENTS_SEEN && !seen.contains_key(agent) {
            seen.clear();
        }
        seen.insert(agent.to_string(), (hits, misses));
        // A report no agent can make in one heartbeat counts nothing (a counter must never
        // wrap).
        let (dh, dm) = if dh > MAX_CACHE_STEP || dm > MAX_CACHE_STEP { (0, 0) } else { (dh, dm) };
        self.agent_cache.get_or_create(&l1("result", "hit")).inc_by(dh);
        self.agent_cache.get_or_create(&l1("result", "miss")).inc_by(dm);
    }

    /// A provider API call returned (`result`: `ok`, or the error's kind).
    pub fn provider_call(&self, provider: &str, call: &str, result: &str) {
        self.provider_calls
            .get_or_create(&[
                ("provider", provider.to_string()),
                ("call", call.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_totals_become_increments_and_a_restart_starts_over() {
        let m = Metrics::new();
        let hit = |m: &Metrics| m.agent_cache.get_or_create(&l1("result", "hit")).get();
        let miss = |m: &Metrics| m.agent_cache.get_or_create(&l1("result", "miss")).get();
        m.agent_cache_totals("a", 3, 1);
        m.agent_cache_totals("b", 2, 0);
        m.agent_cache_totals("a", 5, 1);
        assert_eq!((hit(&m), miss(&m)), (7, 1));
        // `a` restarted: its totals start over, and what it reports now is all new.
        m.agent_cache_totals("a", 1, 2);
        assert_eq!((hit(&m), miss(&m)), (8, 3));
        // The same report twice adds nothing.
        m.agent_cache_totals("a", 1, 2);
        assert_eq!((hit(&m), miss(&m)), (8, 3));
    }

    /// The `pype_...` names a dashboard's queries use (histogram series as their family).
    fn queried(json: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut rest = json;
        while let Some(i) = rest.find("pype_") {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(&tail[..end], |n, s| n.strip_suffix(s).unwrap_or(n));
            out.insert(name.to_string());
            rest = &tail[end..];
        }
        out
    }

    /// The series names in a page.
    fn series(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(|n| {
                ["_bucket", "_sum", "_count", "_created"]
                    .iter()
                    .fold(n, |n, s| n.strip_suffix(s).unwrap_or(n))
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn the_shipped_dashboard_queries_only_metrics_that_exist() {
        let m = Metrics::new();
        // One series in every family (a family without one is not rendered at all).
        let l = || l1("k", "v");
        m.agents.get_or_create(&l()).set(1);
        m.agents_by_label.get_or_create(&[("k", "v".into()), ("j", "w".into())]).set(1);
        m.step_moved(None, Some("succeeded"));
        m.attempts.get_or_create(&l()).inc();
        m.dispatch_latency.observe(0.1);
        m.step_duration.get_or_create(&l()).observe(0.1);
        m.retries.get_or_create(&l()).inc();
        m.transfer("to_agent", 1, 1, 1.0);
        m.store_bytes.set(1);
        m.store_snapshots.set(1);
        m.agent_cache_totals("a", 1, 1);
        m.agent_cache_bytes.set(1);
        m.instances.get_or_create(&[("k", "v".into()), ("j", "w".into())]).set(1);
        m.provider_call("p", "create", "ok");
        m.boot_seconds.get_or_create(&l()).observe(10.0);
        m.cost.get_or_create(&l()).set(1.0);
        let agent = agent::metrics::get();
        agent.transfer(&agent::metrics::FETCHED, 1, 1.0);
        agent.steps.get_or_create(&agent::metrics::SUCCEEDED).inc();
        let mut exported = series(&m.render());
        exported.extend(series(&agent.render()));
        let dashboard = include_str!("../../deploy/grafana/pype-dashboard.json");
        let queried = queried(dashboard);
        assert!(queried.len() >= 20, "{queried:?}");
        let unknown: Vec<&String> = queried.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "the dashboard queries metrics nothing exports: {unknown:?}\n{exported:?}"
        );
    }

    #[test]
    fn renders_openmetrics_with_counters_suffixed_and_an_eof() {
        let m = Metrics::new();
        m.step_moved(None, Some("pending"));
        m.step_moved(Some("pending"), Some("running"));
        m.step_moved(Some("running"), Some("succeeded"));
        m.transfer("to_agent", 1000, 400, 0.5);
        m.on_scrape(|m| {
            m.store_bytes.set(42);
        });
        let text = m.render();
        assert!(text.contains("pype_steps{state=\"succeeded\"} 1\n"), "{text}");
        assert!(text.contains("pype_steps{state=\"pending\"} 0\n"), "{text}");
        assert!(text.contains("pype_steps_ended_total{state=\"succeeded\"} 1\n"), "{text}");
        assert!(text.contains("pype_transfer_bytes_total{direction=\"to_agent\"} 1000\n"), "{text}");
        assert!(
            text.contains("pype_transfer_rate_bytes_per_second{direction=\"to_agent\"} 2000.0\n"),
            "{text}"
        );
        assert!(text.contains("pype_store_bytes 42\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
