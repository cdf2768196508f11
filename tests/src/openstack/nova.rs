//! Nova v2.1 under `/compute/v2.1`: servers (create, show, list, delete; the
//! actions are in [`super::actions`]) and flavors, with microversions from
//! `OpenStack-API-Version` / `X-OpenStack-Nova-API-Version`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use jiff::Timestamp;
use rand::Rng;
use serde_json::{Map, Value, json};

use super::api::{self, json};
use super::http::{Request, Response};
use super::state::{Power, Server, Shared, Shown, seconds, uuid};
use super::{Flavor, Op, actions, vm};

/// The newest microversion served (Nova 2024.1).
const MAX_MINOR: u32 = 96;
/// Nova's limit on base64-encoded user_data.
const MAX_USER_DATA: usize = 65535;
/// What a server's body may hold (Nova's schema, `additionalProperties: false`).
const SERVER_KEYS: &[&str] = &[
    "name",
    "imageRef",
    "flavorRef",
    "adminPass",
    "metadata",
    "networks",
    "OS-DCF:diskConfig",
    "accessIPv4",
    "accessIPv6",
    "personality",
    "security_groups",
    "user_data",
    "availability_zone",
    "key_name",
    "block_device_mapping",
    "block_device_mapping_v2",
    "config_drive",
    "min_count",
    "max_count",
    "return_reservation_id",
    "description",
    "tags",
    "trusted_image_certificates",
    "host",
    "hypervisor_hostname",
    "hostname",
];

/// Who is calling: (user index, project index).
pub(super) type Caller = (usize, usize);

pub(super) fn handle(shared: &Arc<Shared>, req: &Request, rest: &[&str]) -> Response {
    if req.method == "GET" && rest.is_empty() {
        return json(200, &version(shared));
    }
    let mut resp = match api::authenticate(shared, req) {
        Err(resp) => resp,
        Ok(caller) => match microversion(req) {
            Err(resp) => resp,
            Ok(minor) => {
                let mut resp = route(shared, req, rest, minor, caller);
                resp.headers.push(("OpenStack-API-Version".into(), format!("compute 2.{minor}")));
                resp.headers.push(("X-OpenStack-Nova-API-Version".into(), format!("2.{minor}")));
                resp.headers.push(("Vary".into(), "OpenStack-API-Version, X-OpenStack-Nova-API-Version".into()));
                resp
            }
        },
    };
    resp.headers.push(("X-OpenStack-Request-Id".into(), format!("req-{}", uuid())));
    resp
}

fn route(shared: &Arc<Shared>, req: &Request, rest: &[&str], mv: u32, caller: Caller) -> Response {
    match (req.method.as_str(), rest) {
        ("POST", ["servers"]) => create(shared, req, mv, caller),
        ("GET", ["servers"]) => list(shared, req, mv, caller, false),
        ("GET", ["servers", "detail"]) => list(shared, req, mv, caller, true),
        ("GET", ["servers", id]) => show(shared, id, mv, caller),
        ("DELETE", ["servers", id]) => delete(shared, id, caller),
        ("POST", ["servers", id, "action"]) => actions::action(shared, req, id, mv, caller),
        ("GET", ["flavors"]) => flavors(shared, mv, false),
        ("GET", ["flavors", "detail"]) => flavors(shared, mv, true),
        ("GET", ["flavors", id]) => flavor(shared, id, mv),
        _ => fault(404, "The resource could not be found."),
    }
}

fn version(shared: &Shared) -> Value {
    json!({"version": {
        "id": "v2.1",
        "status": "CURRENT",
        "version": format!("2.{MAX_MINOR}"),
        "min_version": "2.1",
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{}/compute/v2.1/", shared.base)}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}],
    }})
}

/// The requested microversion's minor number (2.1 when none is asked for).
fn microversion(req: &Request) -> Result<u32, Response> {
    let asked = req
        .header("openstack-api-version")
        .and_then(|h| h.split(',').find_map(|part| part.trim().strip_prefix("compute ").map(str::trim)))
        .or_else(|| req.header("x-openstack-nova-api-version").map(str::trim));
    let Some(asked) = asked else {
        return Ok(1);
    };
    if asked == "latest" {
        return Ok(MAX_MINOR);
    }
    let minor = asked.strip_prefix("2.").and_then(|m| m.parse::<u32>().ok()).ok_or_else(|| {
        fault(400, &format!("API Version String {asked} is of invalid format. Must be of format MajorNum.MinorNum."))
    })?;
    if !(1..=MAX_MINOR).contains(&minor) {
        let msg = format!("Version {asked} is not supported by the API. Minimum is 2.1 and maximum is 2.{MAX_MINOR}.");
        return Err(fault(406, &msg));
    }
    Ok(minor)
}

/// Nova's error body: `{"<kind>": {"code", "message"}}`.
pub(super) fn fault(code: u16, message: &str) -> Response {
    let kind = match code {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "itemNotFound",
        405 => "badMethod",
        409 => "conflictingRequest",
        413 | 429 => "overLimit",
        503 => "serviceUnavailable",
        _ => "computeFault",
    };
    json(code, &json!({ kind: {"code": code, "message": message} }))
}

/// Nova's answer to a request body its JSON schema rejects.
pub(super) fn invalid(field: &str, value: &Value, why: &str) -> Response {
    fault(400, &format!("Invalid input for field/attribute {field}. Value: {value}. {why}"))
}

pub(super) fn not_found(id: &str) -> Response {
    fault(404, &format!("Instance {id} could not be found."))
}

fn server_links(shared: &Shared, id: &str) -> Value {
    json!([
        {"rel": "self", "href": format!("{}/compute/v2.1/servers/{id}", shared.base)},
        {"rel": "bookmark", "href": format!("{}/compute/servers/{id}", shared.base)},
    ])
}

/// The last segment of an id or href.
fn last_segment(reference: &str) -> &str {
    reference.trim_end_matches('/').rsplit('/').next().unwrap_or(reference)
}

/// A string→string map of at most 255-character values, as server and image metadata are.
pub(super) fn string_map(field: &str, value: &Value) -> Result<BTreeMap<String, String>, Response> {
    let Some(object) = value.as_object() else {
        return Err(invalid(field, value, &format!("{value} is not of type 'object'")));
    };
    let mut out = BTreeMap::new();
    for (k, v) in object {
        let Some(s) = v.as_str() else {
            return Err(invalid(&format!("{field}/{k}"), v, &format!("{v} is not of type 'string'")));
        };
        if k.is_empty() || k.len() > 255 || s.len() > 255 {
            return Err(invalid(field, value, "keys must be 1 to 255 and values at most 255 characters long"));
        }
        out.insert(k.clone(), s.to_owned());
    }
    Ok(out)
}

fn create(shared: &Arc<Shared>, req: &Request, mv: u32, (user, project): Caller) -> Response {
    if let Some(resp) = api::call(shared, Op::CreateServer) {
        return resp;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return fault(400, "Malformed request body");
    };
    let Some(server) = body.get("server").and_then(Value::as_object) else {
        return invalid("body", &body, "'server' is a required property");
    };
    let whole = Value::Object(server.clone());
    if let Some(extra) = server.keys().find(|k| !SERVER_KEYS.contains(&k.as_str())) {
        return invalid("server", &whole, &format!("Additional properties are not allowed ('{extra}' was unexpected)"));
    }
    let name = match server.get("name").map(|n| (n, n.as_str())) {
        None => return invalid("server", &whole, "'name' is a required property"),
        Some((_, Some(n))) if !n.trim().is_empty() && n.chars().count() <= 255 => n.to_owned(),
        Some((n, _)) => return invalid("name", n, "the name must be 1 to 255 characters, not only spaces"),
    };
    let flavor_ref = match server.get("flavorRef") {
        None => return invalid("server", &whole, "'flavorRef' is a required property"),
        Some(Value::String(s)) => last_segment(s).to_owned(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => return invalid("flavorRef", other, &format!("{other} is not of type 'string', 'integer'")),
    };
    let image_ref = match server.get("imageRef").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => last_segment(s).to_owned(),
        _ => {
            return fault(
                400,
                "Block Device Mapping is Invalid: Boot sequence for the instance and image/block device mapping \
                 combination is not valid.",
            );
        }
    };
    if server.contains_key("key_name") {
        return fault(400, "Invalid key_name provided.");
    }
    let networks = match networks(shared, server.get("networks"), mv, &whole) {
        Ok(n) => n,
        Err(resp) => return resp,
    };
    let user_data = match server.get("user_data") {
        None | Some(Value::Null) => None,
        Some(value) => {
            let Some(encoded) = value.as_str() else {
                return invalid("user_data", value, &format!("{value} is not of type 'string'"));
            };
            if encoded.len() > MAX_USER_DATA {
                return invalid("user_data", value, &format!("is longer than {MAX_USER_DATA} characters"));
            }
            let compact: String = encoded.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            match base64::engine::general_purpose::STANDARD.decode(compact) {
                Ok(bytes) => Some(bytes),
                Err(_) => return invalid("user_data", value, &format!("{value} is not a 'base64'")),
            }
        }
    };
    let metadata = match server.get("metadata").map(|m| string_map("metadata", m)).transpose() {
        Ok(m) => m.unwrap_or_default(),
        Err(resp) => return resp,
    };
    let security_groups = match server.get("security_groups") {
        None => vec!["default".to_owned()],
        Some(Value::Array(groups)) => {
            let names: Option<Vec<String>> =
                groups.iter().map(|g| g.get("name").and_then(Value::as_str).map(str::to_owned)).collect();
            match names {
                Some(names) => names,
                None => return invalid("security_groups", &json!(groups), "each needs a 'name'"),
            }
        }
        Some(other) => return invalid("security_groups", other, &format!("{other} is not of type 'array'")),
    };

    let mut state = shared.state.lock().unwrap();
    if !shared.config.flavors.iter().any(|f| f.id == flavor_ref) {
        return fault(400, &format!("Flavor {flavor_ref} could not be found."));
    }
    let project_id = state.projects[project].id.clone();
    match state.images.get(&image_ref) {
        Some(i) if !i.deleted && (i.visibility == "public" || i.owner == project_id) => {
            if i.status != "active" {
                return fault(400, &format!("Image {image_ref} is not active."));
            }
        }
        _ => return fault(400, &format!("Image {image_ref} could not be found.")),
    }
    let used = state.servers.values().filter(|s| s.project == project && !s.deleted).count();
    let max = shared.config.max_servers;
    if used >= max {
        return fault(
            403,
            &format!("Quota exceeded for instances: Requested 1, but already used {used} of {max} instances"),
        );
    }

    let id = uuid();
    let now = Timestamp::now();
    let admin_pass: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(12).map(char::from).collect();
    let mut server = Server {
        id: id.clone(),
        name,
        image_id: image_ref,
        flavor_id: flavor_ref,
        project,
        tenant_id: project_id,
        user_id: state.users[user].id.clone(),
        metadata,
        user_data,
        security_groups,
        networks,
        created: now,
        updated: now,
        launched: None,
        gets: 0,
        power: Power::Building,
        task: Some("spawning"),
        deleted: false,
        dir: shared.work.join("servers").join(&id),
        disk: None,
        vm: None,
        metadata_log: Arc::new(Mutex::new(Vec::new())),
    };
    vm::boot(shared, &mut server);
    let groups: Vec<Value> = server.security_groups.iter().map(|g| json!({"name": g})).collect();
    state.servers.insert(id.clone(), server);
    shared.bump();
    drop(state);
    tracing::info!(target: "kiln_tests::openstack", server = %id, "server created");

    let body = json!({"server": {
        "id": id,
        "links": server_links(shared, &id),
        "OS-DCF:diskConfig": "MANUAL",
        "security_groups": groups,
        "adminPass": admin_pass,
    }});
    let mut resp = json(202, &body);
    resp.headers.push(("Location".into(), format!("{}/compute/v2.1/servers/{id}", shared.base)));
    resp
}

/// The (uuid, name) networks a create request asks for.
fn networks(
    shared: &Shared,
    requested: Option<&Value>,
    mv: u32,
    whole: &Value,
) -> Result<Vec<(String, String)>, Response> {
    let first = || shared.config.networks.iter().take(1).cloned().collect::<Vec<_>>();
    match requested {
        None if mv >= 37 => Err(invalid("server", whole, "'networks' is a required property")),
        None => Ok(first()),
        Some(Value::String(s)) if mv >= 37 && s == "auto" => Ok(first()),
        Some(Value::String(s)) if mv >= 37 && s == "none" => Ok(Vec::new()),
        Some(Value::Array(list)) => {
            let mut out = Vec::new();
            for n in list {
                if let Some(port) = n.get("port").and_then(Value::as_str) {
                    return Err(fault(400, &format!("Port id {port} could not be found.")));
                }
                let Some(uuid) = n.get("uuid").and_then(Value::as_str) else {
                    return Err(invalid("networks", n, "each network needs a 'uuid' or a 'port'"));
                };
                match shared.config.networks.iter().find(|(id, _)| id == uuid) {
                    Some(net) => out.push(net.clone()),
                    None => return Err(fault(400, &format!("Network {uuid} could not be found."))),
                }
            }
            Ok(out)
        }
        Some(other) => {
            let allowed = if mv >= 37 { "an array, 'auto' or 'none'" } else { "an array" };
            Err(invalid("networks", other, &format!("{other} is not {allowed}")))
        }
    }
}

/// The server as `GET /servers/{id}` and `/servers/detail` show it.
fn server_json(shared: &Shared, s: &Server, shown: &Shown, mv: u32) -> Value {
    let flavor = shared.config.flavors.iter().find(|f| f.id == s.flavor_id);
    let flavor = match flavor {
        Some(f) if mv >= 47 => json!({
            "vcpus": f.vcpus, "ram": f.ram_mb, "disk": f.disk_gb, "ephemeral": 0, "swap": 0,
            "original_name": f.name, "extra_specs": {},
        }),
        _ => json!({"id": s.flavor_id, "links": [
            {"rel": "bookmark", "href": format!("{}/compute/flavors/{}", shared.base, s.flavor_id)},
        ]}),
    };
    let addresses: Map<String, Value> = s
        .networks
        .iter()
        .enumerate()
        .map(|(i, (_, name))| {
            let ip = json!([{
                "version": 4, "addr": format!("169.254.169.{}", 15 + i),
                "OS-EXT-IPS:type": "fixed", "OS-EXT-IPS-MAC:mac_addr": format!("52:54:00:12:34:{:02x}", 0x56 + i),
            }]);
            (name.clone(), ip)
        })
        .collect();
    let mut v = json!({
        "id": s.id,
        "name": s.name,
        "status": shown.status,
        "tenant_id": s.tenant_id,
        "user_id": s.user_id,
        "metadata": s.metadata,
        "hostId": hex::encode(&s.id.as_bytes()[..28]),
        "image": {"id": s.image_id, "links": [
            {"rel": "bookmark", "href": format!("{}/compute/images/{}", shared.base, s.image_id)},
        ]},
        "flavor": flavor,
        "created": seconds(s.created),
        "updated": seconds(s.updated),
        "addresses": addresses,
        "accessIPv4": "",
        "accessIPv6": "",
        "links": server_links(shared, &s.id),
        "OS-DCF:diskConfig": "MANUAL",
        "progress": 0,
        "OS-EXT-AZ:availability_zone": "nova",
        "config_drive": "",
        "key_name": null,
        "OS-SRV-USG:launched_at": s.launched.map(|t| t.strftime("%Y-%m-%dT%H:%M:%S.%6f").to_string()),
        "OS-SRV-USG:terminated_at": null,
        "OS-EXT-STS:task_state": s.task,
        "OS-EXT-STS:vm_state": shown.vm_state,
        "OS-EXT-STS:power_state": shown.power_state,
        "os-extended-volumes:volumes_attached": [],
        "security_groups": s.security_groups.iter().map(|g| json!({"name": g})).collect::<Vec<_>>(),
    });
    if let Power::Error(message) = &s.power {
        v["fault"] = json!({"code": 500, "created": seconds(s.updated), "message": message});
    }
    for (since, key, value) in [
        (9, "locked", json!(false)),
        (19, "description", Value::Null),
        (26, "tags", json!([])),
        (63, "trusted_image_certificates", Value::Null),
        (73, "locked_reason", Value::Null),
        (96, "pinned_availability_zone", Value::Null),
    ] {
        if mv >= since {
            v[key] = value;
        }
    }
    v
}

fn show(shared: &Arc<Shared>, id: &str, mv: u32, (_, project): Caller) -> Response {
    if let Some(resp) = api::call(shared, Op::GetServer) {
        return resp;
    }
    let mut state = shared.state.lock().unwrap();
    let Some(s) = state.servers.get_mut(id).filter(|s| !s.deleted && s.project == project) else {
        return not_found(id);
    };
    let shown = s.shown_to_get(&shared.config);
    s.gets += 1;
    json(200, &json!({ "server": server_json(shared, s, &shown, mv) }))
}

/// Whether `name` matches Nova's `name` filter (a regular expression there; here a substring,
/// anchored by a leading `^` or a trailing `$`).
fn name_matches(name: &str, filter: &str) -> bool {
    let (start, rest) = filter.strip_prefix('^').map_or((false, filter), |r| (true, r));
    let (end, needle) = rest.strip_suffix('$').map_or((false, rest), |r| (true, r));
    match (start, end) {
        (true, true) => name == needle,
        (true, false) => name.starts_with(needle),
        (false, true) => name.ends_with(needle),
        (false, false) => name.contains(needle),
    }
}

fn list(shared: &Arc<Shared>, req: &Request, mv: u32, (_, project): Caller, detail: bool) -> Response {
    if let Some(resp) = api::call(shared, Op::ListServers) {
        return resp;
    }
    let query = api::query(req);
    let state = shared.state.lock().unwrap();
    let mut servers: Vec<&Server> = state
        .servers
        .values()
        .filter(|s| !s.deleted && s.project == project)
        .filter(|s| query.get("name").is_none_or(|f| name_matches(&s.name, f)))
        .filter(|s| query.get("status").is_none_or(|st| st.eq_ignore_ascii_case(s.shown_to_get(&shared.config).status)))
        .collect();
    servers.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.id.cmp(&b.id)));
    let servers: Vec<Value> = servers
        .into_iter()
        .map(|s| {
            if detail {
                server_json(shared, s, &s.shown_to_get(&shared.config), mv)
            } else {
                json!({"id": s.id, "name": s.name, "links": server_links(shared, &s.id)})
            }
        })
        .collect();
    json(200, &json!({ "servers": servers }))
}

fn delete(shared: &Arc<Shared>, id: &str, (_, project): Caller) -> Response {
    if let Some(resp) = api::call(shared, Op::DeleteServer) {
        return resp;
    }
    let mut state = shared.state.lock().unwrap();
    let Some(s) = state.servers.get_mut(id).filter(|s| !s.deleted && s.project == project) else {
        return not_found(id);
    };
    s.deleted = true;
    s.updated = Timestamp::now();
    s.task = Some("deleting");
    match &s.vm {
        // The VM task kills QEMU and removes the directory.
        Some(vm) => vm.cancel.cancel(),
        None => {
            let _ = std::fs::remove_dir_all(&s.dir);
        }
    }
    shared.bump();
    tracing::info!(target: "kiln_tests::openstack", server = %id, "server deleted");
    Response::new(204, "text/plain", Vec::new())
}

fn flavor_json(shared: &Shared, f: &Flavor, mv: u32, detail: bool) -> Value {
    let links = json!([
        {"rel": "self", "href": format!("{}/compute/v2.1/flavors/{}", shared.base, f.id)},
        {"rel": "bookmark", "href": format!("{}/compute/flavors/{}", shared.base, f.id)},
    ]);
    let mut v = json!({"id": f.id, "name": f.name, "links": links});
    if mv >= 55 {
        v["description"] = Value::Null;
    }
    if detail {
        v["ram"] = json!(f.ram_mb);
        v["vcpus"] = json!(f.vcpus);
        v["disk"] = json!(f.disk_gb);
        v["OS-FLV-EXT-DATA:ephemeral"] = json!(0);
        v["OS-FLV-DISABLED:disabled"] = json!(false);
        v["swap"] = if mv >= 75 { json!(0) } else { json!("") };
        v["rxtx_factor"] = json!(1.0);
        v["os-flavor-access:is_public"] = json!(true);
        if mv >= 61 {
            v["extra_specs"] = json!({});
        }
    }
    v
}

fn flavors(shared: &Arc<Shared>, mv: u32, detail: bool) -> Response {
    if let Some(resp) = api::call(shared, Op::ListFlavors) {
        return resp;
    }
    let flavors: Vec<Value> = shared.config.flavors.iter().map(|f| flavor_json(shared, f, mv, detail)).collect();
    json(200, &json!({ "flavors": flavors }))
}

fn flavor(shared: &Arc<Shared>, id: &str, mv: u32) -> Response {
    if let Some(resp) = api::call(shared, Op::GetFlavor) {
        return resp;
    }
    match shared.config.flavors.iter().find(|f| f.id == id) {
        Some(f) => json(200, &json!({ "flavor": flavor_json(shared, f, mv, true) })),
        None => fault(404, &format!("Flavor {id} could not be found.")),
    }
}
