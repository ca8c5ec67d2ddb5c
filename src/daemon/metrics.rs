//! `GET /metrics` (admin), in the Prometheus text format (prometheus-client). Counters the
//! daemon keeps live; gauges (live executors and terminals per user, tasks per state) and
//! the broker's own counters (which outlive any daemon) are read at scrape time.
#![forbid(unsafe_code)]

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpawnLabels {
    /// exec, agent or terminal
    pub kind: String,
    /// ok, refused (policy, credential, quota) or error
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UserLabels {
    pub unix_user: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

pub struct Metrics {
    registry: Registry,
    pub spawns: Family<SpawnLabels, Counter>,
    pub spawn_seconds: Histogram,
    pub live_executors: Family<UserLabels, Gauge>,
    pub live_terminals: Family<UserLabels, Gauge>,
    pub tasks: Family<StateLabels, Gauge>,
    pub terminal_bytes: Counter,
    pub broker_frames: Counter<u64, AtomicU64>,
    pub broker_violations: Counter<u64, AtomicU64>,
    pub daemon_starts: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("stoa");
        let m = Metrics {
            registry: Registry::default(),
            spawns: Family::default(),
            spawn_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            live_executors: Family::default(),
            live_terminals: Family::default(),
            tasks: Family::default(),
            terminal_bytes: Counter::default(),
            broker_frames: Counter::default(),
            broker_violations: Counter::default(),
            daemon_starts: Counter::default(),
        };
        registry.register(
            "spawns",
            "Spawn requests by kind and result",
            m.spawns.clone(),
        );
        registry.register(
            "spawn_seconds",
            "Time from spawn request to the broker's answer",
            m.spawn_seconds.clone(),
        );
        registry.register(
            "live_executors",
            "Running processes through the broker, per Unix user",
            m.live_executors.clone(),
        );
        registry.register(
            "live_terminals",
            "Running terminals, per Unix user",
            m.live_terminals.clone(),
        );
        registry.register("tasks", "Tasks in the store, per state", m.tasks.clone());
        registry.register(
            "terminal_streamed_bytes",
            "Terminal output bytes sent to viewers",
            m.terminal_bytes.clone(),
        );
        registry.register(
            "broker_frames_received",
            "Frames the broker received from daemons",
            m.broker_frames.clone(),
        );
        registry.register(
            "broker_protocol_violations",
            "Protocol violations the broker saw",
            m.broker_violations.clone(),
        );
        registry.register(
            "daemon_starts",
            "Daemons the broker started",
            m.daemon_starts.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// How a spawn request ended, for the `result` label.
pub fn result_of(body: &crate::wire::ReplyBody) -> &'static str {
    use crate::wire::{ErrorKind, ReplyBody};
    match body {
        ReplyBody::Spawned(_) => "ok",
        ReplyBody::Error(e) if e.kind == ErrorKind::Failed => "error",
        ReplyBody::Error(_) => "refused",
        _ => "error",
    }
}

impl Metrics {
    pub fn spawned(&self, kind: &str, result: &str, took: Duration) {
        self.spawns
            .get_or_create(&SpawnLabels {
                kind: kind.into(),
                result: result.into(),
            })
            .inc();
        self.spawn_seconds.observe(took.as_secs_f64());
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Sums Prometheus texts of the same registry layout (the front's and each worker's): the
/// comment lines of the first text, then each series once, with the sum of its values, in
/// the order first seen. `# EOF` stays last.
pub fn sum_texts(own: &str, others: &[String]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut values: std::collections::HashMap<String, f64> = Default::default();
    let mut comments: std::collections::HashSet<String> = Default::default();
    for text in std::iter::once(own).chain(others.iter().map(String::as_str)) {
        for line in text.lines() {
            if line == "# EOF" || line.is_empty() {
                continue;
            }
            if line.starts_with('#') {
                if comments.insert(line.to_string()) {
                    order.push(line.to_string());
                }
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            match values.get_mut(series) {
                Some(sum) => *sum += v,
                None => {
                    values.insert(series.to_string(), v);
                    order.push(series.to_string());
                }
            }
        }
    }
    let mut out = String::new();
    for key in order {
        match values.get(&key) {
            Some(v) => out.push_str(&format!("{key} {v}\n")),
            None => {
                out.push_str(&key);
                out.push('\n');
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

#[cfg(test)]
mod sum_tests {
    #[test]
    fn series_are_summed_and_comments_kept_once() {
        let a = "# TYPE x counter\nx_total{k=\"a\"} 1\n# EOF\n";
        let b = "# TYPE x counter\nx_total{k=\"a\"} 2\nx_total{k=\"b\"} 5\n# EOF\n".to_string();
        assert_eq!(
            super::sum_texts(a, &[b]),
            "# TYPE x counter\nx_total{k=\"a\"} 3\nx_total{k=\"b\"} 5\n# EOF\n"
        );
    }
}
