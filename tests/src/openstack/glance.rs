//! Glance v2 under `/image`: the versions document, and images (show, list
//! with `name`/`status` filters, JSON-patch update of name and properties, delete).

use jiff::Timestamp;
use serde_json::{Value, json};

use super::Op;
use super::api::{self, json};
use super::http::{Request, Response};
use super::state::{Backing, Image, Shared, seconds};

const PATCH_TYPES: &[&str] =
    &["application/openstack-images-v2.1-json-patch", "application/openstack-images-v2.0-json-patch"];
/// Attributes an image update may not touch here (Glance's read-only ones, and the core
/// ones this fake does not let change).
const FIXED: &[&str] = &[
    "id",
    "status",
    "size",
    "virtual_size",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "created_at",
    "updated_at",
    "self",
    "file",
    "schema",
    "direct_url",
    "locations",
    "stores",
    "owner",
    "visibility",
    "protected",
    "os_hidden",
    "tags",
    "disk_format",
    "container_format",
    "min_disk",
    "min_ram",
];

pub(super) fn handle(shared: &Shared, req: &Request, rest: &[&str]) -> Response {
    match (req.method.as_str(), rest) {
        ("GET", []) => versions(shared, 300),
        ("GET", ["versions"]) => versions(shared, 200),
        (_, ["v2", ..]) => match api::authenticate(shared, req) {
            Err(resp) => resp,
            Ok((_, project)) => {
                let project_id = shared.state.lock().unwrap().projects[project].id.clone();
                match (req.method.as_str(), &rest[1..]) {
                    ("GET", ["images"]) => list(shared, req, &project_id),
                    ("GET", ["images", id]) => show(shared, id, &project_id),
                    ("PATCH", ["images", id]) => update(shared, req, id, &project_id),
                    ("DELETE", ["images", id]) => delete(shared, id, &project_id),
                    _ => error(404, "Not Found", "The resource could not be found."),
                }
            }
        },
        _ => error(404, "Not Found", "The resource could not be found."),
    }
}

fn versions(shared: &Shared, status: u16) -> Response {
    let href = format!("{}/image/v2/", shared.base);
    let versions: Vec<Value> = ["2.16", "2.15", "2.9"]
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({"id": format!("v{v}"), "status": if i == 0 { "CURRENT" } else { "SUPPORTED" },
                   "links": [{"rel": "self", "href": href}]})
        })
        .collect();
    json(status, &json!({ "versions": versions }))
}

/// Glance's (webob's) error page.
fn error(code: u16, title: &str, detail: &str) -> Response {
    let body = format!(
        "<html>\n <head>\n  <title>{code} {title}</title>\n </head>\n <body>\n  <h1>{code} {title}</h1>\n  \
         {detail}<br /><br />\n\n\n\n </body>\n</html>"
    );
    Response::new(code, "text/html; charset=UTF-8", body)
}

fn not_found(id: &str) -> Response {
    error(404, "Not Found", &format!("No image found with ID {id}"))
}

fn visible(image: &Image, project_id: &str) -> bool {
    !image.deleted && (image.visibility == "public" || image.owner == project_id)
}

fn image_json(image: &Image) -> Value {
    let id = &image.id;
    let mut v = json!({
        "id": id,
        "name": image.name,
        "status": image.status,
        "visibility": image.visibility,
        "protected": false,
        "os_hidden": false,
        "tags": [],
        "size": image.size,
        "virtual_size": image.virtual_size,
        "checksum": image.checksum,
        "os_hash_algo": image.sha512.as_ref().map(|_| "sha512"),
        "os_hash_value": image.sha512,
        "disk_format": image.disk_format,
        "container_format": "bare",
        "min_disk": 0,
        "min_ram": 0,
        "owner": if image.owner.is_empty() { Value::Null } else { json!(image.owner) },
        "created_at": seconds(image.created),
        "updated_at": seconds(image.updated),
        "self": format!("/v2/images/{id}"),
        "file": format!("/v2/images/{id}/file"),
        "schema": "/v2/schemas/image",
    });
    if image.status == "active" {
        v["stores"] = json!("file");
    }
    for (k, p) in &image.properties {
        v[k] = json!(p);
    }
    v
}

fn show(shared: &Shared, id: &str, project_id: &str) -> Response {
    if let Some(resp) = api::call(shared, Op::GetImage) {
        return resp;
    }
    let state = shared.state.lock().unwrap();
    match state.images.get(id).filter(|i| visible(i, project_id)) {
        Some(image) => json(200, &image_json(image)),
        None => not_found(id),
    }
}

fn list(shared: &Shared, req: &Request, project_id: &str) -> Response {
    if let Some(resp) = api::call(shared, Op::ListImages) {
        return resp;
    }
    let query = api::query(req);
    let state = shared.state.lock().unwrap();
    let mut images: Vec<&Image> = state
        .images
        .values()
        .filter(|i| visible(i, project_id))
        .filter(|i| query.get("name").is_none_or(|n| *n == i.name))
        .filter(|i| query.get("status").is_none_or(|s| s == i.status))
        .collect();
    images.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.id.cmp(&b.id)));
    let images: Vec<Value> = images.into_iter().map(image_json).collect();
    let first = match req.target.split_once('?') {
        Some((_, q)) => format!("/v2/images?{q}"),
        None => "/v2/images".to_owned(),
    };
    json(200, &json!({"images": images, "first": first, "schema": "/v2/schemas/images"}))
}

fn update(shared: &Shared, req: &Request, id: &str, project_id: &str) -> Response {
    if let Some(resp) = api::call(shared, Op::UpdateImage) {
        return resp;
    }
    let content_type = req.header("content-type").unwrap_or("");
    if !PATCH_TYPES.iter().any(|t| content_type.starts_with(t)) {
        return error(415, "Unsupported Media Type", &format!("Content type {content_type} not supported"));
    }
    let Ok(Value::Array(ops)) = serde_json::from_slice::<Value>(&req.body) else {
        return error(400, "Bad Request", "Request body must be a JSON array of operation objects.");
    };
    let mut state = shared.state.lock().unwrap();
    let Some(image) = state.images.get_mut(id).filter(|i| visible(i, project_id)) else {
        return not_found(id);
    };
    if !image.owner.is_empty() && image.owner != project_id {
        return error(403, "Forbidden", "You are not permitted to modify this image.");
    }
    // Applied to a copy: a failing operation leaves the image as it was.
    let (mut name, mut properties) = (image.name.clone(), image.properties.clone());
    for op in &ops {
        let (Some(kind), Some(path)) = (op["op"].as_str(), op["path"].as_str()) else {
            return error(400, "Bad Request", "Operation objects must contain 'op' and 'path'.");
        };
        let attr = path.trim_start_matches('/');
        if FIXED.contains(&attr) {
            return error(403, "Forbidden", &format!("Attribute '{attr}' is read-only."));
        }
        let value = match (kind, op.get("value")) {
            ("remove", _) => None,
            ("add" | "replace", Some(Value::String(s))) => Some(s.clone()),
            ("add" | "replace", _) => {
                return error(400, "Bad Request", &format!("Provided object does not match schema 'image': {path}"));
            }
            _ => return error(400, "Bad Request", &format!("Invalid operation: `{kind}`")),
        };
        match (attr, value) {
            ("name", Some(v)) => name = v,
            ("name", None) => return error(403, "Forbidden", "Attribute 'name' cannot be removed."),
            (key, Some(_)) if kind == "replace" && !properties.contains_key(key) => {
                return error(409, "Conflict", &format!("Property {key} does not exist."));
            }
            (key, Some(v)) => {
                properties.insert(key.to_owned(), v);
            }
            (key, None) => {
                if properties.remove(key).is_none() {
                    return error(409, "Conflict", &format!("Property {key} does not exist."));
                }
            }
        }
    }
    image.name = name;
    image.properties = properties;
    image.updated = Timestamp::now();
    let body = image_json(image);
    shared.bump();
    json(200, &body)
}

fn delete(shared: &Shared, id: &str, project_id: &str) -> Response {
    if let Some(resp) = api::call(shared, Op::DeleteImage) {
        return resp;
    }
    let mut state = shared.state.lock().unwrap();
    let Some(image) = state.images.get_mut(id).filter(|i| visible(i, project_id)) else {
        return not_found(id);
    };
    if !image.owner.is_empty() && image.owner != project_id {
        return error(403, "Forbidden", "You are not permitted to delete this image.");
    }
    image.deleted = true;
    image.updated = Timestamp::now();
    // A base image's files belong to the test; a saving image's file goes when its conversion ends.
    if let Backing::Snapshot(disk) = &image.backing {
        let _ = std::fs::remove_file(&disk.disk);
    }
    shared.bump();
    tracing::info!(target: "kiln_tests::openstack", image = %id, "image deleted");
    Response::new(204, "text/plain", Vec::new())
}
