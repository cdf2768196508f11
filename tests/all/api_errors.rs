//! Bad input gets a 4xx JSON error that says what to fix, never a 500.

use kiln_protocol::error::ErrorBody;
use kiln_tests::bed::Bed;
use reqwest::{Method, StatusCode};
use serde_json::json;

/// Sends `body` (JSON, or raw text when it is a string) and checks the status
/// and that the error message contains `needle`.
async fn check(bed: &Bed, method: Method, path: &str, body: Option<serde_json::Value>, status: u16, needle: &str) {
    let mut req = bed.client.request(method.clone(), path);
    match body {
        Some(serde_json::Value::String(raw)) => req = req.header("content-type", "application/json").body(raw),
        Some(v) => req = req.json(&v),
        None => {}
    }
    let resp = req.send().await.unwrap();
    let got = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(got, StatusCode::from_u16(status).unwrap(), "{method} {path}: {text}");
    let err: ErrorBody =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not a JSON error: {text}"));
    assert!(err.message.contains(needle), "{method} {path}: {:?} lacks {needle:?}", err.message);
}

fn generator(name: &str, script: &str) -> serde_json::Value {
    json!({"name": name, "script": script, "targets": {"local": {"base_image": "process"}}})
}

// One case per line: the request and the error a user gets.
#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let ok: serde_json::Value = bed.client.post("/v1/generators", &generator("good", "echo hi")).await.unwrap();
    assert_eq!(ok["number"], 1);
    let mut no_cloud = generator("nocloud", "echo hi");
    no_cloud["targets"] = json!({"elsewhere": {"base_image": "process"}});
    let _: serde_json::Value = bed.client.post("/v1/generators", &no_cloud).await.unwrap();
    let mut missing = generator("missing-image", "echo hi");
    missing["targets"]["local"]["base_image"] = json!("missing");
    let _: serde_json::Value = bed.client.post("/v1/generators", &missing).await.unwrap();

    let big = "x".repeat(1024 * 1024 + 1);
    let cases: Vec<(Method, &str, Option<serde_json::Value>, u16, &str)> = vec![
        (Method::POST, "/v1/generators", Some(generator("empty", "")), 400, "the script is empty"),
        (Method::POST, "/v1/generators", Some(generator("big", &big)), 400, "the limit is 1048576 bytes"),
        (Method::POST, "/v1/generators", Some(json!("{not json")), 400, "not valid JSON"),
        (Method::POST, "/v1/generators", Some(generator("Bad Name", "echo")), 400, "invalid name"),
        (Method::POST, "/v1/generators", Some(json!({"name": "x", "targets": {}})), 400, "missing field `script`"),
        (
            Method::POST,
            "/v1/generators",
            Some(json!({"name": "x", "script": "echo", "targets": {}, "colour": 1})),
            400,
            "unknown field `colour`",
        ),
        (
            Method::POST,
            "/v1/generators",
            Some(json!({"name": "x", "script": "echo", "targets": {}, "timeout_secs": 0})),
            400,
            "timeout_secs is 0",
        ),
        (Method::POST, "/v1/generators", Some(generator("good", "echo again")), 409, "already exists"),
        (Method::PUT, "/v1/generators/nope", Some(generator("nope", "echo")), 404, "generator nope not found"),
        (Method::PUT, "/v1/generators/good", Some(generator("other", "echo")), 400, "cannot be renamed"),
        (Method::GET, "/v1/generators/nope", None, 404, "generator nope does not exist"),
        (Method::GET, "/v1/generators/good/revisions/7", None, 404, "has no revision 7"),
        (Method::POST, "/v1/clouds", Some(json!({"name": "local", "kind": "qemu"})), 409, "cloud local already exists"),
        (Method::POST, "/v1/clouds", Some(json!({"name": "x", "kind": "vmware"})), 400, "unknown variant `vmware`"),
        (Method::GET, "/v1/clouds/nope", None, 404, "cloud nope does not exist"),
        (Method::DELETE, "/v1/clouds/nope", None, 404, "cloud nope does not exist"),
        (Method::POST, "/v1/builds", Some(json!({"generator": "nope"})), 404, "generator nope does not exist"),
        (Method::POST, "/v1/builds", Some(json!({"generator": "good", "revision": 9})), 404, "has no revision 9"),
        (
            Method::POST,
            "/v1/builds",
            Some(json!({"generator": "good", "clouds": ["other"]})),
            404,
            "has no target for cloud other",
        ),
        (Method::POST, "/v1/builds", Some(json!({"generator": "nocloud"})), 404, "cloud elsewhere does not exist"),
        (
            Method::POST,
            "/v1/builds",
            Some(json!({"generator": "missing-image"})),
            400,
            "ImageNotFound: base image missing does not exist",
        ),
        (Method::GET, "/v1/builds/not-a-uuid", None, 400, "bad path"),
        (Method::GET, "/v1/builds/0190a5d2-0000-7000-8000-000000000000", None, 404, "does not exist"),
        (Method::POST, "/v1/builds/0190a5d2-0000-7000-8000-000000000000/cancel", None, 404, "does not exist"),
        (Method::GET, "/v1/targets/0190a5d2-0000-7000-8000-000000000000/log", None, 404, "does not exist"),
        (Method::GET, "/v1/builds?limit=many", None, 400, "bad query"),
        (Method::GET, "/v1/builds?limit=0", None, 400, "give a number from 1 to 1000"),
        (Method::GET, "/v1/builds/0", None, 400, "bad path"),
        (Method::GET, "/v1/generators/good/revisions/99999999999", None, 400, "bad path"),
        (
            Method::GET,
            "/v1/targets/0190a5d2-0000-7000-8000-000000000000/log?offset=18446744073709551616",
            None,
            400,
            "bad query",
        ),
        (Method::GET, "/v1/builds?limit=1001", None, 400, "give a number from 1 to 1000"),
        (Method::GET, "/v1/nowhere", None, 404, "there is no route GET \"/v1/nowhere\""),
        (Method::GET, "/v1/builds/", None, 404, "there is no route"),
        (Method::PATCH, "/v1/builds", None, 405, "does not take PATCH"),
        (
            Method::POST,
            "/v1/generators",
            Some(json!(r#"{"name":"d","script":"echo","env":{"A":"1","A":"2"},"targets":{}}"#)),
            400,
            "the key \"A\" is given twice",
        ),
        (
            Method::POST,
            "/v1/generators",
            Some(json!(
                r#"{"name":"d","script":"echo","targets":{"local":{"base_image":"a"},"local":{"base_image":"b"}}}"#
            )),
            400,
            "the key \"local\" is given twice",
        ),
        (
            Method::POST,
            "/v1/generators",
            Some(json!({"name": "n", "script": "echo", "env": {"A": "x\u{0}y"}, "targets": {}})),
            400,
            "NUL byte",
        ),
        (
            Method::POST,
            "/v1/clouds",
            Some(json!({"name": "b", "kind": "qemu", "options": {"bogus": "1"}})),
            400,
            "they know memory_mib",
        ),
        (
            Method::POST,
            "/v1/clouds",
            Some(json!({"name": "b", "kind": "qemu", "endpoint": "not a url"})),
            400,
            "neither a region nor an endpoint",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        check(&bed, method, path, body, status, needle).await;
    }

    // A wrong method keeps its Allow header on every listener, and the JSON body.
    let resp = bed.client.request(Method::DELETE, "/v1/builds").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["allow"], "GET,HEAD,POST");
    assert!(resp.json::<ErrorBody>().await.unwrap().message.contains("does not take DELETE"));
    let anonymous = bed.agent_client_without_certificate();
    for (method, path, status) in [
        (Method::GET, "/nowhere".to_string(), StatusCode::NOT_FOUND),
        (Method::DELETE, kiln_protocol::agent::paths::ENROLL.to_string(), StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let resp = anonymous.request(method, format!("{}{path}", bed.agent_url())).send().await.unwrap();
        assert_eq!(resp.status(), status, "agent listener {path}");
        let err: ErrorBody = resp.json().await.unwrap();
        assert!(!err.message.is_empty());
    }

    // A 1 MB name is quoted by its first 200 characters only.
    let resp = bed
        .client
        .request(Method::POST, "/v1/generators")
        .json(&generator(&"X".repeat(1 << 20), "echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let err: ErrorBody = resp.json().await.unwrap();
    assert!(err.message.len() < 1000 && err.message.contains("bytes in all"), "{}", err.message);

    // A log offset past the end is 416, not a failed seek.
    let build = bed.start_build("good").await;
    let target = build.targets[0].id;
    for path in [
        format!("/v1/targets/{target}/log?offset={}", u64::MAX),
        format!("/v1/targets/{target}/log/follow?offset={}", u64::MAX),
    ] {
        let resp = bed.client.request(Method::GET, &path).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{path}");
        let err: ErrorBody = resp.json().await.unwrap();
        assert!(err.message.contains("past the end of the log"), "{}", err.message);
    }
    bed.wait(&build).await;

    // A body that is not JSON at all, and one far over any limit.
    let resp = bed.client.request(Method::POST, "/v1/generators").body("name=x").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let huge = format!("{{\"name\":\"h\",\"script\":\"{}\",\"targets\":{{}}}}", "x".repeat(3 * 1024 * 1024));
    let resp = bed
        .client
        .request(Method::POST, "/v1/generators")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let err: ErrorBody = resp.json().await.unwrap();
    assert!(err.message.contains("too large"), "{}", err.message);

    // Nothing the bad requests did left an instance behind.
    assert!(bed.provider.live_instances().is_empty());
}
