//! The step table and the forward steps. Each step is idempotent: run twice,
//! it does the same thing.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use kiln_protocol::Timestamp;
use kiln_protocol::agent::{Instruction, ScriptOutcome, SealReport};
use kiln_protocol::api::{FailureReason, Image, Provenance, Status, Step};
use tokio::time::Instant;

use super::StepError;
use super::context::StepContext;
use super::plan::{Row, Undo};
use super::wait::{Look, LookError, Wait};
use crate::failpoint;
use crate::providers::{ImageId, ImageInfo, ImageProgress, InstanceId, InstanceState, Launch, ProviderError};
use crate::store::records::TargetRecord;

/// Extra time past the script's timeout before the coordinator gives up on
/// an agent that has not reported (the agent enforces the timeout itself).
const REPORT_GRACE: Duration = Duration::from_secs(120);
/// How many log lines a failure message quotes.
const TAIL_LINES: usize = 20;

/// A step's forward action.
pub(super) type Forward =
    for<'a> fn(&'a StepContext) -> Pin<Box<dyn Future<Output = Result<(), StepError>> + Send + 'a>>;

/// The saga, in order: each step once, with its forward action and its undo
/// (omicron's `+ do - undo`). The order, "recorded" and the unwind are
/// derived from this table ([`super::plan`]); a new resource is one row here
/// plus its functions.
pub(super) const SAGA: &[Row<Forward>] = &[
    // + launch the instance - terminate it
    Row { step: Step::Launch, forward: |c| Box::pin(launch(c)), undo: Some(Undo::TerminateInstance), commits: false },
    Row { step: Step::AwaitAgent, forward: |c| Box::pin(await_agent(c)), undo: None, commits: false },
    Row { step: Step::Run, forward: |c| Box::pin(run_script(c)), undo: None, commits: false },
    Row { step: Step::Seal, forward: |c| Box::pin(seal(c)), undo: None, commits: false },
    // + make the image - delete the half-made image
    Row { step: Step::Snapshot, forward: |c| Box::pin(snapshot(c)), undo: Some(Undo::DeleteImage), commits: false },
    // Past this step the image is the output, and it is never undone.
    Row { step: Step::Record, forward: |c| Box::pin(record(c)), undo: None, commits: true },
    Row { step: Step::CleanUp, forward: |c| Box::pin(clean_up(c)), undo: None, commits: false },
];

/// The table's row for `step`.
pub(super) fn row(step: Step) -> Option<&'static Row<Forward>> {
    SAGA.iter().find(|r| r.step == step)
}

/// Retries transient provider errors with backoff; others fail the target.
/// For one-off calls; waits poll through [`Wait`] instead.
async fn call<T, F, Fut>(what: &str, f: F) -> Result<T, StepError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ProviderError>>,
{
    f.retry(ExponentialBuilder::default().with_min_delay(Duration::from_millis(500)).with_max_times(6).with_jitter())
        .when(ProviderError::is_transient)
        .notify(|e, after| tracing::warn!(error = %e, ?after, "{what}: retrying"))
        .await
        .map_err(|e| StepError::fail(FailureReason::Provider, format!("{what}: {e}")))
}

pub(super) fn provenance(t: &TargetRecord, script_sha256: String) -> Provenance {
    Provenance {
        build: t.build,
        target: t.id,
        generator: t.generator.clone(),
        revision: t.revision,
        script_sha256,
        cloud: t.cloud.name.clone(),
        base_image: t.spec.base_image.clone(),
    }
}

fn remaining(since: Option<Timestamp>, limit: Duration) -> Instant {
    let since = since.unwrap_or_else(Timestamp::now);
    let elapsed = Timestamp::now().duration_since(since);
    let left = limit.saturating_sub(Duration::try_from(elapsed).unwrap_or_default());
    Instant::now() + left
}

async fn launch(c: &StepContext) -> Result<(), StepError> {
    let t = &c.t;
    c.advance(|r| r.status = Status::Running).await?;
    let token = c.offer_token().await?;

    let endpoints = c.provider.endpoints(&t.cloud, c.served());
    let user_data = c.user_data(&endpoints, &token)?;
    let provenance = provenance(t, c.script_sha256()?);
    let request = Launch {
        target: t.id,
        build: t.build,
        cloud: &t.cloud,
        spec: &t.spec,
        user_data,
        endpoints,
        name: format!("kiln-{}-r{}-{}", t.generator, t.revision, t.id),
        provenance: &provenance,
    };
    failpoint::hit("launch:before-call").await;
    let id = call("launch", || c.provider.launch(&request)).await?;
    failpoint::hit("launch:after-call").await;
    tracing::info!(instance = %id, "launched");
    c.complete(|r| {
        r.instance = Some(id.0.clone());
        r.timings.launched_at.get_or_insert(Timestamp::now());
    })
    .await?;
    Ok(())
}

/// Waits for `ready` while watching the instance; fails at `deadline`.
async fn wait_for(
    c: &StepContext,
    deadline: Instant,
    ready: impl Fn(&TargetRecord) -> bool,
    on_stopped: impl Fn(String) -> StepError,
    on_timeout: impl Fn(String) -> StepError,
) -> Result<TargetRecord, StepError> {
    let instance = c.instance()?;
    let wait = Wait { what: "instance state", poll: c.poll_interval(), deadline, changes: Some(c.subscribe_changes()) };
    let found = wait
        .until(|due| {
            let (ready, instance) = (&ready, &instance);
            async move {
                let r = c.record()?;
                if r.error.is_some() {
                    return Err(StepError::Interrupted.into());
                }
                if ready(&r) {
                    return Ok(Look::Ready(Ok(r)));
                }
                if due
                    && matches!(
                        c.provider.state(&c.t.cloud, instance).await?,
                        InstanceState::Stopped | InstanceState::Gone
                    )
                {
                    // The agent may have reported just before the instance stopped.
                    let r = c.record()?;
                    return Ok(Look::Ready(if ready(&r) { Ok(r) } else { Err(()) }));
                }
                Ok::<_, LookError>(Look::NotYet)
            }
        })
        .await?;
    match found {
        Some(Ok(r)) => Ok(r),
        Some(Err(())) => Err(on_stopped(console_tail(c, &instance).await)),
        None => Err(on_timeout(console_tail(c, &instance).await)),
    }
}

async fn console_tail(c: &StepContext, instance: &InstanceId) -> String {
    match c.provider.console_tail(&c.t.cloud, instance).await {
        Ok(tail) if tail.trim().is_empty() => "the console is empty".into(),
        Ok(tail) => format!("last console lines:\n{}", last_lines(&tail, TAIL_LINES)),
        Err(e) => format!("the console could not be read: {e}"),
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn await_agent(c: &StepContext) -> Result<(), StepError> {
    let limit = c.timeouts().agent_contact;
    let deadline = remaining(c.t.timings.launched_at, limit);
    wait_for(
        c,
        deadline,
        |r| r.enrolled,
        |tail| {
            StepError::fail(
                FailureReason::AgentUnreachable,
                format!("the instance stopped before its agent phoned home; {tail}"),
            )
        },
        |tail| {
            StepError::fail(
                FailureReason::AgentUnreachable,
                format!(
                    "the agent did not phone home within {}s: check that the image runs cloud-init or kiln's boot hook and that the instance can reach the coordinator; {tail}",
                    limit.as_secs()
                ),
            )
        },
    )
    .await?;
    c.complete(|_| {}).await?;
    Ok(())
}

async fn run_script(c: &StepContext) -> Result<(), StepError> {
    let t = &c.t;
    let timeout = c.script_timeout();
    let started = t.timings.script_started_at.or(t.timings.agent_contact_at);
    let deadline = remaining(started, timeout + REPORT_GRACE);
    let r = wait_for(
        c,
        deadline,
        |r| r.outcome.is_some(),
        |tail| StepError::fail(FailureReason::Internal, format!("the instance stopped while the script ran; {tail}")),
        |tail| {
            StepError::fail(
                FailureReason::Timeout,
                format!("the agent did not report within the script's timeout of {}s; {tail}", timeout.as_secs()),
            )
        },
    )
    .await?;
    let outcome = r.outcome.clone().expect("waited for an outcome");
    if outcome.succeeded() {
        let instruction = c.provider.after_script();
        c.complete(|r| r.instruction = instruction).await?;
        return Ok(());
    }
    c.advance(|r| r.instruction = Instruction::Finish).await?;
    let reason = match outcome {
        ScriptOutcome::TimedOut { .. } => FailureReason::Timeout,
        _ => FailureReason::ScriptFailed,
    };
    let tail_bytes = c.log_tail(4096).await;
    let tail = last_lines(&String::from_utf8_lossy(&tail_bytes), TAIL_LINES);
    let what = match &outcome {
        ScriptOutcome::TimedOut { after_secs } => {
            format!("the script ran past its timeout of {after_secs}s and was killed with its children")
        }
        other => format!("the script failed ({other})"),
    };
    Err(StepError::fail(reason, format!("{what}; last log lines:\n{tail}")))
}

/// Polls the instance until it has stopped (`true`), or until `deadline` (`false`).
async fn wait_stopped(c: &StepContext, instance: &InstanceId, deadline: Instant) -> Result<bool, StepError> {
    let wait = Wait { what: "instance state", poll: c.poll_interval(), deadline, changes: None };
    let stopped = wait
        .until(|_| async move {
            match c.provider.state(&c.t.cloud, instance).await? {
                InstanceState::Stopped => Ok(Look::Ready(())),
                InstanceState::Gone => Err(LookError::Step(StepError::fail(
                    FailureReason::Provider,
                    "the instance disappeared before it could be imaged",
                ))),
                InstanceState::Pending | InstanceState::Running => Ok(Look::NotYet),
            }
        })
        .await?;
    Ok(stopped.is_some())
}

async fn seal(c: &StepContext) -> Result<(), StepError> {
    let t = &c.t;
    let instance = c.instance()?;
    let limit = c.timeouts().seal;
    let mut forced = false;
    if !wait_stopped(c, &instance, remaining(t.timings.script_finished_at, limit)).await? {
        tracing::warn!("the instance did not power off after sealing; stopping it");
        call("stop", || c.provider.stop(&t.cloud, &instance)).await?;
        forced = true;
        if !wait_stopped(c, &instance, Instant::now() + limit).await? {
            let tail = console_tail(c, &instance).await;
            return Err(StepError::fail(
                FailureReason::Provider,
                format!("the instance did not stop within {}s of being stopped; {tail}", limit.as_secs()),
            ));
        }
    }
    // Sealed means powered off with the agent's report that every file
    // system was scrubbed: without it the disk may still hold the token and
    // whatever the script removed, so no image is made of it.
    if t.instruction == Instruction::Seal {
        let r = c.record()?;
        check_seal(r.seal.as_ref(), forced, limit)?;
    }
    let stopped = Timestamp::now();
    c.complete(|r| r.timings.sealed_at = Some(stopped)).await?;
    Ok(())
}

/// Whether an image may be made of a sealed target's disk.
fn check_seal(report: Option<&SealReport>, forced: bool, limit: Duration) -> Result<(), StepError> {
    let Some(report) = report else {
        let why = if forced {
            format!(
                "the agent had not finished sealing {}s after the script ended, so the instance was stopped",
                limit.as_secs()
            )
        } else {
            "the instance stopped before the agent reported a finished seal".to_owned()
        };
        return Err(StepError::fail(
            FailureReason::SealIncomplete,
            format!(
                "{why}; its disk may still hold the enrollment token and what the script removed, so no image was \
                 made (a large disk may need a longer `timeouts.seal`)"
            ),
        ));
    };
    let unscrubbed: Vec<String> = report
        .unscrubbed()
        .map(|s| format!("{} ({}): {}", s.mount, s.fs_type, s.error.as_deref().unwrap_or("failed")))
        .collect();
    if !unscrubbed.is_empty() {
        return Err(StepError::fail(
            FailureReason::SealIncomplete,
            format!(
                "the agent could not scrub the free space of {}; it may still hold the enrollment token and what \
                 the script removed, so no image was made",
                unscrubbed.join("; ")
            ),
        ));
    }
    if !report.read_only {
        tracing::warn!("the agent could not remount the file systems read-only; the image's may need a journal replay");
    }
    Ok(())
}

async fn snapshot(c: &StepContext) -> Result<(), StepError> {
    let t = &c.t;
    let instance = c.instance()?;
    let provenance = provenance(t, c.script_sha256()?);
    let name = format!("kiln-{}-r{}-{}", t.generator, t.revision, t.id);
    let image = match &t.image_id {
        Some(id) => ImageId(id.clone()),
        None => {
            failpoint::hit("start-image:before-call").await;
            let id = call("create image", || c.provider.start_image(&t.cloud, &instance, &name, &provenance)).await?;
            failpoint::hit("start-image:after-call").await;
            c.advance(|r| r.image_id = Some(id.0.clone())).await?;
            id
        }
    };
    let info = wait_image(c, &image).await?;
    failpoint::hit("wait-image:ready").await;
    let now = Timestamp::now();
    let record = Image {
        id: image.0.clone(),
        name: name.clone(),
        cloud: t.cloud.name.clone(),
        created_at: now,
        size_bytes: info.size_bytes,
        virtual_size_bytes: info.virtual_size_bytes,
        sha256: info.sha256.clone(),
        provenance,
    };
    tracing::info!(image = %image, "image ready");
    c.complete(|r| {
        r.image = Some(record.clone());
        r.timings.image_ready_at.get_or_insert(now);
    })
    .await?;
    Ok(())
}

/// Polls the image until it is usable.
async fn wait_image(c: &StepContext, image: &ImageId) -> Result<ImageInfo, StepError> {
    let limit = c.provider.image_timeout(&c.t.cloud);
    let deadline = remaining(c.t.timings.sealed_at, limit);
    let wait = Wait { what: "wait for image", poll: c.poll_interval(), deadline, changes: None };
    let info = wait
        .until(|_| async move {
            Ok::<_, LookError>(match c.provider.image_state(&c.t.cloud, image).await? {
                ImageProgress::Ready(info) => Look::Ready(info),
                ImageProgress::Pending => Look::NotYet,
            })
        })
        .await?;
    info.ok_or_else(|| {
        StepError::fail(
            FailureReason::Provider,
            format!("image {image} was not usable within {}s; raise the cloud's image_timeout_secs", limit.as_secs()),
        )
    })
}

async fn record(c: &StepContext) -> Result<(), StepError> {
    let image = c.t.image.clone().ok_or_else(|| StepError::fail(FailureReason::Internal, "no image to record"))?;
    // One transaction: the image is never recorded without the step moving
    // past it, so an unwind can never delete a recorded image.
    c.complete_with_output(&image).await
}

async fn clean_up(c: &StepContext) -> Result<(), StepError> {
    let t = &c.t;
    if let Some(instance) = t.instance.clone().map(InstanceId) {
        call("terminate", || c.provider.terminate(&t.cloud, &instance)).await?;
        failpoint::hit("terminate:after-call").await;
    }
    c.complete(|r| {
        r.status = Status::Successful;
        r.instruction = Instruction::Finish;
        r.timings.finished_at.get_or_insert(Timestamp::now());
    })
    .await?;
    tracing::info!("target successful");
    Ok(())
}
