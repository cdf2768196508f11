//! Enrollment: trade the one-time token and a CSR for a client certificate.

use anyhow::Context;
use kiln_protocol::TargetId;
use kiln_protocol::agent::{EnrollRequest, EnrollResponse, InstanceIdentity, paths};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use reqwest::StatusCode;
use tracing::info;

use crate::client::{Api, Failure, retry, send, unexpected};
use crate::stop::Stop;

/// The agent's certificate and the key it was issued for (kept in memory only).
pub struct Credentials {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A fresh ECDSA P-256 key and a CSR for it.
fn key_and_csr(target: TargetId) -> anyhow::Result<(KeyPair, String)> {
    let key = KeyPair::generate().context("generating the agent key")?;
    let mut params = CertificateParams::new(vec![]).context("preparing the CSR")?;
    // Informative only: the coordinator takes nothing but the public key.
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, format!("kiln-agent {target}"));
    let csr = params.serialize_request(&key).context("signing the CSR")?;
    Ok((key, csr.pem().context("encoding the CSR")?))
}

/// Generates a key and enrolls it for the API's target, with the machine's
/// signed identity where the cloud checks it.
pub async fn enroll(api: &Api, token: String, identity: Option<InstanceIdentity>) -> anyhow::Result<Credentials> {
    let target = api.target;
    let (key, csr_pem) = key_and_csr(target)?;
    let request = EnrollRequest { target, token, csr_pem, identity };

    let url = api.url(paths::ENROLL);
    let issued = retry(api.retry, "enrolling", || async {
        let response = send(api.http().post(url.clone()).json(&request)).await?;
        match response.status() {
            status if status.is_success() => Ok(response.json::<EnrollResponse>().await?),
            // 403: the token was good but the machine's identity was not.
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let (_, message) = crate::client::error_body(response).await;
                Err(Failure::Fatal(anyhow::Error::from(Stop::EnrollRefused).context(message)))
            }
            _ => Err(unexpected(response).await),
        }
    })
    .await?;
    info!(not_after = %issued.not_after, "enrolled");
    Ok(Credentials { cert_pem: issued.certificate_pem, key_pem: key.serialize_pem() })
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateSigningRequestParams, PKCS_ECDSA_P256_SHA256, PublicKeyData};

    use super::*;

    #[test]
    fn csr_carries_the_p256_key() {
        let (key, csr_pem) = key_and_csr(TargetId::generate()).unwrap();
        assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        let csr = CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
        assert_eq!(csr.public_key.der_bytes(), key.der_bytes());
        assert!(key.serialize_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
    }
}
