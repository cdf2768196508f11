//! `kiln-agent`: runs inside a build VM, talks only to the coordinator over
//! mutual TLS. It enrolls with a one-time token, fetches its job, runs the
//! script while streaming its spooled output, reports the exit, then finishes
//! or seals (removes itself and every secret, powers off) on instruction.
//!
//! Exit codes: 0 finished, 1 other errors, 2 enrollment refused, 3 target
//! ended, 4 refused to seal.

mod cli;
mod client;
mod coordinator;
mod egress;
mod enroll;
mod identity;
mod layout;
mod run;
mod script;
mod seal;
mod spool;
mod stop;
mod stream;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing::{Instrument, error, info_span};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = match cli::Args::try_parse() {
        Ok(args) => args,
        // Not clap's usual 2: that code means "enrollment refused".
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() { ExitCode::FAILURE } else { ExitCode::SUCCESS };
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Agent output lands on serial consoles and in logs that errors quote:
        // colour only on an interactive terminal that asks for it.
        .with_ansi(
            std::io::stderr().is_terminal() && std::env::var_os("KILN_AGENT_COLOR").is_some_and(|v| v == "always"),
        )
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,hickory_proto=warn,hickory_resolver=warn")),
        )
        .init();
    let span = info_span!("kiln_agent", target = %args.target);

    let result = cli::take_enroll_token().and_then(|token| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(run::run(args, token).instrument(span.clone()))
    });
    let _entered = span.enter();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::from(stop::exit_code(&err))
        }
    }
}
