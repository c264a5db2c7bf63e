//! Controller configuration: a YAML file whose raw form is validated into [`Config`] at start,
//! so a bad value fails before anything listens. Every error names the field.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hearth_proto::transport::{DEFAULT_MAX_MESSAGE_BYTES, TlsFiles};
pub use hearth_service::config::{ConfigError, RawTls, invalid, parse_addr, parse_duration, parse_size};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_http_listen")]
    pub http_listen: String,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default = "default_stale_after")]
    pub stale_after: String,
    #[serde(default = "default_forget_after")]
    pub forget_after: String,
    #[serde(default = "default_max_message")]
    pub max_message_size: String,
    #[serde(default = "default_hello_timeout")]
    pub hello_timeout: String,
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: String,
    /// Model deployments placement and scaling know about.
    #[serde(default)]
    pub models: Vec<crate::catalog::RawModel>,
    #[serde(default)]
    pub placement: RawPlacement,
    #[serde(default)]
    pub scaling: RawScaling,
    #[serde(default)]
    pub auth: crate::api::auth::RawAuth,
    #[serde(default)]
    pub extender: RawExtender,
    #[serde(default)]
    pub leader_election: RawLeaderElection,
    #[serde(default)]
    pub kubernetes: RawKubernetes,
}

/// Leader election through a Lease, for more than one replica.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLeaderElection {
    #[serde(default)]
    pub enabled: bool,
    /// Default: $POD_NAMESPACE.
    pub namespace: Option<String>,
    pub lease_name: Option<String>,
    /// Default: $POD_NAME, then the hostname.
    pub identity: Option<String>,
    pub lease_duration: Option<String>,
    pub renew_deadline: Option<String>,
    pub retry_period: Option<String>,
    /// Label this controller's pod (`$POD_NAME`) `hearth.dev/leader`; default true.
    pub label_pod: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawKubernetes {
    /// Default: the in-cluster service account.
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// Bandwidths are sizes per second ("200M" = 200 MB/s).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPlacement {
    pub default_source_bandwidth: Option<String>,
    pub local_read_bandwidth: Option<String>,
    pub image_pull_bandwidth: Option<String>,
    pub runtime_start: Option<String>,
    pub load_penalty: Option<String>,
    pub load_saturation: Option<f64>,
    pub fragmentation_penalty: Option<String>,
    pub eviction_weight: Option<f64>,
    pub lease_ttl: Option<String>,
    pub max_lease_ttl: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawScaling {
    pub interval: Option<String>,
    pub prewarm_horizon: Option<String>,
    pub max_prewarm_per_model: Option<usize>,
    pub fallback_lead_time: Option<String>,
    /// How long a Recommend `pending_requests` count counts as demand.
    pub pending_ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExtender {
    /// Where the kube-scheduler extender listens; "" turns it off.
    #[serde(default = "default_extender_listen")]
    pub listen: String,
    #[serde(default = "default_extender_prefix")]
    pub prefix: String,
}

impl Default for RawExtender {
    fn default() -> Self {
        Self { listen: default_extender_listen(), prefix: default_extender_prefix() }
    }
}

fn default_extender_listen() -> String {
    "0.0.0.0:7444".into()
}
fn default_extender_prefix() -> String {
    "/extender".into()
}

fn opt_dur(field: &'static str, v: &Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    v.as_deref().map(|s| parse_duration(field, s)).transpose().map(|d| d.unwrap_or(default))
}

fn opt_rate(field: &'static str, v: &Option<String>, default: f64) -> Result<f64, ConfigError> {
    match v.as_deref() {
        None => Ok(default),
        Some(s) => match parse_size(field, s)? {
            0 => Err(invalid(field, "a bandwidth above 0 in bytes per second, like \"200M\"", s)),
            n => Ok(n as f64),
        },
    }
}

impl RawPlacement {
    fn resolve(&self) -> Result<crate::placement::Params, ConfigError> {
        let d = crate::placement::Params::default();
        let p = crate::placement::Params {
            default_source_bandwidth: opt_rate(
                "placement.default_source_bandwidth",
                &self.default_source_bandwidth,
                d.default_source_bandwidth,
            )?,
            local_read_bandwidth: opt_rate("placement.local_read_bandwidth", &self.local_read_bandwidth, d.local_read_bandwidth)?,
            image_pull_bandwidth: opt_rate("placement.image_pull_bandwidth", &self.image_pull_bandwidth, d.image_pull_bandwidth)?,
            runtime_start: opt_dur("placement.runtime_start", &self.runtime_start, d.runtime_start)?,
            load_penalty: opt_dur("placement.load_penalty", &self.load_penalty, d.load_penalty)?,
            load_saturation: self.load_saturation.unwrap_or(d.load_saturation),
            fragmentation_penalty: opt_dur("placement.fragmentation_penalty", &self.fragmentation_penalty, d.fragmentation_penalty)?,
            eviction_weight: self.eviction_weight.unwrap_or(d.eviction_weight),
            lease_ttl: opt_dur("placement.lease_ttl", &self.lease_ttl, d.lease_ttl)?,
            max_lease_ttl: opt_dur("placement.max_lease_ttl", &self.max_lease_ttl, d.max_lease_ttl)?,
        };
        if !(p.eviction_weight.is_finite() && p.eviction_weight >= 0.0) {
            return Err(invalid("placement.eviction_weight", "a factor of 0 or more", p.eviction_weight.to_string()));
        }
        if !(p.load_saturation.is_finite() && p.load_saturation > 0.0) {
            return Err(invalid("placement.load_saturation", "a request count above 0", p.load_saturation.to_string()));
        }
        if p.lease_ttl.is_zero() || p.lease_ttl > p.max_lease_ttl {
            return Err(invalid("placement.lease_ttl", "above 0 and at most max_lease_ttl", format!("{:?}", p.lease_ttl)));
        }
        Ok(p)
    }
}

impl RawScaling {
    fn resolve(&self) -> Result<crate::scaling::Settings, ConfigError> {
        let d = crate::scaling::Settings::default();
        let s = crate::scaling::Settings {
            interval: opt_dur("scaling.interval", &self.interval, d.interval)?,
            prewarm_horizon: opt_dur("scaling.prewarm_horizon", &self.prewarm_horizon, d.prewarm_horizon)?,
            max_prewarm_per_model: self.max_prewarm_per_model.unwrap_or(d.max_prewarm_per_model),
            fallback_lead_time: opt_dur("scaling.fallback_lead_time", &self.fallback_lead_time, d.fallback_lead_time)?,
            external_demand_ttl: d.external_demand_ttl,
        };
        let mut s = s;
        // Unset, it outlasts one evaluation interval at least.
        s.external_demand_ttl = opt_dur("scaling.pending_ttl", &self.pending_ttl, d.external_demand_ttl.max(s.interval))?;
        if s.interval < Duration::from_millis(100) {
            return Err(invalid("scaling.interval", "at least 100ms", format!("{:?}", s.interval)));
        }
        if s.external_demand_ttl < s.interval {
            return Err(invalid("scaling.pending_ttl", "at least scaling.interval", format!("{:?}", s.external_demand_ttl)));
        }
        Ok(s)
    }
}

fn default_listen() -> String {
    "0.0.0.0:7443".into()
}
fn default_http_listen() -> String {
    "0.0.0.0:9401".into()
}
fn default_stale_after() -> String {
    "15s".into()
}
fn default_forget_after() -> String {
    "10m".into()
}
fn default_max_message() -> String {
    format!("{DEFAULT_MAX_MESSAGE_BYTES}")
}
fn default_hello_timeout() -> String {
    "10s".into()
}
fn default_shutdown_grace() -> String {
    "5s".into()
}

impl Default for RawConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").expect("empty config has every default")
    }
}

/// Validated controller configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC (NodeAgent, Operator, health, reflection).
    pub listen: SocketAddr,
    /// HTTP: /metrics, /healthz, /readyz.
    pub http_listen: SocketAddr,
    /// None only in insecure (plain-text) mode.
    pub tls: Option<TlsFiles>,
    /// A node with no message for this long is stale.
    pub stale_after: Duration,
    /// A disconnected node's last state is dropped after this long.
    pub forget_after: Duration,
    pub max_message_bytes: usize,
    /// How long a new stream may take to send Hello.
    pub hello_timeout: Duration,
    pub shutdown_grace: Duration,
    pub catalog: crate::catalog::Catalog,
    pub placement: crate::placement::Params,
    pub scaling: crate::scaling::Settings,
    pub auth: crate::api::auth::Auth,
    /// None: no extender listener.
    pub extender_listen: Option<SocketAddr>,
    pub extender_prefix: String,
    /// None: no election, this controller always leads.
    pub leader_election: Option<crate::leader::Settings>,
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(r: RawConfig) -> Result<Self, Self::Error> {
        let max = parse_size("max_message_size", &r.max_message_size)?;
        if !(1024..=(64 << 20)).contains(&max) {
            return Err(invalid("max_message_size", "between 1Ki and 64Mi", r.max_message_size));
        }
        let stale_after = parse_duration("stale_after", &r.stale_after)?;
        if stale_after < Duration::from_secs(1) {
            return Err(invalid("stale_after", "at least 1s", r.stale_after));
        }
        Ok(Self {
            listen: parse_addr("listen", &r.listen)?,
            http_listen: parse_addr("http_listen", &r.http_listen)?,
            tls: r.tls.resolve(r.insecure)?,
            stale_after,
            forget_after: parse_duration("forget_after", &r.forget_after)?,
            max_message_bytes: max as usize,
            hello_timeout: parse_duration("hello_timeout", &r.hello_timeout)?,
            shutdown_grace: parse_duration("shutdown_grace", &r.shutdown_grace)?,
            catalog: crate::catalog::Catalog::from_raw(&r.models)?,
            placement: r.placement.resolve()?,
            scaling: r.scaling.resolve()?,
            auth: r.auth.resolve(r.insecure)?,
            extender_listen: if r.extender.listen.is_empty() { None } else { Some(parse_addr("extender.listen", &r.extender.listen)?) },
            extender_prefix: match r.extender.prefix.as_str() {
                p if p.starts_with('/') => p.trim_end_matches('/').to_owned(),
                p => return Err(invalid("extender.prefix", "a URL path starting with '/'", p)),
            },
            leader_election: leader_settings(r.leader_election, r.kubernetes)?,
        })
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn leader_settings(r: RawLeaderElection, k: RawKubernetes) -> Result<Option<crate::leader::Settings>, ConfigError> {
    use hearth_service::kube::{KubeSource, is_dns_label};
    if !r.enabled {
        return Ok(None);
    }
    let source = match k.kubeconfig {
        Some(p) if !p.is_file() => return Err(invalid("kubernetes.kubeconfig", "a readable kubeconfig file", p.display().to_string())),
        Some(p) => KubeSource::Kubeconfig(p),
        None if env("KUBERNETES_SERVICE_HOST").is_some() => KubeSource::InCluster,
        None => {
            return Err(invalid(
                "leader_election.enabled",
                "kubernetes.kubeconfig, or running in a cluster (KUBERNETES_SERVICE_HOST)",
                "true",
            ));
        }
    };
    let namespace = r
        .namespace
        .or_else(|| env("POD_NAMESPACE"))
        .ok_or_else(|| invalid("leader_election.namespace", "a namespace (or $POD_NAMESPACE from the downward API)", "nothing"))?;
    if !is_dns_label(&namespace) {
        return Err(invalid("leader_election.namespace", "a DNS-1123 label", namespace));
    }
    let lease_name = r.lease_name.unwrap_or_else(|| "hearth-controller".into());
    if !is_dns_label(&lease_name) {
        return Err(invalid("leader_election.lease_name", "a DNS-1123 label", lease_name));
    }
    let pod = env("POD_NAME");
    let identity = r
        .identity
        .or_else(|| pod.clone())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|i| !i.is_empty())
        .ok_or_else(|| invalid("leader_election.identity", "an identity (or $POD_NAME)", "nothing"))?;
    let lease_duration = parse_duration("leader_election.lease_duration", r.lease_duration.as_deref().unwrap_or("15s"))?;
    let renew_deadline = parse_duration("leader_election.renew_deadline", r.renew_deadline.as_deref().unwrap_or("10s"))?;
    let retry_period = parse_duration("leader_election.retry_period", r.retry_period.as_deref().unwrap_or("2s"))?;
    if lease_duration < Duration::from_secs(1) {
        return Err(invalid("leader_election.lease_duration", "at least 1s", format!("{lease_duration:?}")));
    }
    // The leader must give up before anyone may take over, and must try more than once.
    if renew_deadline >= lease_duration {
        return Err(invalid("leader_election.renew_deadline", "shorter than lease_duration", format!("{renew_deadline:?}")));
    }
    if retry_period.is_zero() || retry_period >= renew_deadline {
        return Err(invalid("leader_election.retry_period", "more than 0 and shorter than renew_deadline", format!("{retry_period:?}")));
    }
    let pod = match r.label_pod {
        Some(false) => None,
        Some(true) if pod.is_none() => {
            return Err(invalid("leader_election.label_pod", "$POD_NAME set (downward API) to know which pod to label", "true"));
        }
        _ => pod,
    };
    Ok(Some(crate::leader::Settings { source, namespace, lease_name, identity, lease_duration, renew_deadline, retry_period, pod }))
}

impl RawConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        hearth_service::config::read_yaml(path)
    }

    pub fn from_yaml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        hearth_service::config::parse_yaml(path, text)
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        Config::try_from(RawConfig::from_yaml(Path::new("c.yaml"), yaml)?)
    }

    #[test]
    fn defaults_need_tls_unless_insecure() {
        assert!(matches!(parse(""), Err(ConfigError::TlsMissing)));
        let c = parse("insecure: true").expect("insecure defaults are valid");
        assert_eq!(c.tls, None);
        assert_eq!(c.stale_after, Duration::from_secs(15));
        assert_eq!(c.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse("insecure: true\nstale_afer: 3s").unwrap_err().to_string();
        assert!(err.contains("unknown field `stale_afer`"), "{err}");
        assert!(err.contains("c.yaml"), "{err}");
    }

    #[test]
    fn bad_values_name_field_and_expectation() {
        let err = parse("insecure: true\nstale_after: soon").unwrap_err().to_string();
        assert_eq!(err, "stale_after: expected a duration like \"15s\" or \"500ms\", got \"soon\"");
        let err = parse("insecure: true\nlisten: nowhere").unwrap_err().to_string();
        assert_eq!(err, "listen: expected an address like \"0.0.0.0:7443\", got \"nowhere\"");
        let err = parse("insecure: true\nmax_message_size: 1Pi").unwrap_err().to_string();
        assert!(err.starts_with("max_message_size: expected a size"), "{err}");
    }

    #[test]
    fn partial_tls_is_rejected() {
        assert!(matches!(parse("tls: {ca: /a}"), Err(ConfigError::TlsMissing)));
        let c = parse("tls: {ca: /a, cert: /b, key: /c}").expect("complete tls");
        assert_eq!(c.tls.map(|t| t.key), Some(PathBuf::from("/c")));
    }
}
