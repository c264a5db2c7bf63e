//! A small certificate authority for development and tests: local mode issues the
//! controller, agent and operator certificates with it, and the end-to-end tests issue good,
//! expired and foreign ones. Production clusters bring their own (cert-manager, SPIRE...);
//! nothing on the serving path depends on this module.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Which way a leaf certificate may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    /// DNS names or IP addresses, as SANs. For an agent, its node name.
    pub names: Vec<String>,
    pub usage: Usage,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// Valid from an hour ago (clock skew) for `valid_for`.
    pub fn new(common_name: &str, names: &[&str], usage: Usage, valid_for: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: common_name.to_owned(),
            names: names.iter().map(|s| (*s).to_owned()).collect(),
            usage,
            not_before: now - time::Duration::hours(1),
            not_after: now + valid_for,
        }
    }

    /// A certificate whose validity ended `ago` before now.
    pub fn expired(mut self, ago: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        self.not_before = now - ago - time::Duration::days(1);
        self.not_after = now - ago;
        self
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority").finish_non_exhaustive()
    }
}

fn gen_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Generate { what, source }
}

impl CertAuthority {
    /// A new self-signed CA (ECDSA P-256), valid for ten years.
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(gen_err("CA certificate"))?;
        Ok(Self { issuer: Issuer::new(params, key), cert_pem: cert.pem() })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let what = format!("certificate for {}", spec.common_name);
        let key = KeyPair::generate().map_err(gen_err(what.clone()))?;
        let mut params = CertificateParams::new(spec.names.clone()).map_err(gen_err(what.clone()))?;
        params.distinguished_name.push(DnType::CommonName, spec.common_name.as_str());
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match spec.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err(what))?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Writes a file durably and atomically (see [`crate::fsutil::write_atomic`]).
pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> Result<(), PkiError> {
    crate::fsutil::write_atomic(path, contents, private).map_err(|source| PkiError::Write { path: path.to_owned(), source })
}

/// Writes `ca.pem`, `<name>.pem` and `<name>-key.pem` into `dir`; returns their paths.
pub fn write_bundle(dir: &Path, name: &str, ca_pem: &str, issued: &Issued) -> Result<hearth_proto::transport::TlsFiles, PkiError> {
    let files = hearth_proto::transport::TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    write_atomic(&files.ca, ca_pem.as_bytes(), false)?;
    write_atomic(&files.cert, issued.cert_pem.as_bytes(), false)?;
    write_atomic(&files.key, issued.key_pem.as_bytes(), true)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::transport::{TlsMaterial, check_node_identity};

    #[test]
    fn issued_client_cert_proves_its_node_name_only() {
        let ca = CertAuthority::new("test CA").expect("ca");
        let leaf = ca.issue(&LeafSpec::new("agent", &["node-a"], Usage::Client, Duration::from_secs(3600))).expect("leaf");
        let m = TlsMaterial::from_pem(ca.cert_pem().into(), leaf.cert_pem.into(), leaf.key_pem.into()).expect("pem");
        let chain = m.cert_chain().expect("chain");
        assert_eq!(check_node_identity(&chain[0], "node-a"), Ok(()));
        assert!(check_node_identity(&chain[0], "node-b").is_err());
    }

    #[test]
    fn bundle_key_is_private() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = CertAuthority::new("t").expect("ca");
        let leaf = ca.issue(&LeafSpec::new("s", &["localhost"], Usage::Server, Duration::from_secs(60))).expect("leaf");
        let files = write_bundle(dir.path(), "server", ca.cert_pem(), &leaf).expect("write");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        TlsMaterial::load(&files).expect("written bundle loads");
    }
}
