//! Controller configuration: a YAML file whose raw form is validated into [`Config`] at start,
//! so a bad value fails before anything listens. Every error names the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_proto::transport::{DEFAULT_MAX_MESSAGE_BYTES, TlsFiles};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
    #[error("{field}: expected {expected}, got {got:?}")]
    Invalid { field: &'static str, expected: &'static str, got: String },
    #[error("{field}: expected {expected}, got {got:?}")]
    Model { field: String, expected: &'static str, got: String },
    #[error("tls: ca, cert and key are required unless insecure mode is on (--insecure or insecure: true)")]
    TlsMissing,
}

fn invalid(field: &'static str, expected: &'static str, got: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, expected, got: got.into() }
}

/// A duration like "15s", "500ms", "2m", for config fields.
pub fn parse_duration(field: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|_| invalid(field, "a duration like \"15s\" or \"500ms\"", s))
}

/// A size like "4Mi", "500Gi", "1048576".
pub fn parse_size(field: &'static str, s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => {
            return Err(invalid(field, "a size like \"4Mi\", \"500Gi\" or a number of bytes", s));
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| invalid(field, "a size like \"4Mi\", \"500Gi\" or a number of bytes", s))
}

pub(crate) fn parse_addr(field: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| invalid(field, "an address like \"0.0.0.0:7443\"", s))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl RawTls {
    /// All three or none; insecure mode allows none.
    pub fn resolve(self, insecure: bool) -> Result<Option<TlsFiles>, ConfigError> {
        match (self.ca, self.cert, self.key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles { ca, cert, key })),
            (None, None, None) if insecure => Ok(None),
            _ if insecure => Err(invalid("tls", "all of ca, cert and key, or none of them", "a partial set")),
            _ => Err(ConfigError::TlsMissing),
        }
    }
}

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
        serde_yaml::from_str("{}").expect("empty config has every default")
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
        })
    }
}

impl RawConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_yaml(path, &text)
    }

    pub fn from_yaml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        // An empty file is an empty mapping: every default.
        let text = if text.trim().is_empty() { "{}" } else { text };
        serde_yaml::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn sizes() {
        assert_eq!(parse_size("f", "4Mi").ok(), Some(4 << 20));
        assert_eq!(parse_size("f", "500Gi").ok(), Some(500 << 30));
        assert_eq!(parse_size("f", "123").ok(), Some(123));
        assert!(parse_size("f", "lots").is_err());
        assert!(parse_size("f", "99999999999999999999Ti").is_err());
    }
}
