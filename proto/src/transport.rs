//! Transport rules shared by agent and controller: where TLS material comes from, how the
//! controller's rustls server is configured, how a client certificate proves a node's
//! identity, and the message size limits both ends set explicitly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Largest message either end accepts. A snapshot of a large node (8 GPUs x 7 MIG devices,
/// hundreds of cached models) is tens of KiB; 4 MiB leaves room without letting one peer
/// make the other buffer unbounded data.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: cannot read: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} {path}: expected PEM with at least one {expected}, found none")]
    Empty { what: &'static str, path: PathBuf, expected: &'static str },
    #[error("{what} {path}: invalid PEM: {source}")]
    Pem { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("CA bundle {path}: certificate rejected as a trust anchor: {source}")]
    Anchor { path: PathBuf, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Paths to a CA bundle, a certificate chain and its private key (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// PEM bytes of the three files, read once at start so a bad path fails at start.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    files: TlsFiles,
}

impl std::fmt::Debug for TlsMaterial {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").field("files", &self.files).finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
}

impl TlsMaterial {
    /// Reads and parses all three files; every error names the file and what was expected.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let m = Self {
            ca_pem: read("CA bundle", &files.ca)?,
            cert_pem: read("certificate", &files.cert)?,
            key_pem: read("private key", &files.key)?,
            files: files.clone(),
        };
        m.ca_certs()?;
        m.cert_chain()?;
        m.private_key()?;
        Ok(m)
    }

    pub fn from_pem(ca_pem: Vec<u8>, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<Self, TlsError> {
        let files = TlsFiles { ca: "<memory>".into(), cert: "<memory>".into(), key: "<memory>".into() };
        let m = Self { ca_pem, cert_pem, key_pem, files };
        m.ca_certs()?;
        m.cert_chain()?;
        m.private_key()?;
        Ok(m)
    }

    fn certs(&self, what: &'static str, pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..]).collect::<Result<_, _>>().map_err(|source| TlsError::Pem {
            what,
            path: path.to_owned(),
            source,
        })?;
        if certs.is_empty() {
            return Err(TlsError::Empty { what, path: path.to_owned(), expected: "CERTIFICATE block" });
        }
        Ok(certs)
    }

    pub fn ca_certs(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        self.certs("CA bundle", &self.ca_pem, &self.files.ca)
    }

    pub fn cert_chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        self.certs("certificate", &self.cert_pem, &self.files.cert)
    }

    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        let path = &self.files.key;
        rustls_pemfile::private_key(&mut &self.key_pem[..])
            .map_err(|source| TlsError::Pem { what: "private key", path: path.clone(), source })?
            .ok_or_else(|| TlsError::Empty {
                what: "private key",
                path: path.clone(),
                expected: "PRIVATE KEY block (PKCS#8, PKCS#1 or SEC1)",
            })
    }

    /// tonic client TLS: trust only our CA, present our certificate.
    pub fn client_config(&self, server_name: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(server_name)
    }

    /// The controller's rustls server config. Client certificates are verified against our
    /// CA when presented (expired or untrusted ones fail the handshake); a connection with
    /// none is let through TLS so the gRPC layer can refuse it with a readable status.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in self.ca_certs()? {
            roots.add(c).map_err(|source| TlsError::Anchor { path: self.files.ca.clone(), source })?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.cert_chain()?, self.private_key()?)
            .map_err(|e| TlsError::Config(format!("certificate {} does not match its key: {e}", self.files.cert.display())))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("no client certificate presented; the controller requires one (mTLS)")]
    NoCertificate,
    #[error("client certificate is not parseable: {0}")]
    BadCertificate(String),
    #[error("client certificate is not valid for node {claimed:?} (its DNS SANs must include the node name)")]
    Mismatch { claimed: String },
}

/// Checks that a verified client certificate names `node`. Chain and validity were already
/// checked in the handshake; this binds the certificate to the claim made in Hello.
pub fn check_node_identity(cert: &CertificateDer<'_>, node: &str) -> Result<(), IdentityError> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let name = ServerName::try_from(node.to_owned()).map_err(|_| IdentityError::Mismatch { claimed: node.to_owned() })?;
    ee.verify_is_valid_for_subject_name(&name).map_err(|_| IdentityError::Mismatch { claimed: node.to_owned() })
}

/// A bounded label for a failed TLS handshake, for `..._tls_handshake_failures_total{reason}`.
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(inner) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return if err.kind() == std::io::ErrorKind::TimedOut { "timeout" } else { "io" };
    };
    match inner {
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => "expired",
        Error::InvalidCertificate(CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }) => "not_yet_valid",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "untrusted",
        Error::InvalidCertificate(CertificateError::Revoked) => "revoked",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoCertificatesPresented => "no_certificate",
        Error::AlertReceived(_) => "alert_received",
        Error::InappropriateMessage { .. } | Error::InappropriateHandshakeMessage { .. } | Error::InvalidMessage(_) => "protocol",
        _ => "other",
    }
}
