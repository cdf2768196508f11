use std::process::Command;

use super::*;

const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBfzCCASWgAwIBAgIUOFc3a2lsbi10ZXN0LWNhLW5vdC1yZWFsMAoGCCqGSM49
BAMCMBIxEDAOBgNVBAMMB2tpbG4gQ0EwHhcNMjYwMTAxMDAwMDAwWhcNMzYwMTAx
MDAwMDAwWjASMRAwDgYDVQQDDAdraWxuIENBMFkwEwYHKoZIzj0CAQYIKoZIzj0D
-----END CERTIFICATE-----
";

fn fixed() -> UserData<'static> {
    UserData {
        agent_url: "https://10.0.2.2:7701",
        agent_binary_url: "http://10.0.2.2:7702/bootstrap/v1/kiln-agent",
        ca_pem: CA,
        agent_sha256: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        target: "0191e5b4-7c3a-7d2e-9b1f-3a4c5d6e7f80".parse().unwrap(),
        token: "tok_3q2-example",
        fetch_timeout_secs: DEFAULT_FETCH_TIMEOUT_SECS,
        ec2_identity: false,
    }
}

/// Values that would break out of careless quoting.
const NASTY: &[&str] = &[
    "it's",
    "'",
    "''\\''",
    "$(touch /tmp/kiln-pwned)",
    "`touch /tmp/kiln-pwned`",
    "${HOME}$HOME\"\\",
    "line one\nline two\n",
    "KILN_CA_EOF\n@@TOKEN@@ * ? [a] ~ ; & | < > # !",
];

// Blessed with UPDATE_EXPECT=1; a diff here means the user-data changed.
#[test]
fn renders_the_golden_script() {
    expect_test::expect_file!["../tests/golden/user-data.sh"].assert_eq(&fixed().render().unwrap());
}

#[test]
fn template_has_no_unknown_placeholder() {
    let rendered = fixed().render().unwrap();
    assert!(!rendered.contains("@@"), "{rendered}");
}

#[test]
fn substitution_is_single_pass() {
    let out = template::substitute("a @@X@@ b @@Y@@ @@nope@@ @@", |name| match name {
        "X" => Some("@@Y@@".to_owned()),
        "Y" => Some("y".to_owned()),
        _ => None,
    });
    assert_eq!(out, "a @@Y@@ b y @@nope@@ @@");
}

// A quoted word reads back as exactly the value, whatever it holds.
#[test]
fn quoting_round_trips_through_sh() {
    for value in NASTY {
        let out =
            Command::new("sh").arg("-c").arg(format!("v={}\nprintf %s \"$v\"", shell::quote(value))).output().unwrap();
        assert!(out.status.success(), "{value:?}: {out:?}");
        assert_eq!(String::from_utf8(out.stdout).unwrap(), *value);
    }
}

// The rendered script parses, and its assignments give back the exact token.
#[test]
fn rendered_token_cannot_break_out() {
    for token in NASTY {
        let script = UserData { token, ..fixed() }.render().unwrap();
        let syntax = Command::new("sh").arg("-n").arg("-c").arg(&script).output().unwrap();
        assert!(syntax.status.success(), "{token:?}: {syntax:?}");

        let assignments = &script[..script.find("\nfetch_timeout_secs=").unwrap()];
        let out = Command::new("sh").arg("-c").arg(format!("{assignments}\nprintf %s \"$token\"")).output().unwrap();
        assert!(out.status.success(), "{token:?}: {out:?}");
        assert_eq!(String::from_utf8(out.stdout).unwrap(), *token);
    }
}

#[test]
fn ca_pem_is_normalized() {
    let crlf = CA.replace('\n', "\r\n");
    let padded = format!("\n\n{crlf}\n\n");
    let script = UserData { ca_pem: &padded, ..fixed() }.render().unwrap();
    assert_eq!(script, fixed().render().unwrap());
}

fn error_of(data: UserData<'_>) -> String {
    data.render().unwrap_err().to_string()
}

#[test]
fn rejects_bad_sha256() {
    let upper = "0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF";
    for bad in ["", "abc", upper, &"g".repeat(64), &"a".repeat(65)] {
        let err = UserData { agent_sha256: bad, ..fixed() }.render().unwrap_err();
        assert_eq!(err, RenderError::BadSha256 { value: bad.to_owned() });
    }
    assert_eq!(
        error_of(UserData { agent_sha256: "abc", ..fixed() }),
        "the agent sha256 must be 64 lowercase hex characters, got \"abc\""
    );
}

#[test]
fn rejects_a_pem_that_is_not_one_certificate() {
    let key = CA.replace("CERTIFICATE", "PRIVATE KEY");
    let two = format!("{CA}{CA}");
    let not_base64 = CA.replace("MIIB", "MI$B");
    let cases = [
        ("", "it is empty"),
        ("hello", "it does not start with -----BEGIN CERTIFICATE-----"),
        (key.as_str(), "it does not start with -----BEGIN CERTIFICATE-----"),
        ("-----BEGIN CERTIFICATE-----\nMIIB\n", "it does not end with -----END CERTIFICATE-----"),
        ("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----", "it does not end with -----END CERTIFICATE-----"),
        (two.as_str(), "it holds more than one PEM block"),
        (not_base64.as_str(), "its body is not base64"),
    ];
    for (pem, reason) in cases {
        let err = UserData { ca_pem: pem, ..fixed() }.render().unwrap_err();
        assert_eq!(err, RenderError::BadCaPem { reason }, "{pem:?}");
    }
    assert_eq!(
        error_of(UserData { ca_pem: "hello", ..fixed() }),
        "the CA certificate must be a single PEM CERTIFICATE block, but it does not start with -----BEGIN CERTIFICATE-----"
    );
}

#[test]
fn rejects_nul_bytes() {
    assert_eq!(
        UserData { token: "a\0b", ..fixed() }.render().unwrap_err(),
        RenderError::NulByte { field: "enrollment token" }
    );
    let ca = CA.replace("MIIB", "MI\0B");
    assert_eq!(
        UserData { ca_pem: &ca, ..fixed() }.render().unwrap_err(),
        RenderError::NulByte { field: "CA certificate" }
    );
    assert_eq!(
        error_of(UserData { agent_url: "https://a\0", ..fixed() }),
        "the agent URL contains a NUL byte, which a shell script cannot carry"
    );
}

#[test]
fn rejects_bad_urls() {
    assert_eq!(
        error_of(UserData { agent_url: "http://10.0.2.2:7701", ..fixed() }),
        "the agent URL \"http://10.0.2.2:7701\" is not usable: it must start with https://"
    );
    assert_eq!(
        error_of(UserData { agent_binary_url: "ftp://x/kiln-agent", ..fixed() }),
        "the agent binary URL \"ftp://x/kiln-agent\" is not usable: it must start with http:// or https://"
    );
    assert_eq!(
        error_of(UserData { agent_url: "https:///x", ..fixed() }),
        "the agent URL \"https:///x\" is not usable: it has no host"
    );
    assert_eq!(
        error_of(UserData { agent_binary_url: "http://x/a b", ..fixed() }),
        "the agent binary URL \"http://x/a b\" is not usable: it contains whitespace or control characters"
    );
}

#[test]
fn rejects_empty_token_and_zero_timeout() {
    assert_eq!(UserData { token: "", ..fixed() }.render().unwrap_err(), RenderError::EmptyToken);
    assert_eq!(UserData { fetch_timeout_secs: 0, ..fixed() }.render().unwrap_err(), RenderError::ZeroFetchTimeout);
}
