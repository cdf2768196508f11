//! Plays AWS's signer of instance identity documents: an RSA key, its
//! self-signed certificate (what a cloud's `identity_certificate` names), and
//! the `rsa2048` PKCS#7 SignedData IMDS serves beside each document.

use base64::Engine;
use cms::builder::{SignedDataBuilder, SignerInfoBuilder};
use cms::cert::IssuerAndSerialNumber;
use cms::signed_data::{EncapsulatedContentInfo, SignerIdentifier};
use der::asn1::ObjectIdentifier;
use der::{Any, DecodePem, Encode, Tag};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use sha2::Sha256;
use spki::AlgorithmIdentifierOwned;

const DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");

/// The account every test document names.
pub const ACCOUNT: &str = "123456789012";

/// One signing key and its certificate.
pub struct IdentitySigner {
    key: rsa::RsaPrivateKey,
    cert_pem: String,
}

impl std::fmt::Debug for IdentitySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentitySigner").finish_non_exhaustive()
    }
}

impl IdentitySigner {
    /// A fresh RSA-2048 key, as AWS's `rsa2048` signer has.
    pub fn generate() -> Self {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("an RSA key");
        let pem = key.to_pkcs8_pem(LineEnding::LF).expect("PKCS#8");
        let pair = rcgen::KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).expect("rcgen takes the key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "Amazon Web Services LLC (kiln tests)");
        let cert_pem = params.self_signed(&pair).expect("a self-signed certificate").pem();
        Self { key, cert_pem }
    }

    /// The certificate, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A document as IMDS serves it, for `instance_id` in `region`.
    pub fn document(instance_id: &str, region: &str, account: &str) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "accountId": account,
            "architecture": "x86_64",
            "availabilityZone": format!("{region}a"),
            "imageId": "ami-0123456789abcdef0",
            "instanceId": instance_id,
            "instanceType": "t3.micro",
            "pendingTime": "2026-12-02T08:00:00Z",
            "privateIp": "10.0.0.10",
            "region": region,
            "version": "2017-09-30",
        }))
        .unwrap()
    }

    /// The `rsa2048` answer for `document`: base64 of a PKCS#7 SignedData
    /// (SHA-256, RSA PKCS#1 v1.5, signed attributes) that carries the document.
    pub fn sign(&self, document: &str) -> String {
        let content = EncapsulatedContentInfo {
            econtent_type: DATA,
            econtent: Some(Any::new(Tag::OctetString, document.as_bytes()).unwrap()),
        };
        let cert = x509_cert::Certificate::from_pem(&self.cert_pem).expect("the certificate parses");
        let sid = SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: cert.tbs_certificate.issuer.clone(),
            serial_number: cert.tbs_certificate.serial_number.clone(),
        });
        let digest = AlgorithmIdentifierOwned { oid: SHA256, parameters: None };
        let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new(self.key.clone());
        let info = SignerInfoBuilder::new(&signer, sid, digest.clone(), &content, None).unwrap();
        let signed = SignedDataBuilder::new(&content)
            .add_digest_algorithm(digest)
            .unwrap()
            .add_signer_info::<_, rsa::pkcs1v15::Signature>(info)
            .unwrap()
            .build()
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(signed.to_der().unwrap())
    }
}
