//! Nova's server actions (`POST /compute/v2.1/servers/{id}/action`): os-stop,
//! os-start, os-getConsoleOutput and createImage.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use serde_json::{Value, json};

use super::api::{self, json};
use super::http::{Request, Response};
use super::nova::{Caller, fault, invalid, not_found, string_map};
use super::state::{Image, Power, Shared, uuid};
use super::{Op, vm};

/// Nova's limit on console output.
const MAX_CONSOLE_BYTES: usize = 100 * 1024;

pub(super) fn action(shared: &Arc<Shared>, req: &Request, id: &str, mv: u32, (user, project): Caller) -> Response {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&req.body) else {
        return fault(400, "Malformed request body");
    };
    let Some((name, arg)) = body.iter().next().filter(|_| body.len() == 1) else {
        return fault(400, "Malformed request body");
    };
    let op = match name.as_str() {
        "os-stop" => Op::StopServer,
        "os-start" => Op::StartServer,
        "os-getConsoleOutput" => Op::ConsoleOutput,
        "createImage" => Op::CreateImage,
        other => return fault(400, &format!("There is no such action: {other}")),
    };
    if let Some(resp) = api::call(shared, op) {
        return resp;
    }
    let mut guard = shared.state.lock().unwrap();
    let state = &mut *guard;
    let project_id = state.projects[project].id.clone();
    let (project_name, user_name, user_id) =
        (state.projects[project].name.clone(), state.users[user].name.clone(), state.users[user].id.clone());
    let Some(s) = state.servers.get_mut(id).filter(|s| !s.deleted && s.project == project) else {
        return not_found(id);
    };
    let shown = s.status();
    let conflict = |what: &str| {
        let why = match s.task {
            Some(task) => format!("task_state {task}"),
            None => format!("vm_state {}", shown.vm_state),
        };
        fault(409, &format!("Cannot '{what}' instance {id} while it is in {why}"))
    };
    match op {
        Op::StopServer => {
            if shown.vm_state != "active" || s.task.is_some() {
                return conflict("stop");
            }
            s.power = Power::Stopping;
            s.task = Some("powering-off");
            s.updated = Timestamp::now();
            if let Some(vm) = &s.vm {
                vm.cancel.cancel();
            }
            shared.bump();
            Response::new(202, "text/plain", Vec::new())
        }
        Op::StartServer => {
            if shown.vm_state != "stopped" || s.task.is_some() {
                return conflict("start");
            }
            s.task = Some("powering-on");
            s.updated = Timestamp::now();
            vm::boot(shared, s);
            shared.bump();
            Response::new(202, "text/plain", Vec::new())
        }
        Op::ConsoleOutput => {
            let length = match arg.get("length") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => n.as_i64(),
                Some(Value::String(text)) => text.parse::<i64>().ok(),
                Some(_) => Some(i64::MIN),
            };
            if length.is_some_and(|l| l < -1) {
                return invalid("length", &arg["length"], "must be an integer of at least -1");
            }
            let Ok(bytes) = std::fs::read(s.dir.join("console.log")) else {
                return fault(409, &format!("Instance {id} is not ready"));
            };
            let text = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(MAX_CONSOLE_BYTES)..]).into_owned();
            let output = match length {
                Some(n) if n >= 0 => {
                    let lines: Vec<&str> = text.split_inclusive('\n').collect();
                    lines[lines.len().saturating_sub(n as usize)..].concat()
                }
                _ => text,
            };
            json(200, &json!({ "output": output }))
        }
        Op::CreateImage => {
            let Some(image_name) = arg.get("name").and_then(Value::as_str).filter(|n| n.chars().count() <= 255) else {
                return invalid("createImage", arg, "'name' is a required property (a string of at most 255)");
            };
            let given = match arg.get("metadata").map(|m| string_map("metadata", m)).transpose() {
                Ok(m) => m.unwrap_or_default(),
                Err(resp) => return resp,
            };
            if shown.vm_state != "stopped" || s.task.is_some() {
                return conflict("createImage");
            }
            s.task = Some("image_snapshot");
            s.updated = Timestamp::now();
            let image_id = uuid();
            let mut image = Image::new(&image_id, image_name, "qcow2", "private", &project_id);
            image.properties = BTreeMap::from([
                ("image_type".to_owned(), "snapshot".to_owned()),
                ("instance_uuid".to_owned(), s.id.clone()),
                ("base_image_ref".to_owned(), s.image_id.clone()),
                ("owner_project_name".to_owned(), project_name),
                ("owner_user_name".to_owned(), user_name),
                ("user_id".to_owned(), user_id),
            ]);
            image.properties.extend(given);
            state.images.insert(image_id.clone(), image);
            tokio::spawn(vm::snapshot(shared.clone(), image_id.clone(), id.to_owned()));
            shared.bump();
            tracing::info!(target: "kiln_tests::openstack", server = %id, image = %image_id, "createImage");
            if mv >= 45 {
                json(202, &json!({ "image_id": image_id }))
            } else {
                let mut resp = Response::new(202, "text/plain", Vec::new());
                resp.headers.push(("Location".into(), format!("{}/image/images/{image_id}", shared.base)));
                resp
            }
        }
        _ => unreachable!("only server actions get here"),
    }
}
