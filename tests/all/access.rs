//! Who may use the public API: tokens with roles, the page's session and its
//! CSRF token, the Host allowlist, and TLS off loopback.

use std::os::unix::fs::PermissionsExt;

use kiln_coordinator::cli::Client;
use kiln_coordinator::{Config, Listeners, Providers, Server};
use kiln_protocol::access::{ApiToken, CreatedToken, Role, Session, TokenRequest};
use kiln_protocol::error::{ErrorBody, ErrorCode};
use kiln_tests::bed::Bed;
use reqwest::{Method, StatusCode};
use serde_json::json;

/// Every operation of the checked-in OpenAPI document, with its path's
/// parameters filled in, and whether the document marks it open.
fn operations(build: &str, target: &str) -> Vec<(Method, String, bool)> {
    let doc: serde_json::Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Ok(method) = method.to_uppercase().parse::<Method>() else { continue };
            let open = op["security"].as_array().is_some_and(|s| s.iter().all(|r| r.as_object().unwrap().is_empty()));
            let filled = path
                .replace("/v1/builds/{id}", &format!("/v1/builds/{build}"))
                .replace("{id}", target)
                .replace("{name}", "some-name")
                .replace("{number}", "1");
            ops.push((method, filled, open));
        }
    }
    assert!(ops.len() >= 20, "the document lists the operations: {ops:?}");
    ops
}

async fn error_of(resp: reqwest::Response) -> (StatusCode, ErrorBody) {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not a JSON error ({status}): {text}")))
}

// Without a token every route but the open ones answers 401 with a JSON error
// and a WWW-Authenticate challenge, before looking at the body; a wrong token too.
#[tokio::test]
async fn every_route_needs_a_token() {
    let bed = Bed::start().await;
    let anonymous = bed.anonymous();
    let forged = bed.anonymous().with_token("kiln_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let ids = (kiln_protocol::BuildId::generate().to_string(), kiln_protocol::TargetId::generate().to_string());
    let mut open = Vec::new();
    for (method, path, is_open) in operations(&ids.0, &ids.1) {
        if is_open {
            open.push(format!("{method} {path}"));
            continue;
        }
        for client in [&anonymous, &forged] {
            let resp = client.request(method.clone(), &path).json(&json!({"junk": true})).send().await.unwrap();
            assert!(resp.headers().get("www-authenticate").is_some(), "{method} {path}: no challenge");
            let (status, err) = error_of(resp).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {err:?}");
            assert_eq!(err.code, ErrorCode::Unauthorized);
        }
    }
    open.sort();
    assert_eq!(open, ["DELETE /v1/session", "GET /v1/health", "POST /v1/session"]);
    let health = anonymous.request(Method::GET, "/v1/health").send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let doc = anonymous.request(Method::GET, "/v1/openapi.json").send().await.unwrap();
    assert_eq!(doc.status(), StatusCode::OK, "the OpenAPI document is open");
}

// A viewer reads everything and changes nothing (403 on every write); a builder
// saves generators and builds but cannot manage clouds, images or tokens.
#[tokio::test]
async fn roles_limit_what_a_token_may_do() {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let _ = bed.create_generator(&Bed::spec("seen", "echo hi", &["local"])).await;
    let viewer = bed.client_with_role(Role::Viewer).await;
    let builder = bed.client_with_role(Role::Builder).await;
    let ids = (kiln_protocol::BuildId::generate().to_string(), kiln_protocol::TargetId::generate().to_string());
    for (method, path, open) in operations(&ids.0, &ids.1) {
        if open {
            continue;
        }
        let resp = viewer.request(method.clone(), &path).json(&json!({})).send().await.unwrap();
        let status = resp.status();
        let write = !matches!(method, Method::GET | Method::HEAD);
        // Tokens, and the janitor's list of every cloud's resources, are admin's.
        let admin_only = path.starts_with("/v1/tokens") || path.starts_with("/v1/janitor");
        if write || admin_only {
            let (status, err) = error_of(resp).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "viewer {method} {path}: {err:?}");
            assert!(err.message.contains("role"), "{err:?}");
        } else {
            assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                "viewer {method} {path}: {status}"
            );
        }
    }
    let listed: Vec<serde_json::Value> = viewer.get("/v1/generators").await.unwrap();
    assert_eq!(listed.len(), 1);

    let revision: serde_json::Value =
        builder.post("/v1/generators", &Bed::spec("built", "echo b", &["local"])).await.unwrap();
    assert_eq!(revision["number"], 1);
    let build: kiln_protocol::api::Build =
        builder.post("/v1/builds", &json!({"generator": "built"})).await.expect("a builder starts builds");
    let _: kiln_protocol::api::Build = bed.wait(&build).await;
    for (method, path) in
        [(Method::POST, "/v1/clouds"), (Method::DELETE, "/v1/clouds/local"), (Method::GET, "/v1/tokens")]
    {
        let resp =
            builder.request(method.clone(), path).json(&json!({"name": "x", "kind": "qemu"})).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "builder {method} {path}");
    }
}

// Tokens are shown once, listed without their secrets, kept only hashed, and
// stop working when revoked; the first admin token is a 0600 file.
#[tokio::test]
async fn tokens_are_created_listed_and_revoked() {
    let bed = Bed::start().await;
    let file = bed.data_dir().join(kiln_coordinator::app::access::ADMIN_TOKEN_FILE);
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let created: CreatedToken =
        bed.client.post("/v1/tokens", &TokenRequest { name: "ci".into(), role: Role::Viewer }).await.unwrap();
    assert!(created.secret.starts_with("kiln_") && created.secret.len() >= 40, "{}", created.secret);
    let listed: Vec<ApiToken> = bed.client.get("/v1/tokens").await.unwrap();
    assert_eq!(
        listed.iter().map(|t| (t.name.as_str(), t.role)).collect::<Vec<_>>(),
        [("admin", Role::Admin), ("ci", Role::Viewer)]
    );
    let text = bed.client.request(Method::GET, "/v1/tokens").send().await.unwrap().text().await.unwrap();
    assert!(!text.contains(&created.secret), "a list shows a secret");

    let ci = bed.anonymous().with_token(&created.secret);
    let me: Session = ci.get("/v1/session").await.unwrap();
    assert_eq!((me.name.as_str(), me.role, me.csrf), ("ci", Role::Viewer, None));
    bed.client.delete(&format!("/v1/tokens/{}", created.token.id)).await.unwrap();
    let (status, _) = error_of(ci.request(Method::GET, "/v1/clouds").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a revoked token still works");
    let (status, err) =
        error_of(bed.client.request(Method::DELETE, "/v1/tokens/0123456789abcdef").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err:?}");
    // A token cannot revoke itself, so the API never locks out its last admin.
    let admin = listed.iter().find(|t| t.name == "admin").unwrap();
    let (status, err) =
        error_of(bed.client.request(Method::DELETE, &format!("/v1/tokens/{}", admin.id)).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{err:?}");
    assert!(err.message.contains("cannot revoke itself"), "{}", err.message);
    let still: Vec<ApiToken> = bed.client.get("/v1/tokens").await.unwrap();
    assert!(still.iter().any(|t| t.name == "admin"));
    for bad in [
        json!({"name": "", "role": "viewer"}),
        json!({"name": "x", "role": "root"}),
        json!({"name": "a\u{7}b", "role": "admin"}),
    ] {
        let (status, err) =
            error_of(bed.client.request(Method::POST, "/v1/tokens").json(&bad).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {err:?}");
    }

    // The store keeps no secret: the sled files do not contain it.
    let kept = bed
        .client
        .post::<_, CreatedToken>("/v1/tokens", &TokenRequest { name: "kept".into(), role: Role::Admin })
        .await
        .unwrap();
    bed.app().shutdown().await;
    let mut found = false;
    for entry in walk(&bed.data_dir().join("db")) {
        found |= memchr::memmem::find(&std::fs::read(entry).unwrap(), kept.secret.as_bytes()).is_some();
    }
    assert!(!found, "a token's secret is in the database");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

// The page's session: a login sets an HttpOnly, SameSite=Strict cookie; with it,
// reads work, and a change works only with the session's CSRF token; logout ends it.
#[tokio::test]
async fn a_session_cookie_needs_its_csrf_token_for_changes() {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", bed.client.base());
    let bad = http.post(url("/v1/session")).json(&json!({"token": "kiln_nope"})).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let login =
        http.post(url("/v1/session")).json(&json!({"token": bed.client.token().unwrap()})).send().await.unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let set = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    let session: Session = login.json().await.unwrap();
    let csrf = session.csrf.expect("a CSRF token");
    let cookie = set.split(';').next().unwrap().to_owned();

    let read = http.get(url("/v1/clouds")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    let spec = json!({"name": "viacookie", "script": "echo", "targets": {"local": {"base_image": "process"}}});
    let (status, err) =
        error_of(http.post(url("/v1/generators")).header("cookie", &cookie).json(&spec).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(err.message.contains("CSRF"), "{err:?}");
    let wrong = http.post(url("/v1/generators")).header("cookie", &cookie).header("x-kiln-csrf", "x").json(&spec);
    assert_eq!(wrong.send().await.unwrap().status(), StatusCode::FORBIDDEN);
    let right = http.post(url("/v1/generators")).header("cookie", &cookie).header("x-kiln-csrf", &csrf).json(&spec);
    assert_eq!(right.send().await.unwrap().status(), StatusCode::CREATED);

    let out = http.delete(url("/v1/session")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(out.status(), StatusCode::NO_CONTENT);
    assert!(out.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let after = http.get(url("/v1/clouds")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED, "the session outlived its logout");
}

// A request whose Host is not one of the coordinator's names (a DNS-rebound
// page) is refused, on the page and the API alike.
#[tokio::test]
async fn a_foreign_host_is_refused() {
    let bed = Bed::start().await;
    for path in ["/", "/v1/health", "/v1/clouds"] {
        let resp =
            bed.client.request(Method::GET, path).header("host", "rebind.attacker.example:7700").send().await.unwrap();
        let (status, err) = error_of(resp).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{path}");
        assert!(err.message.contains("--api-host"), "{err:?}");
        let ok = bed.client.request(Method::GET, path).header("host", "localhost").send().await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK, "{path} with Host localhost");
    }
}

// Off loopback the API refuses to start in plain HTTP unless told; with a
// certificate from kiln's CA it serves HTTPS that a client trusting the CA reaches.
#[tokio::test]
async fn off_loopback_the_api_needs_tls() {
    kiln_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let wide = "0.0.0.0:0".parse().unwrap();
    let local = "127.0.0.1:0".parse().unwrap();
    let mut config = Config::new(dir.path().join("data"));
    config.agent_binary = kiln_tests::agent_binary();
    let err = Server::start(config.clone(), Providers::new(), Listeners::bind(wide, local, local).await.unwrap())
        .await
        .expect_err("plain HTTP off loopback");
    assert!(err.to_string().contains("--tls-cert") && err.to_string().contains("--insecure-http"), "{err}");

    config.api_tls = Some(kiln_coordinator::config::ApiTls::FromCa);
    let server = Server::start(config.clone(), Providers::new(), Listeners::bind(wide, local, local).await.unwrap())
        .await
        .unwrap();
    let port = server.addrs().api.port();
    let ca = std::fs::read(config.data_dir.join("pki/ca.crt")).unwrap();
    let token = std::fs::read_to_string(config.data_dir.join(kiln_coordinator::app::access::ADMIN_TOKEN_FILE)).unwrap();
    let client = Client::with_ca(&format!("https://127.0.0.1:{port}"), &ca).unwrap().with_token(token);
    let clouds: Vec<serde_json::Value> = client.get("/v1/clouds").await.unwrap();
    assert!(clouds.is_empty());
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/v1/health")).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success(), "plain HTTP answered on the TLS port");
    server.stop().await;
}
