//! One server's OpenStack metadata service on 127.0.0.1, reached by the guest at
//! 169.254.169.254:80 through QEMU's `guestfwd` (one `busybox nc` per connection).
//!
//! It serves `/openstack/latest/{user_data,meta_data.json,vendor_data.json,
//! vendor_data2.json,network_data.json}` and the version listings. Every EC2
//! path (`/latest/...`, the IMDSv2 token PUT included) answers 404, so kiln's
//! boot hook falls through to the OpenStack source.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::http::{self, Request, Response};

/// What the service tells its server.
pub(super) struct Info {
    pub uuid: String,
    pub name: String,
    pub project_id: String,
    pub meta: BTreeMap<String, String>,
    pub user_data: Option<Vec<u8>>,
}

/// A running metadata service; dropped, it stops.
pub(super) struct Service {
    pub port: u16,
    stop: CancellationToken,
}

impl Service {
    /// Serves `info`; each request is noted in `log` as `"<METHOD> <path> <status>"`.
    pub async fn start(info: Info, log: Arc<Mutex<Vec<String>>>, stop: CancellationToken) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let info = Arc::new(info);
        http::serve(listener, stop.clone(), move |req| {
            let (info, log) = (info.clone(), log.clone());
            async move {
                let resp = answer(&info, &req);
                log.lock().unwrap().push(format!("{} {} {}", req.method, req.path(), resp.status));
                resp
            }
        });
        Ok(Self { port, stop })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

const VERSIONS: &str = "2012-08-10\n2013-04-04\n2013-10-17\n2015-10-15\n2016-06-30\n2016-10-06\n2017-02-22\n2018-08-27\n2020-10-14\nlatest";

fn answer(info: &Info, req: &Request) -> Response {
    let path = req.path().trim_end_matches('/');
    let json = |v: serde_json::Value| Response::new(200, "application/json", serde_json::to_vec(&v).unwrap());
    let found = match path {
        "/openstack" => Some(Response::text(200, VERSIONS)),
        "/openstack/latest" => {
            let mut files = "meta_data.json\nnetwork_data.json\nvendor_data.json\nvendor_data2.json".to_owned();
            if info.user_data.is_some() {
                files.push_str("\nuser_data");
            }
            Some(Response::text(200, files))
        }
        "/openstack/latest/user_data" => {
            info.user_data.as_ref().map(|data| Response::new(200, "application/octet-stream", data.clone()))
        }
        "/openstack/latest/meta_data.json" => Some(json(json!({
            "uuid": info.uuid,
            "name": info.name,
            "hostname": info.name.to_lowercase().replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-"),
            "meta": info.meta,
            "project_id": info.project_id,
            "availability_zone": "nova",
            "launch_index": 0,
            "devices": [],
        }))),
        "/openstack/latest/network_data.json" => Some(json(json!({"links": [], "networks": [], "services": []}))),
        "/openstack/latest/vendor_data.json" | "/openstack/latest/vendor_data2.json" => Some(json(json!({}))),
        _ => None,
    };
    match found {
        Some(_) if req.method != "GET" => {
            let mut resp = Response::text(405, "405 Method Not Allowed\n");
            resp.headers.push(("Allow".into(), "GET".into()));
            resp
        }
        Some(resp) => resp,
        None => Response::text(404, "404 Not Found\n\nThe resource could not be found.\n"),
    }
}
