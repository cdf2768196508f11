//! One run of the agent, phase by phase: enroll, fetch the job, run it
//! while streaming its output, report the exit, then finish or seal.

use std::fs::File;

use anyhow::{Context, anyhow};
use kiln_protocol::agent::{ExitReport, Instruction, Job, ScriptOutcome};
use tokio::sync::{oneshot, watch};
use tracing::{Instrument, error, info};

use crate::cli::{Args, NEVER_POWEROFF_ENV};
use crate::client::{Api, Retry, RetryPolicy};
use crate::coordinator::{self, CoordinatorLog, ExitAnswer};
use crate::egress::Egress;
use crate::layout::Layout;
use crate::stop::Stop;
use crate::stream::Shipper;
use crate::{enroll, identity, script, seal};

pub async fn run(args: Args, token: String) -> anyhow::Result<()> {
    let dir = std::path::absolute(&args.dir).context("resolving --dir")?;
    let layout = Layout::new(&dir);
    let ca = std::fs::read(&args.ca).with_context(|| format!("reading the CA certificate {}", args.ca.display()))?;
    let policy = RetryPolicy {
        max_backoff: std::time::Duration::from_millis(args.max_backoff_ms),
        give_up: std::time::Duration::from_secs(args.give_up_secs),
    };

    let anonymous = Api::anonymous(args.coordinator.clone(), args.target, &ca, policy)?;
    let identity = match args.identity {
        Some(source) => identity::read(source, &args.imds).await,
        None => None,
    };
    let credentials = enroll::enroll(&anonymous, token, identity).await?;
    let api =
        Api::authenticated(args.coordinator, args.target, &ca, &credentials.cert_pem, &credentials.key_pem, policy)?;
    drop(credentials);

    let job = coordinator::fetch_job(&api).await?;
    let generalize = job.generalize;
    match run_and_report(&api, &layout, job).await {
        Err(err) if matches!(Stop::find(&err), Some(Stop::TargetEnded)) => {
            if let Err(cleanup) = seal::finish(&layout) {
                error!("cleaning up: {cleanup:#}");
            }
            return Err(err);
        }
        other => other?,
    }

    match coordinator::next_instruction(&api, args.instruction_wait_secs).await? {
        Instruction::Seal if std::env::var_os(NEVER_POWEROFF_ENV).is_some_and(|v| v == "1") => {
            seal::finish(&layout)?;
            Err(Stop::RefusedToSeal.into())
        }
        Instruction::Seal => seal::seal(&api, &layout, generalize).await,
        Instruction::Finish | Instruction::Wait => seal::finish(&layout),
    }
}

/// Runs the script while its output streams, then reports how it ended once
/// the coordinator holds every byte.
async fn run_and_report(api: &Api, layout: &Layout, job: Job) -> anyhow::Result<()> {
    layout.prepare().context("preparing the job's directories")?;
    let spool = File::open(&layout.spool_file).context("opening the spool")?;
    let mut shipper = Shipper::new(CoordinatorLog { api }, spool, api.retry);

    let egress = Egress::configure(&job, std::path::Path::new("/"));
    info!(timeout_secs = job.timeout_secs, "running the script");
    let (ended_tx, mut ended) = watch::channel(false);
    let (abort, abort_rx) = oneshot::channel();
    let runner = {
        let layout = layout.clone();
        tokio::spawn(
            async move {
                let outcome = script::run(&job, &layout, abort_rx).await;
                let _ = ended_tx.send(true);
                outcome
            }
            .in_current_span(),
        )
    };
    let shipped = shipper.ship(&mut ended).await;
    if shipped.is_err() {
        let _ = abort.send(());
    }
    let outcome = runner.await;
    if let Err(e) = egress.remove() {
        error!("removing the egress proxy's configuration: {e}");
    }
    let mut total = shipped?;
    let outcome: ScriptOutcome = outcome.map_err(|err| anyhow!("the script runner failed: {err}"))?;
    info!(%outcome, bytes = total, "script ended; output committed");

    let mut retry = Retry::new(api.retry, "reporting the exit");
    loop {
        let report = ExitReport { outcome: outcome.clone(), total_bytes: total };
        match coordinator::report_exit(api, &report).await? {
            ExitAnswer::Accepted => return Ok(()),
            ExitAnswer::Resync(committed) => {
                info!(committed, total, "the coordinator lacks output: streaming again");
                if committed == total {
                    retry
                        .after(anyhow!("the exit report was refused although all {total} bytes are committed"))
                        .await?;
                }
                shipper.resync(committed);
                total = shipper.ship(&mut ended).await?;
            }
        }
    }
}
