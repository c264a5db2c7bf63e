//! How both binaries reach the Kubernetes API: one client built from the in-cluster service
//! account, a kubeconfig, or an explicit URL with token and CA files; the API server's
//! validation rules for what Hearth writes (checked before sending, at config load where the
//! value comes from config); and API errors turned into messages that name what to fix.

use std::path::PathBuf;
use std::time::Duration;

/// Where the API server is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeSource {
    /// The pod's service account (KUBERNETES_SERVICE_HOST/PORT, the mounted token and CA).
    InCluster,
    /// A kubeconfig file's current context.
    Kubeconfig(PathBuf),
    /// An `https://` URL with a bearer token file (re-read as it rotates) and a CA file.
    Explicit { api_server: String, token_file: PathBuf, ca_file: PathBuf },
}

impl std::fmt::Display for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InCluster => f.write_str("the in-cluster service account"),
            Self::Kubeconfig(p) => write!(f, "kubeconfig {}", p.display()),
            Self::Explicit { api_server, .. } => f.write_str(api_server),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes client from {source_desc}: {reason}")]
    Client { source_desc: String, reason: String },
    #[error("{what}: {reason}")]
    Api { what: String, reason: String, code: Option<u16> },
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
}

impl KubeError {
    /// The HTTP status the API server answered with, if it answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Api { code, .. } => *code,
            _ => None,
        }
    }

    /// A refusal that repeating the same request cannot fix (invalid, forbidden, not found):
    /// wait for new input instead of retrying.
    pub fn is_permanent(&self) -> bool {
        matches!(self.code(), Some(400 | 403 | 404 | 422))
    }

    /// Someone else changed the object first (409): re-read and try again at once.
    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }
}

/// Builds a client. Nothing is contacted yet.
pub async fn client(source: &KubeSource) -> Result<kube::Client, KubeError> {
    let err = |reason: String| KubeError::Client { source_desc: source.to_string(), reason };
    let config = match source {
        KubeSource::InCluster => kube::Config::incluster().map_err(|e| err(e.to_string()))?,
        KubeSource::Kubeconfig(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.map_err(|e| err(e.to_string()))?
        }
        KubeSource::Explicit { api_server, token_file, ca_file } => {
            let uri = api_server.parse().map_err(|e| err(format!("API server URL {api_server:?}: {e}")))?;
            let mut c = kube::Config::new(uri);
            c.root_cert_file = Some(ca_file.clone());
            c.auth_info.token_file = Some(token_file.display().to_string());
            c
        }
    };
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// Turns a kube error into one an operator can act on: a 403 names the verb and resource
/// the `role` must grant; a 404 names the object; others carry the API server's message.
pub fn api_error(what: impl Into<String>, verb: &str, resource: &str, role: &str, e: kube::Error) -> KubeError {
    let what = what.into();
    match e {
        kube::Error::Api(s) => {
            let reason = match s.code {
                401 => "unauthorized: the credentials were refused".to_owned(),
                403 => format!("forbidden: the {role} must allow {verb} on {resource} ({})", s.message),
                404 => format!("not found ({})", s.message),
                409 => format!("conflict: changed by someone else ({})", s.message),
                code => format!("HTTP {code} {}: {}", s.reason, s.message),
            };
            KubeError::Api { what, reason, code: Some(s.code) }
        }
        other => KubeError::Api { what, reason: other.to_string(), code: None },
    }
}

/// Runs one API call with a deadline: the client has no read timeout (watches are long
/// polls), so a server that stops answering would otherwise hold the call forever.
pub async fn within<T>(what: &str, timeout: Duration, f: impl Future<Output = Result<T, KubeError>>) -> Result<T, KubeError> {
    tokio::time::timeout(timeout, f).await.map_err(|_| KubeError::Timeout { what: what.to_owned(), timeout })?
}

/// What a label value must look like (the API server refuses anything else with 422).
pub const LABEL_VALUE_RULE: &str = "a Kubernetes label value: at most 63 characters, alphanumeric at both ends, '-', '_' or '.' between";

/// Whether `v` is a valid label value (empty is valid).
pub fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric())
            && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
}

/// Whether `n` is a DNS-1123 label (Lease, pod and namespace names Hearth writes).
pub fn is_dns_label(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && n.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_follow_the_api_server() {
        for ok in ["", "balanced", "all-1g.10gb", "A_b-c.9", &"x".repeat(63)] {
            assert!(is_label_value(ok), "{ok:?}");
        }
        for bad in ["-x", "x-", "a b", "all/1g", "ü", &"x".repeat(64), "x."] {
            assert!(!is_label_value(bad), "{bad:?}");
        }
        assert!(is_dns_label("hearth-controller") && !is_dns_label("Hearth") && !is_dns_label("a.b") && !is_dns_label(""));
    }

    #[test]
    fn forbidden_names_the_verb_and_resource() {
        let s = kube::core::Status::failure("nodes \"n1\" is forbidden: User cannot patch", "Forbidden").with_code(403);
        let e = api_error("PATCH node n1", "patch", "nodes", "agent's ClusterRole", kube::Error::Api(Box::new(s)));
        assert_eq!(
            e.to_string(),
            "PATCH node n1: forbidden: the agent's ClusterRole must allow patch on nodes (nodes \"n1\" is forbidden: User cannot patch)"
        );
        assert!(e.is_permanent() && !e.is_conflict());
    }
}
