//! The agent's calls to the coordinator after enrollment, with what each
//! answer means.

use std::time::Duration;

use anyhow::anyhow;
use kiln_protocol::agent::{ExitReport, Instruction, InstructionWait, Job, LogAck, LogOffset, SealReport, paths};
use kiln_protocol::error::ErrorBody;
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use tracing::{info, warn};

use crate::client::{Api, Failure, RetryPolicy, error_body, retry, send, unexpected};
use crate::stop::Stop;
use crate::stream::{LogSink, Put};

/// How long the coordinator gets beyond `wait_secs` to answer a long poll.
const LONG_POLL_GRACE: Duration = Duration::from_secs(30);
/// The least time between two instruction polls, should the coordinator answer at once.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long the sealing notice is retried before sealing goes on without it.
const SEALING_NOTICE_LIMIT: Duration = Duration::from_secs(10);
/// How long the seal report is retried before the agent powers off without it
/// (and the coordinator then makes no image).
const SEALED_REPORT_LIMIT: Duration = Duration::from_secs(60);

fn ended() -> Failure {
    Failure::Fatal(Stop::TargetEnded.into())
}

/// Fetches this target's job.
pub async fn fetch_job(api: &Api) -> anyhow::Result<Job> {
    let url = api.url(&paths::job(api.target));
    let job = retry(api.retry, "fetching the job", || async {
        let response = send(api.http().get(url.clone())).await?;
        match response.status() {
            status if status.is_success() => Ok(response.json::<Job>().await?),
            StatusCode::FORBIDDEN => Err(ended()),
            _ => Err(unexpected(response).await),
        }
    })
    .await?;
    if job.target != api.target {
        anyhow::bail!("the coordinator sent the job of target {}, not of this one", job.target);
    }
    Ok(job)
}

/// The coordinator's log endpoint.
pub struct CoordinatorLog<'a> {
    pub api: &'a Api,
}

impl LogSink for CoordinatorLog<'_> {
    async fn put(&self, offset: u64, bytes: Vec<u8>) -> Result<Put, Failure> {
        let request = self
            .api
            .http()
            .put(self.api.url(&paths::log(self.api.target)))
            .query(&LogOffset { offset })
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(bytes);
        let response = send(request).await?;
        match response.status() {
            status if status.is_success() => Ok(Put::Committed(response.json::<LogAck>().await?.committed)),
            StatusCode::CONFLICT => match error_body(response).await {
                (Some(ErrorBody { committed: Some(committed), .. }), _) => Ok(Put::Mismatch(committed)),
                (_, message) => {
                    Err(Failure::Transient(anyhow!("a log chunk was refused without a committed offset: {message}")))
                }
            },
            StatusCode::FORBIDDEN => Err(ended()),
            _ => Err(unexpected(response).await),
        }
    }
}

/// What the coordinator said to an exit report.
pub enum ExitAnswer {
    Accepted,
    /// Not all output is committed: stream again from this offset.
    Resync(u64),
}

pub async fn report_exit(api: &Api, report: &ExitReport) -> anyhow::Result<ExitAnswer> {
    let url = api.url(&paths::exit(api.target));
    retry(api.retry, "reporting the exit", || async {
        let response = send(api.http().post(url.clone()).json(report)).await?;
        match response.status() {
            status if status.is_success() => Ok(ExitAnswer::Accepted),
            StatusCode::CONFLICT => match error_body(response).await {
                (Some(ErrorBody { committed: Some(committed), .. }), _) => Ok(ExitAnswer::Resync(committed)),
                (_, message) => Err(Failure::Fatal(anyhow!("the exit report was refused: {message}"))),
            },
            StatusCode::FORBIDDEN => Err(ended()),
            _ => Err(unexpected(response).await),
        }
    })
    .await
}

/// Long-polls until the coordinator says to seal or to finish. A `403`
/// (the target has ended) counts as finish.
pub async fn next_instruction(api: &Api, wait_secs: u64) -> anyhow::Result<Instruction> {
    let url = api.url(&paths::instruction(api.target));
    let timeout = Duration::from_secs(wait_secs) + LONG_POLL_GRACE;
    loop {
        let next_poll = tokio::time::Instant::now() + MIN_POLL_INTERVAL;
        let instruction = retry(api.retry, "waiting for an instruction", || async {
            let request =
                api.http().get(url.clone()).query(&InstructionWait { wait_secs: Some(wait_secs) }).timeout(timeout);
            let response = send(request).await?;
            match response.status() {
                status if status.is_success() => Ok(response.json::<Instruction>().await?),
                StatusCode::FORBIDDEN => {
                    info!("the target has ended: finishing");
                    Ok(Instruction::Finish)
                }
                _ => Err(unexpected(response).await),
            }
        })
        .await?;
        if instruction != Instruction::Wait {
            return Ok(instruction);
        }
        tokio::time::sleep_until(next_poll).await;
    }
}

/// Tells the coordinator the agent is about to power off; best effort.
pub async fn announce_sealing(api: &Api) {
    let policy = RetryPolicy { give_up: SEALING_NOTICE_LIMIT, ..api.retry };
    let url = api.url(&paths::sealing(api.target));
    let sent = retry(policy, "announcing the seal", || async {
        let response = send(api.http().post(url.clone())).await?;
        if response.status().is_success() { Ok(()) } else { Err(unexpected(response).await) }
    })
    .await;
    if let Err(err) = sent {
        warn!("sealing without telling the coordinator: {err:#}");
    }
}

/// Reports the finished seal; the coordinator makes the image only after it.
pub async fn report_sealed(api: &Api, report: &SealReport) {
    let policy = RetryPolicy { give_up: SEALED_REPORT_LIMIT, ..api.retry };
    let url = api.url(&paths::sealed(api.target));
    let sent = retry(policy, "reporting the seal", || async {
        let response = send(api.http().post(url.clone()).json(report)).await?;
        match response.status() {
            status if status.is_success() => Ok(()),
            StatusCode::FORBIDDEN => Err(ended()),
            _ => Err(unexpected(response).await),
        }
    })
    .await;
    if let Err(err) = sent {
        warn!("powering off without reporting the seal: {err:#}");
    }
}
