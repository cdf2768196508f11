//! Keystone v3 under `/identity/v3`: the version document and password
//! authentication (`POST /auth/tokens`), project-scoped or unscoped.

use jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

use super::Op;
use super::api::{self, json};
use super::http::{Request, Response};
use super::state::{Shared, Token, hex_id, micros};

pub(super) fn handle(shared: &Shared, req: &Request, rest: &[&str]) -> Response {
    match (req.method.as_str(), rest) {
        ("GET", []) => json(200, &version(shared)),
        ("POST", ["auth", "tokens"]) => issue(shared, req),
        _ => error(404, "Not Found", "The resource could not be found."),
    }
}

fn version(shared: &Shared) -> Value {
    json!({"version": {
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{}/identity/v3/", shared.base)}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}],
    }})
}

/// Keystone's error body.
fn error(code: u16, title: &str, message: &str) -> Response {
    json(code, &json!({"error": {"code": code, "title": title, "message": message}}))
}

fn bad_request(message: &str) -> Response {
    error(400, "Bad Request", message)
}

/// Keystone names the default domain `Default` with id `default`: ids here are lowercased names.
fn domain_id(name: &str) -> String {
    name.to_lowercase()
}

/// Whether `domain` (`{"id": ..}` or `{"name": ..}`) is the domain called `name`.
fn same_domain(domain: &Value, name: &str) -> bool {
    match (domain.get("id").and_then(Value::as_str), domain.get("name").and_then(Value::as_str)) {
        (Some(id), _) => id == domain_id(name),
        (None, Some(n)) => n == name,
        (None, None) => false,
    }
}

fn issue(shared: &Shared, req: &Request) -> Response {
    if let Some(resp) = api::call(shared, Op::Auth) {
        return resp;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return bad_request("The request you have made is malformed: the body is not JSON.");
    };
    let Some(identity) = body.pointer("/auth/identity") else {
        return bad_request("Invalid input for field 'auth': 'identity' is a required property");
    };
    let Some(methods) = identity.get("methods").and_then(Value::as_array) else {
        return bad_request("Invalid input for field 'identity': 'methods' is a required property");
    };
    if !methods.iter().any(|m| m == "password") {
        return api::unauthorized(shared);
    }
    let Some(user) = identity.pointer("/password/user") else {
        return bad_request("Invalid input for field 'password': 'user' is a required property");
    };
    let Some(password) = user.get("password").and_then(Value::as_str) else {
        return bad_request("Invalid input for field 'user': 'password' is a required property");
    };
    let project = body.pointer("/auth/scope/project");
    if body.pointer("/auth/scope").is_some() && project.is_none() {
        // Domain and system scopes: no role on them here.
        return api::unauthorized(shared);
    }

    let mut state = shared.state.lock().unwrap();
    let user_index = state.users.iter().position(|u| match user.get("id").and_then(Value::as_str) {
        Some(id) => u.id == id,
        None => {
            user.get("name").and_then(Value::as_str) == Some(&u.name)
                && user.get("domain").is_some_and(|d| same_domain(d, &u.domain))
        }
    });
    let Some(user_index) = user_index.filter(|&i| state.users[i].password == password) else {
        return api::unauthorized(shared);
    };
    let project_index = match project {
        None => None,
        Some(p) => {
            let found = state.projects.iter().position(|pr| match p.get("id").and_then(Value::as_str) {
                Some(id) => pr.id == id,
                None => {
                    p.get("name").and_then(Value::as_str) == Some(&pr.name)
                        && p.get("domain").is_some_and(|d| same_domain(d, &pr.domain))
                }
            });
            let Some(found) = found else {
                return api::unauthorized(shared);
            };
            Some(found)
        }
    };

    let issued = Timestamp::now();
    let ttl = SignedDuration::try_from(shared.config.token_ttl).unwrap_or(SignedDuration::MAX);
    let expires = issued.checked_add(ttl).unwrap_or(Timestamp::MAX);
    let id = format!("gAAAAAB{}", hex_id() + &hex_id() + &hex_id());
    state.tokens.insert(id.clone(), Token { user: user_index, project: project_index, expires });

    let u = &state.users[user_index];
    let mut token = json!({
        "methods": ["password"],
        "user": {
            "domain": {"id": domain_id(&u.domain), "name": u.domain},
            "id": u.id,
            "name": u.name,
            "password_expires_at": null,
        },
        "audit_ids": [hex_id()[..22].to_owned()],
        "expires_at": micros(expires),
        "issued_at": micros(issued),
    });
    if let Some(p) = project_index.map(|i| &state.projects[i]) {
        token["project"] =
            json!({"domain": {"id": domain_id(&p.domain), "name": p.domain}, "id": p.id, "name": p.name});
        token["is_domain"] = json!(false);
        token["roles"] = json!([{"id": hex_id(), "name": "member"}, {"id": hex_id(), "name": "reader"}]);
        if !api::query(req).contains_key("nocatalog") {
            token["catalog"] = catalog(shared);
        }
    }
    let mut resp = json(201, &json!({ "token": token }));
    resp.headers.push(("X-Subject-Token".into(), id));
    resp.headers.push(("Vary".into(), "X-Auth-Token".into()));
    resp
}

/// identity, compute and image, each with public, internal and admin endpoints in the one region.
fn catalog(shared: &Shared) -> Value {
    let base = &shared.base;
    let region = &shared.config.region;
    let services = [
        ("identity", "keystone", format!("{base}/identity")),
        ("compute", "nova", format!("{base}/compute/v2.1")),
        ("image", "glance", format!("{base}/image")),
    ];
    let entries: Vec<Value> = services
        .into_iter()
        .filter(|(kind, _, _)| shared.config.omit_service != Some(*kind))
        .map(|(kind, name, url)| {
            let endpoints: Vec<Value> = ["public", "internal", "admin"]
                .into_iter()
                .map(|interface| {
                    json!({"id": hex_id(), "interface": interface, "region_id": region, "region": region, "url": url})
                })
                .collect();
            json!({"id": hex_id(), "type": kind, "name": name, "endpoints": endpoints})
        })
        .collect();
    Value::Array(entries)
}
