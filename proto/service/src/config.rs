//! The pieces of configuration both binaries read the same way: the error type that names
//! the field and the expected form, duration/size/address parsing, the TLS file triple,
//! and reading a YAML file. Each binary's own sections live with that binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_proto::transport::TlsFiles;
use serde::Deserialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: serde_yaml_ng::Error },
    #[error("{field}: expected {expected}, got {got:?}")]
    Invalid { field: &'static str, expected: &'static str, got: String },
    /// A field whose name is built at run time (an entry of a list: `models[2].size`).
    #[error("{field}: expected {expected}, got {got:?}")]
    Entry { field: String, expected: String, got: String },
    #[error("tls: ca, cert and key are required unless insecure mode is on (--insecure or insecure: true)")]
    TlsMissing,
}

pub fn invalid(field: &'static str, expected: &'static str, got: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, expected, got: got.into() }
}

/// A duration like "15s", "500ms", "2m", for config fields.
pub fn parse_duration(field: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|_| invalid(field, "a duration like \"15s\" or \"500ms\"", s))
}

/// A size like "4Mi", "500Gi", "1048576".
pub fn parse_size(field: &'static str, s: &str) -> Result<u64, ConfigError> {
    const EXPECTED: &str = "a size like \"4Mi\", \"500Gi\" or a number of bytes";
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
        _ => return Err(invalid(field, EXPECTED, s)),
    };
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)).ok_or_else(|| invalid(field, EXPECTED, s))
}

/// A socket address like "0.0.0.0:7443".
pub fn parse_addr(field: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| invalid(field, "an address like \"0.0.0.0:7443\"", s))
}

/// Reads a YAML config file into its raw form. An empty file is an empty mapping (every
/// default); unknown fields are the raw type's business (`deny_unknown_fields`).
pub fn read_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    parse_yaml(path, &text)
}

/// [`read_yaml`] on text already read; `path` names it in errors.
pub fn parse_yaml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("f", "4Mi").ok(), Some(4 << 20));
        assert_eq!(parse_size("f", "500Gi").ok(), Some(500 << 30));
        assert_eq!(parse_size("f", "123").ok(), Some(123));
        assert_eq!(parse_size("f", "2G").ok(), Some(2_000_000_000));
        assert!(parse_size("f", "lots").is_err());
        assert!(parse_size("f", "99999999999999999999Ti").is_err());
        assert_eq!(
            parse_size("cache.max_bytes", "lots").unwrap_err().to_string(),
            "cache.max_bytes: expected a size like \"4Mi\", \"500Gi\" or a number of bytes, got \"lots\""
        );
    }

    #[test]
    fn durations_and_addresses_name_the_field() {
        assert_eq!(parse_duration("f", "500ms").ok(), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_duration("node.collect_interval", "often").unwrap_err().to_string(),
            "node.collect_interval: expected a duration like \"15s\" or \"500ms\", got \"often\""
        );
        assert_eq!(
            parse_addr("listen", "nowhere").unwrap_err().to_string(),
            "listen: expected an address like \"0.0.0.0:7443\", got \"nowhere\""
        );
    }

    #[test]
    fn yaml_errors_name_the_file_and_empty_is_default() {
        #[derive(Debug, Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct T {
            #[serde(default)]
            a: u32,
        }
        let t: T = parse_yaml(Path::new("x.yaml"), "  \n").expect("empty is every default");
        assert_eq!(t.a, 0);
        let err = parse_yaml::<T>(Path::new("x.yaml"), "b: 1").unwrap_err().to_string();
        assert!(err.starts_with("config file x.yaml: unknown field `b`"), "{err}");
    }
}
