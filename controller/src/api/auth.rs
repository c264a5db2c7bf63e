//! Who may call what. A caller proves an identity with a client certificate from the
//! cluster CA (its DNS SAN names it) or, where certificates are awkward (the HTTP scheduler
//! extender, curl), a bearer token. Identities listed under `auth:` in the config get a
//! role; any other certificate is an agent, which may only report its own node. So an agent
//! certificate stolen from a node cannot reserve devices or move replica counts.

use std::path::PathBuf;

use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use tonic::{Request, Status};

use hearth_service::config::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    /// Placement and the scheduler extender.
    Scheduler,
    /// Scaling and the KEDA external scaler.
    Autoscaler,
    /// Everything but reporting as a node.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Scheduler => "scheduler",
            Role::Autoscaler => "autoscaler",
            Role::Operator => "operator",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "scheduler" => Some(Role::Scheduler),
            "autoscaler" => Some(Role::Autoscaler),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// What each API needs.
pub const PLACEMENT: &[Role] = &[Role::Scheduler, Role::Operator];
pub const SCALING: &[Role] = &[Role::Autoscaler, Role::Operator];
pub const READ: &[Role] = &[Role::Scheduler, Role::Autoscaler, Role::Operator];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    pub role: String,
    /// A file holding the token (a Kubernetes Secret mounted as a file).
    pub file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    #[serde(default = "default_schedulers")]
    pub schedulers: Vec<String>,
    #[serde(default = "default_autoscalers")]
    pub autoscalers: Vec<String>,
    #[serde(default = "default_operators")]
    pub operators: Vec<String>,
    #[serde(default)]
    pub tokens: Vec<RawToken>,
    /// Agent identities that may report as any node: the one certificate a DaemonSet's
    /// agents share (the Helm chart's). Without this, an agent certificate must name its
    /// node. A holder of such a certificate can impersonate any node: keep it in a Secret
    /// only the agent's service account reads.
    #[serde(default)]
    pub fleet_agents: Vec<String>,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            schedulers: default_schedulers(),
            autoscalers: default_autoscalers(),
            operators: default_operators(),
            tokens: Vec::new(),
            fleet_agents: Vec::new(),
        }
    }
}

fn default_schedulers() -> Vec<String> {
    vec!["hearth-scheduler".into()]
}
fn default_autoscalers() -> Vec<String> {
    vec!["hearth-autoscaler".into()]
}
fn default_operators() -> Vec<String> {
    vec!["operator".into()]
}

/// Validated identities and tokens.
#[derive(Clone, Default)]
pub struct Auth {
    identities: Vec<(rustls::pki_types::ServerName<'static>, Role)>,
    tokens: Vec<(Vec<u8>, Role)>,
    /// Agent identities allowed to report as any node.
    fleet: Vec<rustls::pki_types::ServerName<'static>>,
    /// Insecure mode: no certificates to check, everyone may do everything.
    open: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("identities", &self.identities.len())
            .field("tokens", &self.tokens.len())
            .field("open", &self.open)
            .finish()
    }
}

fn invalid(field: String, expected: &'static str, got: impl Into<String>) -> ConfigError {
    ConfigError::Entry { field, expected: expected.into(), got: got.into() }
}

impl RawAuth {
    pub fn resolve(self, insecure: bool) -> Result<Auth, ConfigError> {
        let mut identities = Vec::new();
        for (field, names, role) in [
            ("schedulers", &self.schedulers, Role::Scheduler),
            ("autoscalers", &self.autoscalers, Role::Autoscaler),
            ("operators", &self.operators, Role::Operator),
        ] {
            for (i, n) in names.iter().enumerate() {
                let name = rustls::pki_types::ServerName::try_from(n.clone()).map_err(|_| {
                    invalid(format!("auth.{field}[{i}]"), "a DNS name as it appears in the client certificate's SAN", n.clone())
                })?;
                identities.push((name, role));
            }
        }
        let mut tokens = Vec::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let role = Role::parse(&t.role)
                .ok_or_else(|| invalid(format!("auth.tokens[{i}].role"), "scheduler, autoscaler or operator", t.role.clone()))?;
            let text = std::fs::read_to_string(&t.file).map_err(|e| {
                invalid(format!("auth.tokens[{i}].file"), "a readable file holding the token", format!("{}: {e}", t.file.display()))
            })?;
            let token = text.trim();
            if token.len() < 16 {
                return Err(invalid(
                    format!("auth.tokens[{i}].file"),
                    "a token of at least 16 characters",
                    format!("{} characters in {}", token.len(), t.file.display()),
                ));
            }
            tokens.push((token.as_bytes().to_vec(), role));
        }
        let mut fleet = Vec::new();
        for (i, n) in self.fleet_agents.iter().enumerate() {
            fleet.push(rustls::pki_types::ServerName::try_from(n.clone()).map_err(|_| {
                invalid(format!("auth.fleet_agents[{i}]"), "a DNS name as it appears in the agents' certificate SAN", n.clone())
            })?);
        }
        Ok(Auth { identities, tokens, fleet, open: insecure })
    }
}

/// Compares without an early exit, so response time says nothing about how much matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    /// The role a verified client certificate carries.
    pub fn role_of_cert(&self, cert: &CertificateDer<'_>) -> Role {
        let Ok(ee) = webpki::EndEntityCert::try_from(cert) else { return Role::Agent };
        self.identities.iter().find(|(name, _)| ee.verify_is_valid_for_subject_name(name).is_ok()).map(|(_, r)| *r).unwrap_or(Role::Agent)
    }

    /// Whether an agent certificate is a fleet identity, allowed to report as any node.
    pub fn is_fleet_agent(&self, cert: &CertificateDer<'_>) -> bool {
        let Ok(ee) = webpki::EndEntityCert::try_from(cert) else { return false };
        self.fleet.iter().any(|name| ee.verify_is_valid_for_subject_name(name).is_ok())
    }

    /// The role a bearer token carries, if it is one of ours.
    pub fn role_of_token(&self, token: &str) -> Option<Role> {
        self.tokens.iter().find(|(t, _)| same(t, token.as_bytes())).map(|(_, r)| *r)
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The caller's role from a bearer token or its certificate, or None in insecure mode.
    pub fn caller_role(&self, bearer: Option<&str>, cert: Option<&CertificateDer<'_>>) -> Result<Option<Role>, Status> {
        if let Some(b) = bearer {
            return self.role_of_token(b).map(Some).ok_or_else(|| Status::unauthenticated("bearer token not recognised"));
        }
        if self.open {
            return Ok(None);
        }
        cert.map(|c| Some(self.role_of_cert(c)))
            .ok_or_else(|| Status::unauthenticated(hearth_proto::transport::IdentityError::NoCertificate.to_string()))
    }

    /// Admits a gRPC request whose caller holds one of `allowed`.
    pub fn check<T>(&self, req: &Request<T>, allowed: &[Role], what: &str) -> Result<(), Status> {
        let bearer =
            req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
        let cert = req.peer_certs().and_then(|c| c.first().cloned());
        self.admit(self.caller_role(bearer, cert.as_ref())?, allowed, what)
    }

    pub fn admit(&self, role: Option<Role>, allowed: &[Role], what: &str) -> Result<(), Status> {
        match role {
            None => Ok(()),
            Some(r) if allowed.contains(&r) => Ok(()),
            Some(r) => {
                let roles = allowed.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(" or ");
                let article = if roles.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
                Err(Status::permission_denied(format!(
                    "{what} needs {article} {roles} identity; this caller is {} (see auth: in the controller config)",
                    r.as_str()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_service::pki::{CertAuthority, LeafSpec, Usage};
    use std::time::Duration;

    fn der(ca: &CertAuthority, name: &str) -> CertificateDer<'static> {
        let i = ca.issue(&LeafSpec::new(name, &[name], Usage::Client, Duration::from_secs(60))).unwrap();
        rustls_pemfile::certs(&mut i.cert_pem.as_bytes()).next().unwrap().unwrap()
    }

    #[test]
    fn roles_come_from_configured_identities_and_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("t");
        std::fs::write(&tok, "0123456789abcdef-token\n").unwrap();
        let raw: RawAuth = serde_yaml_ng::from_str(&format!("tokens: [{{role: scheduler, file: {}}}]", tok.display())).unwrap();
        let auth = raw.resolve(false).unwrap();
        let ca = CertAuthority::new("t").unwrap();
        assert_eq!(auth.role_of_cert(&der(&ca, "hearth-scheduler")), Role::Scheduler);
        assert_eq!(auth.role_of_cert(&der(&ca, "operator")), Role::Operator);
        assert_eq!(auth.role_of_cert(&der(&ca, "node-a")), Role::Agent);
        assert_eq!(auth.role_of_token("0123456789abcdef-token"), Some(Role::Scheduler));
        assert_eq!(auth.role_of_token("0123456789abcdef-tokeN"), None);
        let e = auth.admit(Some(Role::Agent), PLACEMENT, "Placement.Reserve").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("needs a scheduler or operator identity; this caller is agent"), "{}", e.message());
        assert!(auth.caller_role(None, None).is_err(), "no certificate and no token");
    }

    #[test]
    fn bad_auth_config_names_the_field() {
        let raw: RawAuth = serde_yaml_ng::from_str("tokens: [{role: root, file: /nonexistent}]").unwrap();
        let e = raw.resolve(false).unwrap_err().to_string();
        assert!(e.starts_with("auth.tokens[0].role: expected scheduler, autoscaler or operator"), "{e}");
        let raw: RawAuth = serde_yaml_ng::from_str("tokens: [{role: scheduler, file: /nonexistent}]").unwrap();
        let e = raw.resolve(false).unwrap_err().to_string();
        assert!(e.starts_with("auth.tokens[0].file: expected a readable file"), "{e}");
        let raw: RawAuth = serde_yaml_ng::from_str("schedulers: ['not a name!']").unwrap();
        assert!(raw.resolve(false).unwrap_err().to_string().starts_with("auth.schedulers[0]"));
    }
}
