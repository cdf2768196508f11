//! `kiln token create|list|revoke`, and how the other commands find their token.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use kiln_protocol::access::{ApiToken, CreatedToken, Role, TokenRequest};

use super::output::{Table, pairs, print};
use super::{Client, Output};
use crate::app::access::ADMIN_TOKEN_FILE;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make an API token and print its secret (shown this once).
    Create {
        /// Says whose or what the token is.
        #[arg(long)]
        name: String,
        /// viewer reads; builder also saves generators and starts and cancels
        /// builds; admin also manages clouds, images and tokens.
        #[arg(long)]
        role: Role,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token; page sessions made with it end too.
    Revoke { id: String },
}

pub async fn run(client: &Client, output: Output, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { name, role } => {
            let created: CreatedToken = client.post("/v1/tokens", &TokenRequest { name, role }).await?;
            print(output, &created, |c| {
                pairs(&[
                    ("id", c.token.id.clone()),
                    ("name", c.token.name.clone()),
                    ("role", c.token.role.to_string()),
                    ("secret", c.secret.clone()),
                ])
            });
            if output == Output::Table {
                eprintln!("keep the secret now: kiln stores only its hash");
            }
        }
        TokenCommand::List => {
            let tokens: Vec<ApiToken> = client.get("/v1/tokens").await?;
            print(output, &tokens, |ts| {
                let mut t = Table::new(&["id", "name", "role", "created"]);
                for tok in ts {
                    t.row(vec![tok.id.clone(), tok.name.clone(), tok.role.to_string(), tok.created_at.to_string()]);
                }
                t
            });
        }
        TokenCommand::Revoke { id } => {
            client.delete(&format!("/v1/tokens/{id}")).await?;
            eprintln!("token {id} revoked");
        }
    }
    Ok(())
}

/// The data directory a client on this machine looks in: `$KILN_DATA_DIR`,
/// else `.kiln-data` (the default of `kiln serve`).
fn local_data_dir() -> PathBuf {
    std::env::var_os("KILN_DATA_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| ".kiln-data".into())
}

/// The token a client command sends: `--token`/`KILN_TOKEN`, else, for a
/// coordinator on this machine, the admin token `kiln serve` wrote at first start.
pub fn find_token(given: Option<String>, server: &str) -> anyhow::Result<Option<String>> {
    if let Some(t) = given.filter(|t| !t.trim().is_empty()) {
        return Ok(Some(t));
    }
    if !is_local(server) {
        return Ok(None);
    }
    let path = local_data_dir().join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(Some(t.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read the admin token {}", path.display())),
    }
}

/// The CA an `https://` coordinator's certificate is checked against:
/// `--ca-cert`, else kiln's own CA in the local data directory.
pub fn find_ca(given: Option<PathBuf>) -> Option<PathBuf> {
    given.or_else(|| Some(local_data_dir().join("pki/ca.crt")).filter(|p| Path::new(p).exists()))
}

fn is_local(server: &str) -> bool {
    let rest = server.split_once("://").map_or(server, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    matches!(crate::api::auth::host_of(authority), "localhost" | "127.0.0.1" | "::1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_servers_are_local() {
        for local in ["http://127.0.0.1:7700", "https://localhost:7700/", "http://[::1]:7700"] {
            assert!(is_local(local), "{local}");
        }
        for remote in ["https://kiln.example:7700", "http://10.0.0.5:7700", "http://127.0.0.1.evil.example"] {
            assert!(!is_local(remote), "{remote}");
        }
    }
}
