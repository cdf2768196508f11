//! Renders the user-data a kiln VM runs at first boot.
//!
//! The user-data is a POSIX `sh` script (see `templates/user-data.sh`) that
//! downloads kiln's agent, checks its sha256 against the pinned value, and
//! execs it with the one-time enrollment token in its environment. It carries
//! only what the trust model allows: URLs, the CA certificate, the agent's
//! sha256, the target id and the token.

mod error;
mod shell;
mod template;

pub use error::RenderError;
use kiln_protocol::TargetId;

/// Where the agent keeps its files unless `KILN_AGENT_DIR` says otherwise.
pub const DEFAULT_AGENT_DIR: &str = "/var/lib/kiln-agent";

/// How long callers usually let the script retry the agent download.
pub const DEFAULT_FETCH_TIMEOUT_SECS: u64 = 600;

const TEMPLATE: &str = include_str!("../templates/user-data.sh");

/// The values one target's user-data is rendered from.
#[derive(Clone, Debug)]
pub struct UserData<'a> {
    /// The https base URL of the coordinator's agent listener, e.g. `https://10.0.2.2:7701`.
    pub agent_url: &'a str,
    /// Where the agent binary is served, e.g. `http://10.0.2.2:7702/bootstrap/v1/kiln-agent`.
    pub agent_binary_url: &'a str,
    /// The coordinator's CA certificate: the only root the agent trusts.
    pub ca_pem: &'a str,
    /// The agent binary's sha256: 64 lowercase hex characters.
    pub agent_sha256: &'a str,
    pub target: TargetId,
    /// The one-time enrollment token.
    pub token: &'a str,
    /// How long the script keeps retrying the download before it gives up.
    pub fetch_timeout_secs: u64,
    /// The agent sends EC2's signed instance identity document at enrollment.
    pub ec2_identity: bool,
}

impl UserData<'_> {
    /// Checks every value and renders the script.
    pub fn render(&self) -> Result<String, RenderError> {
        for (field, value) in [
            ("agent URL", self.agent_url),
            ("agent binary URL", self.agent_binary_url),
            ("CA certificate", self.ca_pem),
            ("agent sha256", self.agent_sha256),
            ("enrollment token", self.token),
        ] {
            if value.contains('\0') {
                return Err(RenderError::NulByte { field });
            }
        }
        check_url("agent URL", self.agent_url, &["https://"])?;
        check_url("agent binary URL", self.agent_binary_url, &["http://", "https://"])?;
        check_sha256(self.agent_sha256)?;
        let ca_pem = normalize_certificate(self.ca_pem)?;
        if self.token.is_empty() {
            return Err(RenderError::EmptyToken);
        }
        if self.fetch_timeout_secs == 0 {
            return Err(RenderError::ZeroFetchTimeout);
        }

        let target = self.target.to_string();
        let fetch_timeout = self.fetch_timeout_secs.to_string();
        Ok(template::substitute(TEMPLATE, |name| match name {
            "AGENT_URL" => Some(shell::quote(self.agent_url)),
            "AGENT_BINARY_URL" => Some(shell::quote(self.agent_binary_url)),
            "AGENT_SHA256" => Some(shell::quote(self.agent_sha256)),
            "TARGET" => Some(shell::quote(&target)),
            "TOKEN" => Some(shell::quote(self.token)),
            "FETCH_TIMEOUT_SECS" => Some(shell::quote(&fetch_timeout)),
            "DEFAULT_AGENT_DIR" => Some(shell::quote(DEFAULT_AGENT_DIR)),
            "IDENTITY" => Some(shell::quote(if self.ec2_identity { "ec2" } else { "" })),
            // Inside a quoted heredoc; `normalize_certificate` guarantees it
            // holds only PEM armor and base64 lines, so it cannot end it early.
            "CA_PEM" => Some(ca_pem.clone()),
            _ => None,
        }))
    }
}

fn check_url(field: &'static str, url: &str, schemes: &[&'static str]) -> Result<(), RenderError> {
    let bad = |reason: &'static str| RenderError::BadUrl { field, url: url.to_owned(), reason };
    let Some(rest) = schemes.iter().find_map(|s| url.strip_prefix(s)) else {
        return Err(bad(if schemes.len() == 1 {
            "it must start with https://"
        } else {
            "it must start with http:// or https://"
        }));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("it has no host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it contains whitespace or control characters"));
    }
    Ok(())
}

fn check_sha256(sha256: &str) -> Result<(), RenderError> {
    let ok = sha256.len() == 64 && sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok { Ok(()) } else { Err(RenderError::BadSha256 { value: sha256.to_owned() }) }
}

/// Checks that `pem` is exactly one CERTIFICATE block and returns it with
/// `\n` line ends and no surrounding blank lines.
fn normalize_certificate(pem: &str) -> Result<String, RenderError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let bad = |reason: &'static str| Err(RenderError::BadCaPem { reason });
    let lines: Vec<&str> = pem.trim().lines().map(str::trim_end).collect();
    let (Some(&first), Some(&last)) = (lines.first(), lines.last()) else {
        return bad("it is empty");
    };
    if first != BEGIN {
        return bad("it does not start with -----BEGIN CERTIFICATE-----");
    }
    if lines.len() < 3 || last != END {
        return bad("it does not end with -----END CERTIFICATE-----");
    }
    let body = &lines[1..lines.len() - 1];
    if body.iter().any(|l| l.starts_with("-----")) {
        return bad("it holds more than one PEM block");
    }
    let base64 =
        |l: &&str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if !body.iter().all(base64) {
        return bad("its body is not base64");
    }
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests;
