//! The fake OpenStack cloud on its own, without kiln's coordinator: Keystone,
//! Nova and Glance over plain reqwest, servers booting as QEMU VMs that fetch
//! their user-data from the OpenStack metadata service.

use std::time::{Duration, Instant};

use base64::Engine;
use kiln_tests::openstack::{DEFAULT_NETWORK, FakeConfig, FakeOpenStack, Op};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The longest a server may take to boot, run its user-data and power off (TCG).
const BOOT_LIMIT: Duration = Duration::from_secs(120);
/// The longest a createImage may take to become active.
const IMAGE_LIMIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "kiln-secret";

struct Cloud {
    fake: FakeOpenStack,
    http: reqwest::Client,
    token: String,
    compute: String,
    glance: String,
}

impl Cloud {
    async fn start(config: FakeConfig) -> anyhow::Result<Self> {
        let fake = FakeOpenStack::start(config).await?;
        fake.add_image("tiny", kiln_tests::tiny_image())?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let mut cloud = Self { fake, http, token: String::new(), compute: String::new(), glance: String::new() };
        let (status, token, body) = cloud.auth(PASSWORD).await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        cloud.token = token.unwrap();
        cloud.compute = endpoint(&body, "compute").unwrap();
        cloud.glance = endpoint(&body, "image").unwrap_or_default();
        Ok(cloud)
    }

    /// Keystone password auth scoped to project kiln: (status, X-Subject-Token, body).
    async fn auth(&self, password: &str) -> anyhow::Result<(StatusCode, Option<String>, Value)> {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": "kiln", "domain": {"name": "Default"}, "password": password,
            }}},
            "scope": {"project": {"name": "kiln", "domain": {"name": "Default"}}},
        }});
        let resp = self.http.post(format!("{}/auth/tokens", self.fake.auth_url())).json(&body).send().await?;
        let token = resp.headers().get("x-subject-token").map(|t| t.to_str().unwrap().to_owned());
        Ok((resp.status(), token, resp.json().await?))
    }

    /// A Nova call at microversion 2.`minor`: (status, body or Null).
    async fn nova(
        &self,
        minor: u32,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let url = format!("{}{path}", self.compute);
        let mut req = self
            .http
            .request(method.parse()?, url)
            .header("X-Auth-Token", &self.token)
            .header("OpenStack-API-Version", format!("compute 2.{minor}"));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        if status.is_success() {
            let echoed = resp.headers().get("openstack-api-version").map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(echoed, Some(format!("compute 2.{minor}")), "Nova echoes the microversion");
        }
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn glance(&self, method: &str, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        let url = format!("{}/v2{path}", self.glance);
        let resp = self.http.request(method.parse()?, url).header("X-Auth-Token", &self.token).send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Creates a server of image `image` running `script`; its id.
    async fn create(&self, name: &str, image: &str, script: &str) -> anyhow::Result<String> {
        let (status, body) = self.nova(47, "POST", "/servers", Some(server(name, image, script))).await?;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert!(body["server"]["adminPass"].is_string(), "{body}");
        Ok(body["server"]["id"].as_str().unwrap().to_owned())
    }

    async fn status(&self, id: &str) -> anyhow::Result<String> {
        let (status, body) = self.nova(47, "GET", &format!("/servers/{id}"), None).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        Ok(body["server"]["status"].as_str().unwrap().to_owned())
    }

    /// Polls the server (bounded) until it is `want`; the statuses seen on the way.
    async fn wait_status(&self, id: &str, want: &str) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + BOOT_LIMIT;
        let mut seen: Vec<String> = Vec::new();
        loop {
            let status = self.status(id).await?;
            if seen.last() != Some(&status) {
                seen.push(status.clone());
            }
            if status == want {
                return Ok(seen);
            }
            if Instant::now() > deadline {
                let console = self.fake.console(id).unwrap_or_default();
                anyhow::bail!("{id} went {seen:?}, not {want}, within {BOOT_LIMIT:?}; console:\n{console}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Polls Glance (bounded) until the image is active; the statuses seen on the way.
    async fn wait_image(&self, id: &str) -> anyhow::Result<(Vec<String>, Value)> {
        let deadline = Instant::now() + IMAGE_LIMIT;
        let mut seen: Vec<String> = Vec::new();
        loop {
            let (code, body) = self.glance("GET", &format!("/images/{id}")).await?;
            assert_eq!(code, StatusCode::OK, "{body}");
            let status = body["status"].as_str().unwrap().to_owned();
            if seen.last() != Some(&status) {
                seen.push(status.clone());
            }
            if status == "active" || status == "killed" || Instant::now() > deadline {
                return Ok((seen, body));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn endpoint(token: &Value, kind: &str) -> Option<String> {
    let service = token["token"]["catalog"].as_array()?.iter().find(|s| s["type"] == kind)?;
    let public = service["endpoints"].as_array()?.iter().find(|e| e["interface"] == "public")?;
    Some(public["url"].as_str()?.to_owned())
}

/// A createServer body: flavor m1.small (id 2), the default network, `script` as user_data.
fn server(name: &str, image: &str, script: &str) -> Value {
    json!({"server": {
        "name": name,
        "imageRef": image,
        "flavorRef": "2",
        "networks": [{"uuid": DEFAULT_NETWORK}],
        "security_groups": [{"name": "default"}],
        "metadata": {"kiln:target": name},
        "user_data": base64::engine::general_purpose::STANDARD.encode(script),
    }})
}

// A server boots as a VM that runs its user-data from the OpenStack metadata service; createImage goes
// queued → saving → active and the image boots with the first disk's changes; tokens expire; nothing lingers.
#[tokio::test]
async fn openstack_bed_boots_servers_and_snapshots_them() -> anyhow::Result<()> {
    let config = FakeConfig { image_saving: Duration::from_secs(2), ..FakeConfig::default() };
    let cloud = Cloud::start(config).await?;

    // Keystone: a wrong password is 401 with Keystone's body; the catalog points at this fake.
    let (status, token, body) = cloud.auth("wrong").await?;
    assert_eq!((status, token), (StatusCode::UNAUTHORIZED, None));
    assert_eq!(body["error"]["title"], "Unauthorized", "{body}");
    assert_eq!(cloud.compute, format!("{}/compute/v2.1", cloud.fake.url()));
    assert_eq!(cloud.glance, format!("{}/image", cloud.fake.url()));

    // Nova validates like Nova: networks required from 2.37, flavors by id, user_data base64.
    let mut no_networks = server("bad", "tiny", "#!/bin/sh\n");
    no_networks["server"].as_object_mut().unwrap().remove("networks");
    let (status, body) = cloud.nova(47, "POST", "/servers", Some(no_networks)).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["badRequest"]["message"].as_str().unwrap().contains("'networks' is a required property"), "{body}");
    let mut bad_flavor = server("bad", "tiny", "#!/bin/sh\n");
    bad_flavor["server"]["flavorRef"] = json!("m1.small");
    let (status, body) = cloud.nova(47, "POST", "/servers", Some(bad_flavor)).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["badRequest"]["message"], "Flavor m1.small could not be found.");
    let mut bad_data = server("bad", "tiny", "#!/bin/sh\n");
    bad_data["server"]["user_data"] = json!("not base64!");
    assert_eq!(cloud.nova(47, "POST", "/servers", Some(bad_data)).await?.0, StatusCode::BAD_REQUEST);
    let (status, body) = cloud.nova(47, "POST", "/servers", Some(server("bad", "nope", "#!/bin/sh\n"))).await?;
    assert_eq!(
        (status, body["badRequest"]["message"].as_str()),
        (StatusCode::BAD_REQUEST, Some("Image nope could not be found."))
    );

    // Boot: BUILD first, then SHUTOFF once the user-data powered the VM off.
    let script = "#!/bin/sh\necho KILN-OPENSTACK-OK\necho proof >/etc/kiln-proof\nsync\npoweroff -f\n";
    let started = Instant::now();
    let id = cloud.create("kiln-build-1", "tiny", script).await?;
    let seen = cloud.wait_status(&id, "SHUTOFF").await?;
    println!("create to SHUTOFF under TCG: {:?}", started.elapsed());
    assert_eq!(seen.first().map(String::as_str), Some("BUILD"), "{seen:?}");
    let console = cloud.fake.console(&id).unwrap();
    assert!(console.contains("\nKILN-OPENSTACK-OK\n"), "the user-data ran:\n{console}");
    assert!(console.contains("user-data from openstack"), "found through the OpenStack source:\n{console}");
    let asked = cloud.fake.metadata_requests(&id);
    assert!(asked.contains(&"PUT /latest/api/token 404".to_owned()), "EC2 paths are 404: {asked:?}");
    assert!(asked.contains(&"GET /openstack/latest/user_data 200".to_owned()), "{asked:?}");
    let (status, body) = cloud
        .nova(47, "POST", &format!("/servers/{id}/action"), Some(json!({"os-getConsoleOutput": {"length": 50}})))
        .await?;
    assert_eq!(status, StatusCode::OK);
    let output = body["output"].as_str().unwrap();
    assert!(output.contains("KILN-OPENSTACK-OK") && output.lines().count() <= 50, "{output}");

    // An injected fault answers once, then Nova is itself again.
    let fault = json!({"computeFault": {"code": 500, "message": "Unexpected API Error."}});
    cloud.fake.fail_next(Op::GetServer, 1, 500, fault.clone());
    assert_eq!(
        cloud.nova(47, "GET", &format!("/servers/{id}"), None).await?,
        (StatusCode::INTERNAL_SERVER_ERROR, fault)
    );
    assert_eq!(cloud.status(&id).await?, "SHUTOFF");

    // createImage (2.45+: image_id in the body): queued, saving, then active with the given properties.
    let create_image = json!({"createImage": {"name": "kiln-out", "metadata": {"kiln:build": "b-1"}}});
    let (status, body) = cloud.nova(47, "POST", &format!("/servers/{id}/action"), Some(create_image)).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let image = body["image_id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let (seen, body) = cloud.wait_image(&image).await?;
    println!("createImage to active (image_saving 2 s): {:?}", started.elapsed());
    assert_eq!(seen, ["queued", "saving", "active"], "{body}");
    assert_eq!((body["kiln:build"].as_str(), body["disk_format"].as_str()), (Some("b-1"), Some("qcow2")));
    assert!(body["size"].as_u64().unwrap() > 0 && body["checksum"].as_str().unwrap().len() == 32, "{body}");
    let (status, body) = cloud.glance("GET", "/images?name=kiln-out").await?;
    assert_eq!((status, body["images"][0]["id"].as_str()), (StatusCode::OK, Some(image.as_str())));

    // The image boots with the kernel of its lineage and the first server's file on its disk.
    let child =
        cloud.create("kiln-child", &image, "#!/bin/sh\necho \"found $(cat /etc/kiln-proof)\"\npoweroff -f\n").await?;
    cloud.wait_status(&child, "SHUTOFF").await?;
    let console = cloud.fake.console(&child).unwrap();
    assert!(console.contains("\nfound proof\n"), "the first server's file is on its image:\n{console}");

    // Expired tokens are 401 everywhere.
    cloud.fake.expire_tokens();
    let (status, body) = cloud.nova(47, "GET", &format!("/servers/{id}"), None).await?;
    assert_eq!((status, body["error"]["code"].as_u64()), (StatusCode::UNAUTHORIZED, Some(401)));
    assert_eq!(cloud.glance("GET", &format!("/images/{image}")).await?.0, StatusCode::UNAUTHORIZED);

    // Clean up with a fresh token: deleted things are 404, no VM lingers.
    let (_, token, _) = cloud.auth(PASSWORD).await?;
    let cloud = Cloud { token: token.unwrap(), ..cloud };
    for server in [&id, &child] {
        assert_eq!(cloud.nova(47, "DELETE", &format!("/servers/{server}"), None).await?.0, StatusCode::NO_CONTENT);
        let (status, body) = cloud.nova(47, "GET", &format!("/servers/{server}"), None).await?;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["itemNotFound"]["message"], format!("Instance {server} could not be found."));
    }
    let file = cloud.fake.images().into_iter().find(|i| i.id == image).unwrap().file.unwrap();
    assert_eq!(cloud.glance("DELETE", &format!("/images/{image}")).await?.0, StatusCode::NO_CONTENT);
    assert_eq!(cloud.glance("GET", &format!("/images/{image}")).await?.0, StatusCode::NOT_FOUND);
    assert!(!file.exists(), "the image's file is gone");
    cloud.fake.wait_no_vms(Duration::from_secs(10)).await?;
    assert_eq!(cloud.fake.live_vms(), 0);
    assert_eq!(cloud.fake.requests_with_body_containing(PASSWORD), 2, "the password went only to Keystone, twice");
    assert_eq!(cloud.fake.tokens_issued(), 2);
    let calls = cloud.fake.calls();
    assert_eq!((calls["Auth"], calls["CreateImage"], calls["DeleteServer"]), (3, 1, 2), "{calls:?}");
    Ok(())
}

// A running server: createImage is refused until os-stop ends its VM; quota, unknown networks, the name
// filter, old-microversion createImage (Location header) and a catalog without Glance behave like OpenStack.
#[tokio::test]
async fn openstack_bed_stops_servers_and_rejects_like_nova() -> anyhow::Result<()> {
    let config = FakeConfig { max_servers: 1, omit_service: Some("image"), ..FakeConfig::default() };
    let cloud = Cloud::start(config).await?;
    assert!(cloud.glance.is_empty(), "no image service in the catalog");
    let other_project = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": "kiln", "domain": {"id": "default"}, "password": PASSWORD,
        }}},
        "scope": {"project": {"name": "elsewhere", "domain": {"name": "Default"}}},
    }});
    let resp = cloud.http.post(format!("{}/auth/tokens", cloud.fake.auth_url())).json(&other_project).send().await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "an unknown project is 401");
    let resp = cloud.http.get(format!("{}/flavors/detail", cloud.compute)).send().await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "no token is 401");
    let (_, flavors) = cloud.nova(47, "GET", "/flavors/detail", None).await?;
    assert!(flavors["flavors"].as_array().unwrap().iter().any(|f| f["name"] == "m1.small" && f["id"] == "2"));
    let mut unknown_net = server("bad", "tiny", "#!/bin/sh\n");
    unknown_net["server"]["networks"] = json!([{"uuid": "00000000-0000-4000-8000-000000000000"}]);
    let (status, body) = cloud.nova(47, "POST", "/servers", Some(unknown_net)).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["badRequest"]["message"], "Network 00000000-0000-4000-8000-000000000000 could not be found.");

    let id = cloud.create("kiln-sleeper-7", "tiny", "#!/bin/sh\necho KILN-SLEEPING\nsleep 600\n").await?;
    let (status, body) = cloud.nova(47, "POST", "/servers", Some(server("second", "tiny", "#!/bin/sh\n"))).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body["forbidden"]["message"],
        "Quota exceeded for instances: Requested 1, but already used 1 of 1 instances"
    );
    cloud.wait_status(&id, "ACTIVE").await?;
    cloud
        .fake
        .wait_until(BOOT_LIMIT, "the sleeper ran", |f| f.console(&id).is_some_and(|c| c.contains("\nKILN-SLEEPING\n")))
        .await?;

    let (status, body) = cloud.nova(47, "GET", "/servers/detail?name=sleeper", None).await?;
    assert_eq!((status, body["servers"][0]["id"].as_str()), (StatusCode::OK, Some(id.as_str())));
    assert_eq!(cloud.nova(47, "GET", "/servers?name=nobody", None).await?.1["servers"], json!([]));

    let action = format!("/servers/{id}/action");
    let (status, body) = cloud.nova(44, "POST", &action, Some(json!({"createImage": {"name": "early"}}))).await?;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        body["conflictingRequest"]["message"],
        format!("Cannot 'createImage' instance {id} while it is in vm_state active")
    );
    assert_eq!(cloud.nova(47, "POST", &action, Some(json!({"os-stop": null}))).await?.0, StatusCode::ACCEPTED);
    cloud.wait_status(&id, "SHUTOFF").await?;
    assert_eq!(cloud.fake.live_vms(), 0, "os-stop ended the VM");
    assert_eq!(cloud.nova(47, "POST", &action, Some(json!({"os-stop": null}))).await?.0, StatusCode::CONFLICT);

    // Below 2.45 createImage answers with a Location header and no body.
    let resp = cloud
        .http
        .post(format!("{}{action}", cloud.compute))
        .header("X-Auth-Token", &cloud.token)
        .header("X-OpenStack-Nova-API-Version", "2.44")
        .json(&json!({"createImage": {"name": "old-style"}}))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = resp.headers()["location"].to_str()?.to_owned();
    assert_eq!(resp.text().await?, "");
    let image = location.rsplit('/').next().unwrap().to_owned();
    cloud
        .fake
        .wait_until(IMAGE_LIMIT, "the image is active", |f| {
            f.images().iter().any(|i| i.id == image && i.status == "active")
        })
        .await?;
    assert_eq!(cloud.fake.images().iter().find(|i| i.id == image).unwrap().properties["instance_uuid"], id);
    assert_eq!(cloud.nova(47, "DELETE", &format!("/servers/{id}"), None).await?.0, StatusCode::NO_CONTENT);
    assert!(cloud.fake.servers().iter().all(|s| s.deleted));
    Ok(())
}
