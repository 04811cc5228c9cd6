//! A `metrics` recorder that sums counters, for tests, examples and benchmarks that check
//! what the layers counted without pulling in an exporter.
//!
//! ```
//! let counters = tollgate_testkit::counters::Counters::install();
//! metrics::counter!("tollgate_demo_total", "limit" => "rpm").increment(2);
//! assert_eq!(counters.total("tollgate_demo_total"), 2);
//! assert_eq!(counters.get("tollgate_demo_total", "limit", "rpm"), 2);
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Counters by name and labels; gauges and histograms are ignored.
#[derive(Debug, Default)]
pub struct Counters(Mutex<HashMap<metrics::Key, Arc<Count>>>);

/// One counter of [`Counters`].
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl metrics::CounterFn for Count {
    fn increment(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    fn absolute(&self, n: u64) {
        self.0.fetch_max(n, Ordering::Relaxed);
    }
}

impl Counters {
    /// The process's recorder, installed on first use. When another recorder was
    /// installed first, every count stays 0.
    pub fn install() -> &'static Counters {
        static COUNTERS: OnceLock<&'static Counters> = OnceLock::new();
        COUNTERS.get_or_init(|| {
            let c: &'static Counters = Box::leak(Box::default());
            let _ = metrics::set_global_recorder(c);
            c
        })
    }

    fn sum(&self, keep: impl Fn(&metrics::Key) -> bool) -> u64 {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter(|(k, _)| keep(k))
            .map(|(_, c)| c.0.load(Ordering::Relaxed))
            .sum()
    }

    /// The counter `name`, summed over all its labels.
    pub fn total(&self, name: &str) -> u64 {
        self.sum(|k| k.name() == name)
    }

    /// The counter `name` with the label `label = value`.
    pub fn get(&self, name: &str, label: &str, value: &str) -> u64 {
        self.sum(|k| k.name() == name && k.labels().any(|l| l.key() == label && l.value() == value))
    }
}

impl metrics::Recorder for &'static Counters {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(key.clone()).or_default();
        metrics::Counter::from_arc(Arc::clone(count))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}
