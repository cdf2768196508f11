//! The `kiln` command line. Every command but `serve` is a client of the HTTP
//! API; `serve` runs the coordinator in this process.

mod client;
mod commands;
mod generator_file;
mod oneshot;
mod output;
pub mod relay;
mod serve;
mod token;
mod wait;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

pub use client::Client;
pub use commands::phases;
pub use generator_file::GeneratorFile;
pub use serve::builtin_providers;

/// Build consistent VM images on many clouds at once, without SSH.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    /// The coordinator's API.
    #[arg(long, global = true, env = "KILN_SERVER")]
    pub server: Option<String>,
    /// The API token to send (default: on this machine, the admin token in
    /// the data directory, `$KILN_DATA_DIR` or `.kiln-data`).
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The CA certificate (PEM) of an `https://` coordinator (default: kiln's
    /// own CA in the local data directory).
    #[arg(long, global = true, env = "KILN_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// How to print results.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator: API, agent listener, workflows.
    Serve(serve::ServeArgs),
    /// Configure target clouds.
    #[command(subcommand)]
    Cloud(CloudCommand),
    /// Manage generators: a script plus a base image per cloud.
    #[command(subcommand)]
    Generator(GeneratorCommand),
    /// Start and watch builds.
    #[command(subcommand)]
    Build(BuildCommand),
    /// The images builds made.
    #[command(subcommand)]
    Image(ImageCommand),
    /// API tokens and their roles (admin).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Remove what a crash left on the clouds: resources this coordinator made
    /// whose target has ended or is unknown (admin).
    Janitor {
        /// List what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Internal: QEMU runs this for each guest connection to kiln's guest-side
    /// address; it relays the connection to a socket in the data directory.
    #[command(hide = true)]
    GuestRelay {
        socket: PathBuf,
        /// Name the target to the egress proxy first.
        #[arg(long)]
        target: Option<kiln_protocol::TargetId>,
        /// Hold one of a bounded number of lock slots in this directory.
        #[arg(long)]
        slots: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List images with their provenance.
    List,
    /// Show an image.
    Show { name: String },
    /// Delete an image from its cloud.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum CloudCommand {
    /// Add a cloud.
    Add {
        name: String,
        /// The provider: qemu, ec2 (also EC2-compatible clouds such as Nimbus) or openstack.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        region: Option<String>,
        /// The API endpoint (EC2-compatible clouds).
        #[arg(long)]
        endpoint: Option<String>,
        /// A provider-specific setting, KEY=VALUE (repeatable).
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
        /// Store an access key for this cloud (EC2); the secret is read from
        /// KILN_SECRET_ACCESS_KEY or asked for without echo.
        #[arg(long, conflicts_with = "store_password")]
        access_key_id: Option<String>,
        /// Store the password of the cloud's `user` (OpenStack), read from
        /// KILN_CLOUD_PASSWORD or asked for without echo. Leave it out and
        /// set `--option ask_password=true` to be asked at every build instead.
        #[arg(long)]
        store_password: bool,
    },
    /// List clouds.
    List,
    /// Show a cloud.
    Show { name: String },
    /// Remove a cloud.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum GeneratorCommand {
    /// Create a generator from a TOML file next to its script.
    Create(GeneratorSource),
    /// Save a new revision of a generator from its TOML file.
    Update(GeneratorSource),
    /// Show a generator's latest (or a given) revision.
    Show {
        name: String,
        #[arg(long)]
        revision: Option<u32>,
    },
    /// List generators.
    List,
    /// List a generator's revisions.
    Revisions { name: String },
}

#[derive(Debug, Args)]
pub struct GeneratorSource {
    /// The generator's TOML file; its `script` is a path relative to it.
    #[arg(long, short)]
    pub file: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum BuildCommand {
    /// Build a generator's revision on some or all of its clouds.
    ///
    /// Without --server this is one-shot, like `packer build`: a coordinator
    /// runs in this process on --data-dir, creates the `local` QEMU cloud if
    /// needed, saves --file as a new revision when it changed, builds, and stops.
    Start {
        /// The generator's name (or give --file).
        #[arg(required_unless_present = "file")]
        generator: Option<String>,
        /// A generator TOML file: saved as a new revision first when it changed.
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// Override a target's base image, CLOUD=IMAGE (repeatable).
        #[arg(long = "base-image", value_name = "CLOUD=IMAGE")]
        base_images: Vec<String>,
        #[command(flatten)]
        oneshot: oneshot::OneShotArgs,
        /// The revision (default: the latest).
        #[arg(long)]
        revision: Option<u32>,
        /// A cloud to build on (repeatable; default: all of the generator's).
        #[arg(long = "cloud")]
        clouds: Vec<String>,
        /// Show progress until the build ends; exit non-zero if a target failed.
        #[arg(long)]
        wait: bool,
    },
    /// List builds, newest first.
    List {
        #[arg(long)]
        generator: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show a build: per cloud its state, timings, image and error.
    Show { id: String },
    /// Print a target's log (give a target id, or a build id and --cloud).
    Logs {
        id: String,
        #[arg(long)]
        cloud: Option<String>,
        /// Keep printing as the log grows, until the target ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a build: its targets unwind and end cancelled.
    Cancel { id: String },
}

/// Where client commands look for the coordinator when --server is not given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7700";

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match (cli.command, cli.server) {
        (Command::Serve(args), _) => serve::run(args).await.map(|()| 0),
        (Command::GuestRelay { socket, target, slots }, _) => {
            tokio::task::spawn_blocking(move || relay::run(&socket, target, slots.as_deref())).await?.map(|()| 0)
        }
        (
            Command::Build(BuildCommand::Start { generator, file, base_images, oneshot, revision, clouds, wait: _ }),
            None,
        ) => {
            let start = commands::StartArgs { generator, file, base_images, revision, clouds, wait: true };
            oneshot::run(oneshot, cli.output, start).await
        }
        (command, server) => {
            let server = server.as_deref().unwrap_or(DEFAULT_SERVER);
            let ca = if server.starts_with("https://") { token::find_ca(cli.ca_cert) } else { None };
            let mut client = match ca {
                Some(ca) => {
                    let pem = std::fs::read(&ca).with_context(|| format!("cannot read the CA {}", ca.display()))?;
                    Client::with_ca(server, &pem)?
                }
                None => Client::new(server)?,
            };
            if let Some(t) = token::find_token(cli.token, server)? {
                client = client.with_token(t);
            }
            match command {
                Command::Token(t) => token::run(&client, cli.output, t).await.map(|()| 0),
                command => commands::run(&client, cli.output, command).await,
            }
        }
    }
}
