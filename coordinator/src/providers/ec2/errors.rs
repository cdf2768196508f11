//! EC2's errors as provider errors: the cloud's own code, and what to fix.

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

use crate::providers::{ProviderError, ProviderErrorKind};

/// Codes that mean "try again later".
const TRANSIENT: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "Unavailable",
    "ServiceUnavailable",
    "InsufficientInstanceCapacity",
];

/// Hints for the codes users meet most.
fn hint(code: &str) -> Option<&'static str> {
    Some(match code {
        "AuthFailure" | "InvalidClientTokenId" | "SignatureDoesNotMatch" | "UnrecognizedClientException" => {
            "check the cloud's access key (kiln cloud add --access-key-id) or the AWS credentials in the environment"
        }
        "UnauthorizedOperation" => "the credentials lack this EC2 permission; grant it in IAM",
        "InvalidAMIID.NotFound" | "InvalidAMIID.Malformed" => {
            "the base image does not exist in this region: check the AMI id and the cloud's region"
        }
        "InvalidParameterValue" | "Unsupported" | "InvalidInstanceType" => {
            "check the instance type (target instance_type or the cloud's instance_type option) is offered in this region"
        }
        "InvalidSubnetID.NotFound" => "the target's network (subnet id) does not exist in this region",
        "InvalidGroup.NotFound" => "a security group in the target's security_groups does not exist",
        "RequestLimitExceeded" => "EC2 throttled the request; kiln retried with backoff",
        _ => return None,
    })
}

/// Turns an SDK error into a provider error naming `what` kiln was doing.
pub fn map<E, R>(what: &str, err: SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(_) => {
            let code = err.code().unwrap_or("Unknown").to_owned();
            let message = err.message().unwrap_or("no message").to_owned();
            let kind = if code.ends_with(".NotFound") {
                ProviderErrorKind::NotFound
            } else if TRANSIENT.contains(&code.as_str()) {
                ProviderErrorKind::Transient
            } else {
                ProviderErrorKind::Invalid
            };
            let text = match hint(&code) {
                Some(h) => format!("{what}: {message}; {h}"),
                None => format!("{what}: {message}"),
            };
            ProviderError::new(kind, text).with_code(code)
        }
        SdkError::TimeoutError(_) => ProviderError::new(ProviderErrorKind::Transient, format!("{what}: EC2 timed out")),
        SdkError::DispatchFailure(d) => ProviderError::new(
            if d.is_timeout() || d.is_io() { ProviderErrorKind::Transient } else { ProviderErrorKind::Failed },
            format!(
                "{what}: cannot reach the EC2 endpoint ({}); check the cloud's endpoint and region",
                crate::error_chain(&err)
            ),
        ),
        _ => ProviderError::new(ProviderErrorKind::Failed, format!("{what}: {}", crate::error_chain(&err))),
    }
}
