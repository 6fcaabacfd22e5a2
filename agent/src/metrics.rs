//! The agent's Prometheus metrics (`pype-agent run --metrics-listen ADDR`), and the counts it
//! reports to its coordinator with each heartbeat (`AgentStats`). The only module naming
//! prometheus-client.

use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type L1 = [(&'static str, &'static str); 1];
type Hook = Box<dyn Fn(&Metrics) + Send + Sync>;

pub struct Metrics {
    /// `pype_agent_cache{result}`: snapshot lookups in the cache, `hit` or `miss` (fetched).
    pub cache: Family<L1, Counter>,
    /// `pype_agent_cache_bytes`: content bytes the cache holds.
    pub cache_bytes: Gauge,
    /// `pype_agent_steps_running`.
    pub steps_running: Gauge,
    /// `pype_agent_steps{outcome}`: attempts this agent finished, `succeeded` or `failed`.
    pub steps: Family<L1, Counter>,
    /// `pype_agent_transfer_bytes{direction}`: snapshot content bytes `fetched` or `stored`.
    pub transfer_bytes: Family<L1, Counter>,
    /// `pype_agent_transfer_seconds{direction}`.
    pub transfer_seconds: Family<L1, Counter<f64, AtomicU64>>,
    hooks: Mutex<Vec<Hook>>,
    registry: Registry,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

pub const HIT: L1 = [("result", "hit")];
pub const MISS: L1 = [("result", "miss")];
pub const FETCHED: L1 = [("direction", "fetched")];
pub const STORED: L1 = [("direction", "stored")];
pub const SUCCEEDED: L1 = [("outcome", "succeeded")];
pub const FAILED: L1 = [("outcome", "failed")];

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            cache: Family::default(),
            cache_bytes: Gauge::default(),
            steps_running: Gauge::default(),
            steps: Family::default(),
            transfer_bytes: Family::default(),
            transfer_seconds: Family::default(),
            hooks: Mutex::new(Vec::new()),
            registry: Registry::default(),
        };
        r.register("pype_agent_cache", "Snapshot cache lookups", m.cache.clone());
        r.register("pype_agent_cache_bytes", "Content bytes the snapshot cache holds", m.cache_bytes.clone());
        r.register("pype_agent_steps_running", "Attempts running now", m.steps_running.clone());
        r.register("pype_agent_steps", "Attempts finished, by outcome", m.steps.clone());
        r.register("pype_agent_transfer_bytes", "Snapshot content bytes moved", m.transfer_bytes.clone());
        r.register("pype_agent_transfer_seconds", "Time spent moving snapshots", m.transfer_seconds.clone());
        // Both lookups show from the start, so a dashboard's ratio has both series.
        drop(m.cache.get_or_create(&HIT));
        drop(m.cache.get_or_create(&MISS));
        Metrics { registry: r, ..m }
    }

    /// Runs `hook` before each scrape and each report, to set gauges from current state.
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(hook));
    }

    fn refresh(&self) {
        for hook in self.hooks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            hook(self);
        }
    }

    /// The OpenMetrics text of everything.
    pub fn render(&self) -> String {
        self.refresh();
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// A snapshot moved: `dir` is [`FETCHED`] or [`STORED`].
    pub fn transfer(&self, dir: &L1, content_bytes: u64, secs: f64) {
        self.transfer_bytes.get_or_create(dir).inc_by(content_bytes);
        self.transfer_seconds.get_or_create(dir).inc_by(secs);
    }

    /// What the coordinator is told with each heartbeat.
    pub fn stats(&self) -> protocol::AgentStats {
        self.refresh();
        let c = |l: &L1| self.cache.get_or_create(l).get();
        let b = |l: &L1| self.transfer_bytes.get_or_create(l).get();
        protocol::AgentStats {
            cache_hits: c(&HIT),
            cache_misses: c(&MISS),
            cache_bytes: self.cache_bytes.get().max(0) as u64,
            steps_running: self.steps_running.get().max(0) as u32,
            bytes_fetched: b(&FETCHED),
            bytes_stored: b(&STORED),
        }
    }
}
