//! EC2's instance identity document, checked at enrollment.
//!
//! IMDS signs the document three ways: `/signature` (RSA, SHA-256, a 1024-bit
//! key in most regions), `/pkcs7` (DSA, SHA-1) and `/rsa2048` (PKCS#7
//! SignedData, SHA-256, RSA-2048). kiln takes only the last, the strongest:
//! `cms` parses the SignedData, `ring` checks the RSA signature (and refuses
//! keys under 2048 bits). The one certificate trusted is the cloud's
//! `identity_certificate` option: AWS's RSA-2048 certificate of the region
//! (see "AWS public certificates for instance identity document signatures").
//!
//! The document is not secret and carries no nonce: it proves that whoever
//! sent it could read this instance's IMDS (or was given a copy by someone
//! who could), not that the enrolling process is the agent. With the one-time
//! token it shuts out whoever read the user-data from outside the instance.

use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerInfo};
use der::asn1::{ObjectIdentifier, OctetString};
use der::{Decode, Encode};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const CONTENT_TYPE_ATTR: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const MESSAGE_DIGEST_ATTR: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");

/// The certificate whose key signs identity documents, from the cloud's
/// `identity_certificate` option: the PEM itself, or the path of a PEM file.
#[derive(Clone, Debug)]
pub struct Signer {
    /// The certificate's RSAPublicKey (DER), as `ring` takes it.
    public_key: Vec<u8>,
}

impl Signer {
    /// Reads `option`: PEM text if it starts with `-----BEGIN`, else a file path.
    pub fn from_option(option: &str) -> Result<Signer, String> {
        let pem = if option.trim_start().starts_with("-----BEGIN") {
            option.to_owned()
        } else {
            std::fs::read_to_string(option)
                .map_err(|e| format!("identity_certificate: cannot read the certificate file {option:?}: {e}"))?
        };
        Self::from_pem(&pem).map_err(|e| format!("identity_certificate: {e}"))
    }

    fn from_pem(pem: &str) -> Result<Signer, String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|_| "it is not a PEM certificate (want AWS's RSA-2048 certificate of the region)".to_owned())?;
        let cert = pem.parse_x509().map_err(|e| format!("the certificate does not parse: {e}"))?;
        let spki = cert.public_key();
        if spki.algorithm.algorithm.to_id_string() != RSA.to_string() {
            return Err("the certificate's key is not RSA: use AWS's RSA-2048 certificate, not the DSA one".into());
        }
        let public_key = spki.subject_public_key.data.to_vec();
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err("the certificate's RSA key does not parse".into()),
        };
        if bits < 2048 {
            return Err(format!(
                "the certificate's key has {bits} bits: that is the /signature certificate; use the RSA-2048 one"
            ));
        }
        Ok(Signer { public_key })
    }

    /// Checks the `rsa2048` PKCS#7 (base64, as IMDS serves it) over
    /// `document`, and returns the document's fields.
    pub fn verify(&self, document: &str, rsa2048: &str) -> Result<Document, String> {
        let der = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            rsa2048.chars().filter(|c| !c.is_ascii_whitespace()).collect::<String>(),
        )
        .map_err(|_| "the rsa2048 signature is not base64".to_owned())?;
        let signed = signed_data(&der)?;
        // The SignedData normally carries the document; it must be the one sent.
        if let Some(content) = &signed.encap_content_info.econtent {
            let content = content.decode_as::<OctetString>().map_err(|_| "its content is not data".to_owned())?;
            if content.as_bytes() != document.as_bytes() {
                return Err("the signed content is not the document sent".into());
            }
        }
        let [signer] = signed.signer_infos.0.as_slice() else {
            return Err("the SignedData must have exactly one signer".into());
        };
        let message = signed_message(signer, document.as_bytes())?;
        if ![RSA, SHA256_WITH_RSA].contains(&signer.signature_algorithm.oid) {
            return Err(format!("the signature algorithm {} is not RSA", signer.signature_algorithm.oid));
        }
        ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, &self.public_key)
            .verify(&message, signer.signature.as_bytes())
            .map_err(|_| "the signature is not from the identity_certificate's key".to_owned())?;
        serde_json::from_str(document).map_err(|e| format!("the signed document is not the JSON expected: {e}"))
    }
}

fn signed_data(der: &[u8]) -> Result<SignedData, String> {
    let info = ContentInfo::from_der(der).map_err(|e| format!("the rsa2048 signature is not PKCS#7: {e}"))?;
    if info.content_type != SIGNED_DATA {
        return Err("the rsa2048 signature is not a PKCS#7 SignedData".into());
    }
    let signed = info.content.decode_as::<SignedData>().map_err(|e| format!("its SignedData does not parse: {e}"))?;
    if signed.encap_content_info.econtent_type != DATA {
        return Err("its content is not data".into());
    }
    Ok(signed)
}

/// The bytes the signer's RSA signature covers: the signed attributes (whose
/// message digest must be the document's SHA-256), or else the document.
fn signed_message(signer: &SignerInfo, document: &[u8]) -> Result<Vec<u8>, String> {
    if signer.digest_alg.oid != SHA256 {
        return Err(format!("the digest algorithm {} is not SHA-256", signer.digest_alg.oid));
    }
    let Some(attrs) = &signer.signed_attrs else { return Ok(document.to_vec()) };
    let value = |oid: ObjectIdentifier| {
        let attr = attrs.iter().find(|a| a.oid == oid)?;
        match attr.values.as_slice() {
            [v] => Some(v.clone()),
            _ => None,
        }
    };
    let content_type = value(CONTENT_TYPE_ATTR).and_then(|v| v.decode_as::<ObjectIdentifier>().ok());
    if content_type != Some(DATA) {
        return Err("the signed attributes do not name the content type data".into());
    }
    let digest = value(MESSAGE_DIGEST_ATTR)
        .and_then(|v| v.decode_as::<OctetString>().ok())
        .ok_or_else(|| "the signed attributes have no message digest".to_owned())?;
    if digest.as_bytes() != Sha256::digest(document).as_slice() {
        return Err("the signed message digest is not the document's".into());
    }
    attrs.to_der().map_err(|e| format!("re-encoding the signed attributes: {e}"))
}

/// The fields of the document kiln checks.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub instance_id: String,
    pub region: String,
    pub account_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Garbled input is refused with a reason, before any key is used.
    #[test]
    fn garbled_signatures_are_refused() {
        let signer = Signer { public_key: vec![] };
        let cases = [
            ("not base64!", "not base64"),
            ("AAAA", "not PKCS#7"),
            // A ContentInfo of type data, not signedData.
            ("MBQGCSqGSIb3DQEHAaAHBAVoZWxsbw==", "not a PKCS#7 SignedData"),
        ];
        for (rsa2048, want) in cases {
            let err = signer.verify("{}", rsa2048).unwrap_err();
            assert!(err.contains(want), "{rsa2048}: {err}");
        }
    }

    #[test]
    fn certificates_other_than_rsa_2048_are_refused() {
        let ec = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap().cert.pem();
        let cases = [
            ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "certificate"),
            (ec.as_str(), "not RSA"),
            ("/nonexistent/aws.pem", "cannot read the certificate file"),
        ];
        for (option, want) in cases {
            let err = Signer::from_option(option).unwrap_err();
            assert!(err.contains(want), "{option}: {err}");
        }
    }
}
