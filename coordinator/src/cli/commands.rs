//! The client commands: each is one or two API calls and a printout.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, bail};
use base64::Engine;
use futures::StreamExt;
use kiln_protocol::api::{
    Build, BuildRequest, Cloud, CloudKind, Garbage, GeneratorSpec, GeneratorSummary, Image, JanitorReport, LogChunk,
    LogEnd, Revision, Secret, Status, Target, TargetSpec, Timings,
};
use kiln_protocol::{BuildId, CloudName, TargetId, Timestamp};

use super::client::ApiFailure;
use super::output::{Table, pairs, print};
use super::{BuildCommand, Client, CloudCommand, Command, GeneratorCommand, GeneratorFile, ImageCommand, Output};

pub async fn run(client: &Client, output: Output, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Serve(_) | Command::GuestRelay { .. } | Command::Token(_) => {
            unreachable!("serve, the relay and tokens are run by cli::run")
        }
        Command::Cloud(c) => cloud(client, output, c).await.map(|()| 0),
        Command::Generator(g) => generator(client, output, g).await.map(|()| 0),
        Command::Build(b) => build(client, output, b).await,
        Command::Image(i) => image(client, output, i).await.map(|()| 0),
        Command::Janitor { dry_run } => janitor(client, output, dry_run).await,
    }
}

/// Runs the janitor (or its dry run) and prints what it found; 1 when a
/// cloud refused a removal.
async fn janitor(client: &Client, output: Output, dry_run: bool) -> anyhow::Result<i32> {
    let report: JanitorReport =
        if dry_run { client.get("/v1/janitor").await? } else { client.post("/v1/janitor", &()).await? };
    print(output, &report, |r| {
        let mut t = Table::new(&["cloud", "kind", "id", "target", "why"]);
        let row = |g: &Garbage, why: String| {
            let id = match &g.region {
                Some(region) => format!("{} ({region})", g.id),
                None => g.id.clone(),
            };
            vec![g.cloud.to_string(), g.kind.as_str().into(), id, g.target.map_or("-".into(), |t| t.to_string()), why]
        };
        for g in &r.found {
            t.row(row(g, g.why.clone()));
        }
        for f in &r.failed {
            t.row(row(&f.garbage, format!("NOT REMOVED: {}", f.error)));
        }
        t
    });
    if output == Output::Table {
        for skip in &report.skipped {
            eprintln!("cloud {} skipped: {}", skip.cloud, skip.why);
        }
        let n = report.found.len();
        match (dry_run, n) {
            (true, 0) => eprintln!("nothing to remove"),
            (true, n) => eprintln!("{n} to remove; run `kiln janitor` to remove them"),
            (false, n) => eprintln!("{n} removed, {} not removed", report.failed.len()),
        }
    }
    Ok(if report.failed.is_empty() { 0 } else { 1 })
}

async fn cloud(client: &Client, output: Output, command: CloudCommand) -> anyhow::Result<()> {
    match command {
        CloudCommand::Add { name, kind, region, endpoint, options, access_key_id, store_password } => {
            let kind: CloudKind = serde_json::from_value(serde_json::Value::String(kind.clone()))
                .map_err(|_| anyhow::anyhow!("unknown cloud kind {kind:?}; kiln knows: qemu, ec2, openstack"))?;
            let mut opts = BTreeMap::new();
            for o in options {
                let (k, v) = o.split_once('=').with_context(|| format!("option {o:?} is not KEY=VALUE"))?;
                opts.insert(k.to_owned(), v.to_owned());
            }
            let credentials = match store_password {
                true => Some(password_from_prompt(&name)?),
                false => credentials_from(access_key_id)?,
            };
            let cloud = Cloud { name: name.parse()?, kind, region, endpoint, options: opts, credentials };
            let c: Cloud = client.post("/v1/clouds", &cloud).await?;
            print(output, &c, cloud_table);
        }
        CloudCommand::List => {
            let clouds: Vec<Cloud> = client.get("/v1/clouds").await?;
            print(output, &clouds, |cs| {
                let mut t = Table::new(&["name", "kind", "region", "endpoint"]);
                for c in cs {
                    t.row(vec![c.name.to_string(), c.kind.as_str().into(), opt(&c.region), opt(&c.endpoint)]);
                }
                t
            });
        }
        CloudCommand::Show { name } => {
            let c: Cloud = client.get(&format!("/v1/clouds/{name}")).await?;
            print(output, &c, cloud_table);
        }
        CloudCommand::Rm { name } => {
            client.delete(&format!("/v1/clouds/{name}")).await?;
            eprintln!("cloud {name} removed");
        }
    }
    Ok(())
}

fn cloud_table(c: &Cloud) -> Table {
    let mut p = vec![("name", c.name.to_string()), ("kind", c.kind.as_str().to_string())];
    p.push(("region", opt(&c.region)));
    p.push(("endpoint", opt(&c.endpoint)));
    for (k, v) in &c.options {
        p.push(("option", format!("{k}={v}")));
    }
    pairs(&p)
}

fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

async fn generator(client: &Client, output: Output, command: GeneratorCommand) -> anyhow::Result<()> {
    match command {
        GeneratorCommand::Create(src) => {
            let spec = GeneratorFile::load(&src.file)?;
            let rev: Revision = client.post("/v1/generators", &spec).await?;
            print(output, &rev, revision_table);
        }
        GeneratorCommand::Update(src) => {
            let spec = GeneratorFile::load(&src.file)?;
            let rev: Revision = client.put(&format!("/v1/generators/{}", spec.name), &spec).await?;
            print(output, &rev, revision_table);
        }
        GeneratorCommand::Show { name, revision } => {
            let path = match revision {
                Some(n) => format!("/v1/generators/{name}/revisions/{n}"),
                None => format!("/v1/generators/{name}"),
            };
            let rev: Revision = client.get(&path).await?;
            print(output, &rev, |r| {
                let mut t = revision_table(r);
                t.row(vec!["script:".into(), String::new()]);
                for line in r.spec.script.lines() {
                    t.row(vec![String::new(), line.to_owned()]);
                }
                t
            });
        }
        GeneratorCommand::List => {
            let gens: Vec<GeneratorSummary> = client.get("/v1/generators").await?;
            print(output, &gens, |gs| {
                let mut t = Table::new(&["name", "revision", "clouds", "updated", "description"]);
                for g in gs {
                    let clouds: Vec<String> = g.clouds.iter().map(ToString::to_string).collect();
                    t.row(vec![
                        g.name.to_string(),
                        g.latest_revision.to_string(),
                        clouds.join(","),
                        g.updated_at.to_string(),
                        g.description.clone(),
                    ]);
                }
                t
            });
        }
        GeneratorCommand::Revisions { name } => {
            let revs: Vec<Revision> = client.get(&format!("/v1/generators/{name}/revisions")).await?;
            print(output, &revs, |rs| {
                let mut t = Table::new(&["revision", "created", "script sha256"]);
                for r in rs {
                    t.row(vec![r.number.to_string(), r.created_at.to_string(), r.script_sha256.clone()]);
                }
                t
            });
        }
    }
    Ok(())
}

fn revision_table(r: &Revision) -> Table {
    let mut p = vec![
        ("generator", r.generator.to_string()),
        ("revision", r.number.to_string()),
        ("created", r.created_at.to_string()),
        ("script sha256", r.script_sha256.clone()),
    ];
    if !r.secret_env_names.is_empty() {
        p.push(("secret env", r.secret_env_names.join(", ")));
    }
    for (cloud, t) in &r.spec.targets {
        p.push(("target", format!("{cloud}: {}", t.base_image)));
    }
    pairs(&p)
}

async fn build(client: &Client, output: Output, command: BuildCommand) -> anyhow::Result<i32> {
    match command {
        BuildCommand::Start { generator, file, base_images, oneshot: _, revision, clouds, wait } => {
            start_build(client, output, StartArgs { generator, file, base_images, revision, clouds, wait }).await
        }
        BuildCommand::List { generator, limit } => {
            let mut path = format!("/v1/builds?limit={limit}");
            if let Some(g) = generator {
                path.push_str(&format!("&generator={g}"));
            }
            let builds: Vec<Build> = client.get(&path).await?;
            print(output, &builds, |bs| {
                let mut t = Table::new(&["id", "generator", "revision", "status", "created", "clouds"]);
                for b in bs {
                    let clouds: Vec<String> =
                        b.targets.iter().map(|t| format!("{}:{}", t.cloud, t.status.as_str())).collect();
                    t.row(vec![
                        b.id.to_string(),
                        b.generator.to_string(),
                        b.revision.to_string(),
                        b.status.as_str().into(),
                        b.created_at.to_string(),
                        clouds.join(" "),
                    ]);
                }
                t
            });
            Ok(0)
        }
        BuildCommand::Show { id } => {
            let b: Build = client.get(&format!("/v1/builds/{id}")).await?;
            print(output, &b, build_table);
            Ok(0)
        }
        BuildCommand::Logs { id, cloud, follow } => {
            let target = resolve_target(client, &id, cloud.as_deref()).await?;
            if follow { follow_log(client, target).await } else { print_log(client, target).await }
        }
        BuildCommand::Cancel { id } => {
            let b: Build = client.post(&format!("/v1/builds/{id}/cancel"), &()).await?;
            print(output, &b, build_table);
            Ok(0)
        }
    }
}

/// A target id, from a target id or from a build id plus a cloud.
async fn resolve_target(client: &Client, id: &str, cloud: Option<&str>) -> anyhow::Result<TargetId> {
    let parsed: BuildId = id.parse().with_context(|| format!("{id:?} is not a build or target id"))?;
    let build: Result<Build, _> = client.get(&format!("/v1/builds/{parsed}")).await;
    match build {
        Ok(b) => {
            let matching: Vec<&Target> =
                b.targets.iter().filter(|t| cloud.is_none_or(|c| t.cloud.as_str() == c)).collect();
            match matching.as_slice() {
                [one] => Ok(one.id),
                [] => bail!("build {id} has no target on cloud {}", cloud.unwrap_or("-")),
                _ => bail!("build {id} has several targets: name one with --cloud"),
            }
        }
        Err(e) if e.downcast_ref::<ApiFailure>().is_some_and(|f| f.status == reqwest::StatusCode::NOT_FOUND) => {
            Ok(TargetId(parsed.0))
        }
        Err(e) => Err(e),
    }
}

async fn print_log(client: &Client, target: TargetId) -> anyhow::Result<i32> {
    let mut offset = 0u64;
    let mut stdout = std::io::stdout().lock();
    loop {
        let resp = client
            .send(client.request(reqwest::Method::GET, &format!("/v1/targets/{target}/log?offset={offset}")))
            .await?;
        let bytes = resp.bytes().await?;
        if bytes.is_empty() {
            return Ok(0);
        }
        stdout.write_all(&bytes)?;
        offset += bytes.len() as u64;
    }
}

async fn follow_log(client: &Client, target: TargetId) -> anyhow::Result<i32> {
    let resp = client.send(client.request(reqwest::Method::GET, &format!("/v1/targets/{target}/log/follow"))).await?;
    let mut events = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
    let mut stdout = std::io::stdout();
    while let Some(event) = events.next().await {
        let event = event.context("the log stream broke")?;
        match event.event.as_str() {
            "log" => {
                let chunk: LogChunk = serde_json::from_str(&event.data)?;
                let bytes = base64::engine::general_purpose::STANDARD.decode(chunk.data)?;
                stdout.write_all(&bytes)?;
                stdout.flush()?;
            }
            "end" => {
                let end: LogEnd = serde_json::from_str(&event.data)?;
                eprintln!("-- target {}, {} bytes of log", end.status.as_str(), end.total);
                return Ok(if end.status == kiln_protocol::api::Status::Successful { 0 } else { 1 });
            }
            "error" => bail!("the coordinator stopped the log stream: {}", event.data),
            _ => {}
        }
    }
    bail!("the coordinator closed the log stream before the target ended; run the command again")
}

fn build_table(b: &Build) -> Table {
    let mut t = pairs(&[
        ("build", b.id.to_string()),
        ("generator", format!("{} revision {}", b.generator, b.revision)),
        ("script sha256", b.script_sha256.clone()),
        ("status", b.status.as_str().into()),
        ("created", b.created_at.to_string()),
    ]);
    for target in &b.targets {
        t.row(vec![String::new(), String::new()]);
        t.row(vec![
            format!("{}:", target.cloud),
            format!("{} (step {})", target.status.as_str(), target.step.as_str()),
        ]);
        t.row(vec!["  target:".into(), target.id.to_string()]);
        t.row(vec!["  base image:".into(), target.base_image.clone()]);
        if let Some(i) = &target.instance {
            t.row(vec!["  instance:".into(), i.clone()]);
        }
        if let Some(o) = &target.outcome {
            t.row(vec!["  script:".into(), o.to_string()]);
        }
        if let Some(img) = &target.image {
            t.row(vec!["  image:".into(), img.name.clone()]);
            t.row(vec!["  image id:".into(), img.id.clone()]);
            if let Some(sha) = &img.sha256 {
                t.row(vec!["  image sha256:".into(), sha.clone()]);
            }
        }
        let phases = phases(&target.timings);
        if !phases.is_empty() {
            let p: Vec<String> = phases.iter().map(|(n, s)| format!("{n} {s:.1}s")).collect();
            t.row(vec!["  phases:".into(), p.join(", ")]);
        }
        t.row(vec!["  log:".into(), format!("{} bytes", target.log_bytes)]);
        if let Some(pending) = &target.cleanup_pending {
            t.row(vec!["  cleanup pending:".into(), pending.clone()]);
        }
        if let Some(e) = &target.error {
            t.row(vec!["  error:".into(), format!("{:?} at {}", e.reason, e.step.as_str())]);
            for line in e.message.lines() {
                t.row(vec![String::new(), line.to_owned()]);
            }
        }
    }
    t
}

/// Durations of the phases a target went through, in seconds.
pub fn phases(t: &Timings) -> Vec<(&'static str, f64)> {
    let span = |a: Option<Timestamp>, b: Option<Timestamp>| match (a, b) {
        (Some(a), Some(b)) => Some(b.duration_since(a).as_secs_f64()),
        _ => None,
    };
    [
        ("boot to agent", span(t.launched_at, t.agent_contact_at)),
        ("script", span(t.script_started_at, t.script_finished_at)),
        ("seal", span(t.script_finished_at, t.sealed_at)),
        ("snapshot", span(t.sealed_at, t.image_ready_at)),
        ("total", span(t.created_at, t.finished_at)),
    ]
    .into_iter()
    .filter_map(|(n, d)| d.map(|d| (n, d)))
    .collect()
}

/// What `kiln build start` was asked, in either mode.
#[derive(Debug)]
pub struct StartArgs {
    pub generator: Option<String>,
    pub file: Option<std::path::PathBuf>,
    pub base_images: Vec<String>,
    pub revision: Option<u32>,
    pub clouds: Vec<String>,
    pub wait: bool,
}

/// Saves the generator file (or base-image overrides) as a new revision when
/// it differs from the latest, starts the build, and optionally waits.
pub async fn start_build(client: &Client, output: Output, args: StartArgs) -> anyhow::Result<i32> {
    let mut revision = args.revision;
    let name = match (&args.file, &args.generator) {
        (Some(file), given) => {
            let spec = GeneratorFile::load(file)?;
            if let Some(g) = given.as_deref().filter(|g| *g != spec.name.as_str()) {
                bail!("{} defines generator {}, not {g}", file.display(), spec.name);
            }
            let name = spec.name.to_string();
            let spec = with_base_images(spec, &args.base_images)?;
            revision = Some(save_if_changed(client, spec).await?);
            name
        }
        (None, Some(name)) => {
            if !args.base_images.is_empty() {
                let latest: Revision = client.get(&format!("/v1/generators/{name}")).await?;
                let spec = with_base_images(latest.spec, &args.base_images)?;
                revision = Some(save_if_changed(client, spec).await?);
            }
            name.clone()
        }
        (None, None) => bail!("name a generator or give --file"),
    };
    let clouds: Vec<CloudName> = args.clouds.iter().map(|c| c.parse()).collect::<Result<_, _>>()?;
    let passwords = ask_passwords(client, &name, revision, &clouds).await?;
    let req = BuildRequest { generator: name.parse()?, revision, clouds, passwords };
    let b: Build = client.post("/v1/builds", &req).await?;
    if !args.wait {
        print(output, &b, build_table);
        return Ok(0);
    }
    eprintln!("build {} of {} revision {}", b.id, b.generator, b.revision);
    let done = super::wait::until_done(client, b.id).await?;
    print(output, &done, build_table);
    Ok(if done.status == Status::Successful { 0 } else { 1 })
}

fn with_base_images(mut spec: GeneratorSpec, overrides: &[String]) -> anyhow::Result<GeneratorSpec> {
    for o in overrides {
        let (cloud, image) = o.split_once('=').with_context(|| format!("--base-image {o:?} is not CLOUD=IMAGE"))?;
        let target = spec.targets.entry(cloud.parse()?).or_insert_with(|| TargetSpec {
            base_image: String::new(),
            instance_type: None,
            network: None,
            options: BTreeMap::new(),
        });
        target.base_image = image.to_owned();
    }
    Ok(spec)
}

/// The revision to build: the latest when it equals `spec`, else a new one.
/// A spec with `secret_env` always makes a new revision: the saved values are
/// never returned, so whether they changed cannot be told.
async fn save_if_changed(client: &Client, spec: GeneratorSpec) -> anyhow::Result<u32> {
    let latest: anyhow::Result<Revision> = client.get(&format!("/v1/generators/{}", spec.name)).await;
    let saved: Revision = match latest {
        Ok(r) if r.spec == spec => return Ok(r.number),
        Ok(_) => client.put(&format!("/v1/generators/{}", spec.name), &spec).await?,
        Err(e) if is_not_found(&e) => client.post("/v1/generators", &spec).await?,
        Err(e) => return Err(e),
    };
    eprintln!("saved generator {} revision {}", saved.generator, saved.number);
    Ok(saved.number)
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiFailure>().is_some_and(|f| f.status == reqwest::StatusCode::NOT_FOUND)
}

async fn image(client: &Client, output: Output, command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::List => {
            let images: Vec<Image> = client.get("/v1/images").await?;
            print(output, &images, |is| {
                let mut t = Table::new(&["name", "cloud", "created", "size", "generator", "id"]);
                for i in is {
                    t.row(vec![
                        i.name.clone(),
                        i.cloud.to_string(),
                        i.created_at.to_string(),
                        i.size_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
                        format!("{} r{}", i.provenance.generator, i.provenance.revision),
                        i.id.clone(),
                    ]);
                }
                t
            });
        }
        ImageCommand::Show { name } => {
            let i: Image = client.get(&format!("/v1/images/{name}")).await?;
            print(output, &i, image_table);
        }
        ImageCommand::Rm { name } => {
            client.delete(&format!("/v1/images/{name}")).await?;
            eprintln!("image {name} deleted");
        }
    }
    Ok(())
}

fn image_table(i: &Image) -> Table {
    let size = |n: Option<u64>| n.map(human_bytes).unwrap_or_else(|| "-".into());
    pairs(&[
        ("name", i.name.clone()),
        ("id", i.id.clone()),
        ("cloud", i.cloud.to_string()),
        ("created", i.created_at.to_string()),
        ("size", size(i.size_bytes)),
        ("disk size", size(i.virtual_size_bytes)),
        ("sha256", i.sha256.clone().unwrap_or_else(|| "-".into())),
        ("generator", format!("{} revision {}", i.provenance.generator, i.provenance.revision)),
        ("script sha256", i.provenance.script_sha256.clone()),
        ("base image", i.provenance.base_image.clone()),
        ("build", i.provenance.build.to_string()),
        ("target", i.provenance.target.to_string()),
    ])
}

fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    UNITS
        .iter()
        .find(|(_, size)| n >= *size)
        .map(|(unit, size)| format!("{:.1} {unit}", n as f64 / *size as f64))
        .unwrap_or_else(|| format!("{n} B"))
}

/// The access key to store with a cloud: the id from the command line, the
/// secret from KILN_SECRET_ACCESS_KEY or a prompt that does not echo.
fn credentials_from(access_key_id: Option<String>) -> anyhow::Result<Option<kiln_protocol::api::CloudCredentials>> {
    let Some(access_key_id) = access_key_id else { return Ok(None) };
    let secret_access_key = match std::env::var("KILN_SECRET_ACCESS_KEY") {
        Ok(s) => s,
        Err(_) => rpassword::prompt_password(format!("secret access key for {access_key_id}: "))
            .context("cannot read the secret access key")?,
    };
    anyhow::ensure!(!secret_access_key.is_empty(), "the secret access key is empty");
    Ok(Some(kiln_protocol::api::CloudCredentials::AccessKey { access_key_id, secret_access_key }))
}

/// Passwords of the build's clouds that ask for one at every build: from
/// `KILN_PASSWORD_<CLOUD>` (upper case, `-` and `.` as `_`) or a prompt
/// without echo. They go into this one request and nowhere else.
async fn ask_passwords(
    client: &Client,
    generator: &str,
    revision: Option<u32>,
    clouds: &[CloudName],
) -> anyhow::Result<BTreeMap<CloudName, Secret>> {
    let path = match revision {
        Some(n) => format!("/v1/generators/{generator}/revisions/{n}"),
        None => format!("/v1/generators/{generator}"),
    };
    let rev: Revision = client.get(&path).await?;
    let names: Vec<CloudName> =
        if clouds.is_empty() { rev.spec.targets.keys().cloned().collect() } else { clouds.to_vec() };
    let mut out = BTreeMap::new();
    for name in names {
        let Ok(cloud) = client.get::<Cloud>(&format!("/v1/clouds/{name}")).await else { continue };
        if cloud.options.get("ask_password").is_none_or(|v| v != "true") {
            continue;
        }
        let var = format!("KILN_PASSWORD_{}", name.as_str().to_uppercase().replace(['-', '.'], "_"));
        let password = match std::env::var(&var) {
            Ok(p) => p,
            Err(_) => {
                let user = cloud.options.get("user").map(String::as_str).unwrap_or("?");
                rpassword::prompt_password(format!("password of {user} on cloud {name}: "))
                    .with_context(|| format!("cannot read the password of cloud {name}; or set {var}"))?
            }
        };
        out.insert(name, Secret(password));
    }
    Ok(out)
}

/// A password to store with a cloud: from KILN_CLOUD_PASSWORD or a prompt that does not echo.
fn password_from_prompt(cloud: &str) -> anyhow::Result<kiln_protocol::api::CloudCredentials> {
    let password = match std::env::var("KILN_CLOUD_PASSWORD") {
        Ok(p) => p,
        Err(_) => rpassword::prompt_password(format!("password to store for cloud {cloud}: "))
            .context("cannot read the password")?,
    };
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    Ok(kiln_protocol::api::CloudCredentials::Password { password })
}
