//! The coordinator's own certificate authority.
//!
//! On first start it creates a CA (key mode 0600 in the data dir); at every
//! start it signs a fresh server certificate for the advertised names, whose
//! key lives only in memory. Agents enroll with a one-time token ([`tokens`])
//! and a CSR; the certificate they get is built from the coordinator's own
//! parameters, and only the public key is taken from the CSR.

pub mod tokens;

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_protocol::{TargetId, Timestamp};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

pub use tokens::{TokenHash, TokenKey};

/// Failures of the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("could not read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("the certificate request is malformed or its signature is wrong")]
    BadCsr(#[source] rcgen::Error),
    #[error("could not create a certificate")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("invalid client verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A certificate issued to one agent.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    /// Lowercase hex of the serial number, as recorded in the store.
    pub serial: String,
}

/// The CA, the token key, and the TLS configuration of the agent listener.
pub struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    tokens: TokenKey,
    agent_tls: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

const CA_KEY: &str = "ca.key";
const CA_CERT: &str = "ca.crt";
const TOKEN_KEY: &str = "token.key";

impl Pki {
    /// Loads the CA from `dir`, creating it on first start, and signs a server
    /// certificate for `server_names` (DNS names or IP addresses).
    pub fn load_or_create(dir: &Path, server_names: &[String]) -> Result<Self, PkiError> {
        fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
        let key_path = dir.join(CA_KEY);
        let cert_path = dir.join(CA_CERT);
        let (ca_key, ca_pem) = if key_path.exists() {
            let key_pem = read_secret(&key_path)?;
            let ca_pem = fs::read_to_string(&cert_path).map_err(|s| io(&cert_path, s))?;
            (KeyPair::from_pem(&key_pem)?, ca_pem)
        } else {
            let key = KeyPair::generate()?;
            let ca_pem = ca_params()?.self_signed(&key)?.pem();
            write_secret(&key_path, key.serialize_pem().as_bytes())?;
            write_public(&cert_path, ca_pem.as_bytes())?;
            (key, ca_pem)
        };
        let tokens = TokenKey::load_or_create(&dir.join(TOKEN_KEY))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
        let agent_tls = agent_tls_config(&ca_pem, &issuer, server_names)?;
        Ok(Self { ca_pem, issuer, tokens, agent_tls })
    }

    /// The CA certificate agents pin.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn tokens(&self) -> &TokenKey {
        &self.tokens
    }

    /// The rustls configuration of the agent listener: server certificate, and
    /// client certificates verified against the CA when presented.
    pub fn agent_tls(&self) -> Arc<rustls::ServerConfig> {
        self.agent_tls.clone()
    }

    /// A TLS configuration for the public API with a server certificate from
    /// this CA for `names` (clients trust `<data>/pki/ca.crt`); no client certificates.
    pub fn api_tls(&self, names: &[String]) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let (chain, key) = server_cert(&self.ca_pem, &self.issuer, names)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Signs a client certificate for `target`, valid until `not_after`.
    ///
    /// Only the CSR's public key is used; its subject and extensions (which
    /// could ask for CA rights) are ignored.
    pub fn issue(&self, target: TargetId, csr_pem: &str, not_after: Timestamp) -> Result<IssuedCert, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        let serial: [u8; 16] = rand::random();
        let mut serial = serial.to_vec();
        serial[0] = (serial[0] & 0x3f) | 0x40; // positive, and DER keeps all 16 bytes
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("kiln target {target}"));
        params.subject_alt_names = vec![SanType::URI(target.san_uri().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = to_time(Timestamp::now()) - time::Duration::minutes(5);
        params.not_after = to_time(not_after);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(IssuedCert { pem: cert.pem(), serial: hex::encode(&serial) })
    }
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn("kiln coordinator CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = to_time(Timestamp::now()) - time::Duration::hours(1);
    params.not_after = to_time(Timestamp::now()) + time::Duration::days(3650);
    Ok(params)
}

/// A server certificate from the CA for `server_names`, with the CA in its chain.
fn server_cert(
    ca_pem: &str,
    issuer: &Issuer<'static, KeyPair>,
    server_names: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn("kiln coordinator");
    params.subject_alt_names = server_names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = to_time(Timestamp::now()) - time::Duration::hours(1);
    params.not_after = to_time(Timestamp::now()) + time::Duration::days(365);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer)?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| rustls::Error::General(format!("CA certificate: {e}")))?;
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| rustls::Error::General(e.to_owned()))?;
    Ok((vec![cert.der().clone(), ca_der], key_der))
}

fn agent_tls_config(
    ca_pem: &str,
    issuer: &Issuer<'static, KeyPair>,
    server_names: &[String],
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let (chain, key_der) = server_cert(ca_pem, issuer, server_names)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| rustls::Error::General(format!("CA certificate: {e}")))?;
    roots.add(ca_der)?;
    // Unauthenticated handshakes are allowed so an agent can enroll; every
    // other route refuses a request without a verified client certificate.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn to_time(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.as_second()).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn io(path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io { path: path.to_owned(), source }
}

/// Reads a secret file, refusing one that others can read.
fn read_secret(path: &Path) -> Result<String, PkiError> {
    let meta = fs::metadata(path).map_err(|s| io(path, s))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::KeyPermissions { path: path.to_owned(), mode });
    }
    fs::read_to_string(path).map_err(|s| io(path, s))
}

/// Writes a secret file created with mode 0600 (never wider, not even briefly).
pub(crate) fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(|s| io(&tmp, s))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|s| io(&tmp, s))?;
    fs::rename(&tmp, path).map_err(|s| io(path, s))
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    fs::write(path, bytes).map_err(|s| io(path, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(key: &KeyPair, params: CertificateParams) -> String {
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    // The CA key is created 0600 and reused on the next start.
    #[test]
    fn ca_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pki::load_or_create(dir.path(), &["127.0.0.1".into()]).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Pki::load_or_create(dir.path(), &["localhost".into()]).unwrap();
        assert_eq!(a.ca_pem(), b.ca_pem());
    }

    // A CSR asking to be a CA still gets a leaf certificate naming only its target.
    #[test]
    fn issued_cert_ignores_csr_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &["127.0.0.1".into()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut evil = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        evil.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let target = TargetId::generate();
        let not_after = Timestamp::now() + jiff::SignedDuration::from_hours(1);
        let issued = pki.issue(target, &csr(&key, evil), not_after).unwrap();

        let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, vec![format!("URI({})", target.san_uri())]);
        assert!(cert.validity().not_after.timestamp() <= not_after.as_second());
        assert_eq!(cert.public_key().raw, rcgen::PublicKeyData::subject_public_key_info(&key).as_slice());
    }

    // Garbage in place of a CSR is refused with BadCsr.
    #[test]
    fn malformed_csr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let err = pki.issue(TargetId::generate(), "not a csr", Timestamp::now()).unwrap_err();
        assert!(matches!(err, PkiError::BadCsr(_)), "{err}");
    }
}
