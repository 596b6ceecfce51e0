//! The daemon's counters, gauges and histograms, which the metrics endpoint ([`crate::serve::metrics`])
//! exposes in the Prometheus text format.
//!
//! One set per process ([`metrics`]), as there is one daemon per process. Label values are bounded: method
//! names, client names from the config and fixed outcome codes; never scopes, uids or tokens.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// How a cache look-up went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A cached token served.
    Hit,
    /// No usable token: this request started a fetch.
    Miss,
    /// No usable token: this request waited for a fetch already under way.
    Joined,
    /// Refused from a remembered IdP refusal, without asking the IdP.
    Remembered,
}

/// The gauges read from the daemon's state at each scrape.
#[derive(Clone, Copy, Debug, Default)]
pub struct Levels {
    /// Entries in the token cache.
    pub cache_entries: usize,
    /// Their estimated bytes.
    pub cache_bytes: usize,
    /// Open connections on the socket.
    pub connections: usize,
    /// Fetches from the IdPs under way.
    pub fetches_in_flight: usize,
}

/// Every metric.
pub struct Metrics {
    registry: Registry,
    calls: IntCounterVec,
    /// `calls` for the hot path, resolved once: GetToken and WhoAmI answered `ok`.
    calls_ok: [IntCounter; 2],
    lookups: [IntCounter; 4],
    idp_requests: IntCounterVec,
    idp_duration: HistogramVec,
    idp_last_success: GaugeVec,
    renewals: IntCounter,
    renewal_failures: IntCounter,
    stale_serves: IntCounter,
    rate_limited: IntCounter,
    connections_refused: IntCounter,
    reloads: IntCounterVec,
    log_lines_suppressed: IntCounterVec,
    proofs: IntCounterVec,
    cache_entries: IntGauge,
    cache_bytes: IntGauge,
    connections: IntGauge,
    fetches_in_flight: IntGauge,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid metric"))
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid metric"))
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let build = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "credbroker_build_info",
                    "The daemon's version, as a label; the value is always 1.",
                ),
                &["version"],
            )
            .expect("valid metric"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let started = register(
            &r,
            Gauge::new(
                "credbroker_start_time_seconds",
                "When the daemon started, in seconds since the Unix epoch.",
            )
            .expect("valid metric"),
        );
        started.set(unix_seconds(SystemTime::now()));
        let lookups = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "credbroker_cache_lookups_total",
                    "Token requests by how the cache answered: hit (a cached token), miss (started a fetch), \
                     joined (waited for a fetch under way), remembered (a recent IdP refusal, not asked again).",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let calls = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "credbroker_calls_total",
                    "Calls by method (GetToken and WhoAmI over gRPC or HTTP; the admin API's Reload, \
                     Flush, Status, Explain) and outcome (the gRPC status code, lowercase).",
                ),
                &["method", "outcome"],
            )
            .expect("valid metric"),
        );
        Self {
            calls_ok: ["GetToken", "WhoAmI"].map(|m| calls.with_label_values(&[m, "ok"])),
            calls,
            lookups: ["hit", "miss", "joined", "remembered"].map(|l| lookups.with_label_values(&[l])),
            idp_requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "credbroker_idp_requests_total",
                        "Token requests sent to the IdPs, by client and outcome: 2xx, an RFC 6749 error code \
                         (invalid_client, invalid_scope, ...) or other, else the status class (4xx, 429, 5xx), \
                         timeout, network, invalid_response, scope_too_wide, discovery or assertion.",
                    ),
                    &["client", "outcome"],
                )
                .expect("valid metric"),
            ),
            idp_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "credbroker_idp_request_duration_seconds",
                        "How long token requests to the IdPs took, by client, whatever their outcome.",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ]),
                    &["client"],
                )
                .expect("valid metric"),
            ),
            idp_last_success: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "credbroker_idp_last_success_timestamp_seconds",
                        "When the client's IdP last issued a token, in seconds since the Unix epoch.",
                    ),
                    &["client"],
                )
                .expect("valid metric"),
            ),
            renewals: counter(
                &r,
                "credbroker_renewals_total",
                "Renewals started ahead of expiry for tokens in use.",
            ),
            renewal_failures: counter(
                &r,
                "credbroker_renewal_failures_total",
                "Renewals ahead of expiry that failed (the cached token is still served while it lasts).",
            ),
            stale_serves: counter(
                &r,
                "credbroker_stale_serves_total",
                "Cached tokens served while their renewal was failing.",
            ),
            rate_limited: counter(
                &r,
                "credbroker_rate_limited_total",
                "Token requests refused because their caller's uid was over daemon.rate_limit.",
            ),
            connections_refused: counter(
                &r,
                "credbroker_connections_refused_total",
                "Connections closed at accept because their uid (or the shared budget of callers no policy \
                 matches, or the daemon) was at its connection limit.",
            ),
            reloads: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "credbroker_config_reloads_total",
                        "Config reloads (SIGHUP or the admin API) by result: ok or refused.",
                    ),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            log_lines_suppressed: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "credbroker_log_lines_suppressed_total",
                        "Audit lines not logged because their caller's log budget was spent, by kind (deny, \
                         error, admin, grant, grant-repeats); each budget's count is also logged in a \
                         `suppressed` event.",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            proofs: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "credbroker_dpop_proofs_total",
                        "DPoP proofs asked for, by client (a configured name) and outcome (the gRPC status \
                         code, lowercase: ok when one was given).",
                    ),
                    &["client", "outcome"],
                )
                .expect("valid metric"),
            ),
            cache_entries: gauge(
                &r,
                "credbroker_cache_entries",
                "Entries in the token cache.",
            ),
            cache_bytes: gauge(
                &r,
                "credbroker_cache_bytes",
                "The token cache's estimated size in bytes (bounded by daemon.max_cache_bytes).",
            ),
            connections: gauge(
                &r,
                "credbroker_connections_open",
                "Open connections on the daemon's socket.",
            ),
            fetches_in_flight: gauge(
                &r,
                "credbroker_fetches_in_flight",
                "Token fetches from the IdPs under way.",
            ),
            registry: r,
        }
    }

    /// A call answered with `code`.
    pub fn call(&self, method: &'static str, code: tonic::Code) {
        match (method, code) {
            ("GetToken", tonic::Code::Ok) => return self.calls_ok[0].inc(),
            ("WhoAmI", tonic::Code::Ok) => return self.calls_ok[1].inc(),
            _ => {}
        }
        self.calls
            .with_label_values(&[method, crate::error::code_name(code)])
            .inc();
    }

    /// A cache look-up.
    pub fn lookup(&self, how: Lookup) {
        self.lookups[how as usize].inc();
    }

    /// A token request to `client`'s IdP that ended with `outcome` after `took`.
    pub fn idp_request(&self, client: &str, outcome: &str, took: Duration) {
        self.idp_requests
            .with_label_values(&[client, outcome])
            .inc();
        self.idp_duration
            .with_label_values(&[client])
            .observe(took.as_secs_f64());
        if outcome == "2xx" {
            self.idp_last_success
                .with_label_values(&[client])
                .set(unix_seconds(SystemTime::now()));
        }
    }

    /// A renewal ahead of expiry started.
    pub fn renewal(&self) {
        self.renewals.inc();
    }

    /// A renewal ahead of expiry failed.
    pub fn renewal_failed(&self) {
        self.renewal_failures.inc();
    }

    /// A cached token served while its renewal was failing.
    pub fn stale_serve(&self) {
        self.stale_serves.inc();
    }

    /// A request refused by its uid's rate limit.
    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// A proof asked of `client` (a configured client's name), answered with `outcome`.
    pub fn proof(&self, client: &str, outcome: &str) {
        self.proofs.with_label_values(&[client, outcome]).inc();
    }

    /// An audit line of `kind` not logged: its budget was spent.
    pub fn log_line_suppressed(&self, kind: &str) {
        self.log_lines_suppressed.with_label_values(&[kind]).inc();
    }

    /// A connection refused at a connection limit.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A config reload, applied or refused.
    pub fn reload(&self, applied: bool) {
        self.reloads
            .with_label_values(&[if applied { "ok" } else { "refused" }])
            .inc();
    }

    /// Every metric in the Prometheus text format 0.0.4, with the gauges set to `levels`.
    pub fn render(&self, levels: Levels) -> String {
        let set = |g: &IntGauge, v: usize| g.set(i64::try_from(v).unwrap_or(i64::MAX));
        set(&self.cache_entries, levels.cache_entries);
        set(&self.cache_bytes, levels.cache_bytes);
        set(&self.connections, levels.connections);
        set(&self.fetches_in_flight, levels.fetches_in_flight);
        let mut out = Vec::new();
        // Encoding to memory fails only on a metric without help text, which the tests rule out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_help_and_bounded_labels() {
        let m = metrics();
        m.call("GetToken", tonic::Code::Ok);
        m.lookup(Lookup::Joined);
        m.idp_request("idp", "2xx", Duration::from_millis(20));
        let text = m.render(Levels {
            cache_entries: 3,
            ..Levels::default()
        });
        assert!(text.contains("credbroker_calls_total{method=\"GetToken\",outcome=\"ok\"}"));
        assert!(text.contains("credbroker_cache_lookups_total{result=\"joined\"}"));
        assert!(text.contains("credbroker_cache_entries 3"));
        assert!(text.contains("credbroker_build_info{version=\""));
        assert!(text.contains(
            "credbroker_idp_request_duration_seconds_bucket{client=\"idp\",le=\"0.025\"}"
        ));
        // Every family has help text (promtool rejects `_total` samples without it).
        for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = family.split(' ').next().unwrap();
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no help"
            );
        }
    }
}
