//! The forward steps. Each is idempotent: run twice, it does the same thing.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use kiln_protocol::Timestamp;
use kiln_protocol::agent::{Instruction, ScriptOutcome, SealReport};
use kiln_protocol::api::{FailureReason, Image, Provenance, Status, Step};
use tokio::time::Instant;

use super::StepError;
use crate::app::App;
use crate::failpoint;
use crate::pki::TokenHash;
use crate::providers::{ImageId, ImageInfo, ImageProgress, InstanceId, InstanceState, Launch, Provider, ProviderError};
use crate::store::records::{TargetRecord, TokenRecord};

/// Extra time past the script's timeout before the coordinator gives up on
/// an agent that has not reported (the agent enforces the timeout itself).
const REPORT_GRACE: Duration = Duration::from_secs(120);
/// How many log lines a failure message quotes.
const TAIL_LINES: usize = 20;
/// Transient errors in a row that an image poll rides out before failing.
const MAX_TRANSIENT_POLLS: u32 = 10;

pub(super) async fn run(app: &App, t: &TargetRecord, step: Step) -> Result<(), StepError> {
    let provider = provider(app, t)?;
    let t = &with_credentials(app, t)?;
    match step {
        Step::Launch => launch(app, t, &provider).await,
        Step::AwaitAgent => await_agent(app, t, &provider).await,
        Step::Run => run_script(app, t, &provider).await,
        Step::Seal => seal(app, t, &provider).await,
        Step::Snapshot => snapshot(app, t, &provider).await,
        Step::Record => record(app, t).await,
        Step::CleanUp | Step::Done => return clean_up(app, t, &provider).await,
    }?;
    failpoint::hit(&format!("step-done:{}", step.as_str())).await;
    Ok(())
}

pub(super) fn provider(app: &App, t: &TargetRecord) -> Result<Arc<dyn Provider>, StepError> {
    app.0.providers.get(t.cloud.kind).ok_or_else(|| {
        StepError::fail(
            FailureReason::Internal,
            format!("this coordinator has no provider for clouds of kind {}", t.cloud.kind.as_str()),
        )
    })
}

/// The target with its cloud's credentials, which live apart from any record.
pub(super) fn with_credentials(app: &App, t: &TargetRecord) -> Result<TargetRecord, StepError> {
    let mut t = t.clone();
    t.cloud = app.with_credentials(&t.cloud, Some(t.build))?;
    Ok(t)
}

/// Retries transient provider errors with backoff; others fail the target.
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

/// Writes `f`'s change and flushes it before anything else happens.
async fn advance(app: &App, t: &TargetRecord, f: impl Fn(&mut TargetRecord)) -> Result<TargetRecord, StepError> {
    let r = app.0.store.update_target(t.id, f)?;
    app.0.store.flush().await?;
    app.notify();
    Ok(r)
}

fn instance(t: &TargetRecord) -> Result<InstanceId, StepError> {
    t.instance
        .clone()
        .map(InstanceId)
        .ok_or_else(|| StepError::fail(FailureReason::Internal, "the target has no instance"))
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

async fn launch(app: &App, t: &TargetRecord, provider: &Arc<dyn Provider>) -> Result<(), StepError> {
    advance(app, t, |r| r.status = Status::Running).await?;
    let token = app.0.pki.tokens().token(t.id);
    let expires_at = Timestamp::now() + app.0.config.timeouts.token_ttl;
    app.0.store.offer_token(&TokenHash::of(&token).0, &TokenRecord { target: t.id, expires_at })?;
    app.0.store.flush().await?;

    let endpoints = provider.endpoints(&t.cloud, &app.0.served);
    let user_data = app.user_data(t, &endpoints, &token).map_err(StepError::from)?;
    let rev = app.revision(&t.generator, Some(t.revision))?;
    let provenance = provenance(t, rev.script_sha256);
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
    let id = call("launch", || provider.launch(&request)).await?;
    failpoint::hit("launch:after-call").await;
    tracing::info!(instance = %id, "launched");
    advance(app, t, |r| {
        r.instance = Some(id.0.clone());
        r.step = Step::AwaitAgent;
        r.timings.launched_at.get_or_insert(Timestamp::now());
    })
    .await?;
    Ok(())
}

/// Waits for `ready` while watching the instance; fails at `deadline`.
async fn wait_for(
    app: &App,
    t: &TargetRecord,
    provider: &Arc<dyn Provider>,
    deadline: Instant,
    mut ready: impl FnMut(&TargetRecord) -> bool,
    on_stopped: impl Fn(String) -> StepError,
    on_timeout: impl Fn(String) -> StepError,
) -> Result<TargetRecord, StepError> {
    let instance = instance(t)?;
    let poll = provider.poll_interval(&t.cloud).unwrap_or(app.0.config.timeouts.poll_interval);
    let mut rx = app.0.changes.subscribe();
    let mut next_poll = Instant::now() + poll;
    loop {
        rx.mark_unchanged();
        let r = app.target_record(t.id)?;
        if r.error.is_some() {
            return Err(StepError::Interrupted);
        }
        if ready(&r) {
            return Ok(r);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(on_timeout(console_tail(provider, t, &instance).await));
        }
        if now >= next_poll {
            let state = call("instance state", || provider.state(&t.cloud, &instance)).await?;
            if matches!(state, InstanceState::Stopped | InstanceState::Gone) {
                // The agent may have reported just before the instance stopped.
                let r = app.target_record(t.id)?;
                if ready(&r) {
                    return Ok(r);
                }
                return Err(on_stopped(console_tail(provider, t, &instance).await));
            }
            next_poll = now + poll;
        }
        tokio::select! {
            _ = rx.changed() => {}
            () = tokio::time::sleep_until(deadline.min(next_poll)) => {}
        }
    }
}

async fn console_tail(provider: &Arc<dyn Provider>, t: &TargetRecord, instance: &InstanceId) -> String {
    match provider.console_tail(&t.cloud, instance).await {
        Ok(tail) if tail.trim().is_empty() => "the console is empty".into(),
        Ok(tail) => format!("last console lines:\n{}", last_lines(&tail, TAIL_LINES)),
        Err(e) => format!("the console could not be read: {e}"),
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn await_agent(app: &App, t: &TargetRecord, provider: &Arc<dyn Provider>) -> Result<(), StepError> {
    let limit = app.0.config.timeouts.agent_contact;
    let deadline = remaining(t.timings.launched_at, limit);
    wait_for(
        app,
        t,
        provider,
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
    advance(app, t, |r| r.step = Step::Run).await?;
    Ok(())
}

async fn run_script(app: &App, t: &TargetRecord, provider: &Arc<dyn Provider>) -> Result<(), StepError> {
    let timeout = app.script_timeout(t);
    let started = t.timings.script_started_at.or(t.timings.agent_contact_at);
    let deadline = remaining(started, timeout + REPORT_GRACE);
    let r = wait_for(
        app,
        t,
        provider,
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
        let instruction = provider.after_script();
        advance(app, t, |r| {
            r.instruction = instruction;
            r.step = Step::Seal;
        })
        .await?;
        return Ok(());
    }
    advance(app, t, |r| r.instruction = Instruction::Finish).await?;
    let reason = match outcome {
        ScriptOutcome::TimedOut { .. } => FailureReason::Timeout,
        _ => FailureReason::ScriptFailed,
    };
    let committed = app.0.logs.len(t.id).await.unwrap_or(0);
    let tail_bytes = app.0.logs.read(t.id, committed.saturating_sub(4096), 4096).await.unwrap_or_default();
    let tail = last_lines(&String::from_utf8_lossy(&tail_bytes), TAIL_LINES);
    let what = match &outcome {
        ScriptOutcome::TimedOut { after_secs } => {
            format!("the script ran past its timeout of {after_secs}s and was killed with its children")
        }
        other => format!("the script failed ({other})"),
    };
    Err(StepError::fail(reason, format!("{what}; last log lines:\n{tail}")))
}

async fn seal(app: &App, t: &TargetRecord, provider: &Arc<dyn Provider>) -> Result<(), StepError> {
    let instance = instance(t)?;
    let limit = app.0.config.timeouts.seal;
    let poll = provider.poll_interval(&t.cloud).unwrap_or(app.0.config.timeouts.poll_interval);
    let mut deadline = remaining(t.timings.script_finished_at, limit);
    let mut forced = false;
    loop {
        match call("instance state", || provider.state(&t.cloud, &instance)).await? {
            InstanceState::Stopped => break,
            InstanceState::Gone => {
                return Err(StepError::fail(
                    FailureReason::Provider,
                    "the instance disappeared before it could be imaged",
                ));
            }
            InstanceState::Pending | InstanceState::Running => {}
        }
        if Instant::now() >= deadline {
            if forced {
                let tail = console_tail(provider, t, &instance).await;
                return Err(StepError::fail(
                    FailureReason::Provider,
                    format!("the instance did not stop within {}s of being stopped; {tail}", limit.as_secs()),
                ));
            }
            tracing::warn!("the instance did not power off after sealing; stopping it");
            call("stop", || provider.stop(&t.cloud, &instance)).await?;
            forced = true;
            deadline = Instant::now() + limit;
        }
        tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
    // Sealed means powered off with the agent's report that every file
    // system was scrubbed: without it the disk may still hold the token and
    // whatever the script removed, so no image is made of it.
    if t.instruction == Instruction::Seal {
        let r =
            app.0.store.target(t.id)?.ok_or_else(|| StepError::fail(FailureReason::Internal, "the target vanished"))?;
        check_seal(r.seal.as_ref(), forced, limit)?;
    }
    let stopped = Timestamp::now();
    advance(app, t, |r| {
        r.timings.sealed_at = Some(stopped);
        r.step = Step::Snapshot;
    })
    .await?;
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

async fn snapshot(app: &App, t: &TargetRecord, provider: &Arc<dyn Provider>) -> Result<(), StepError> {
    let instance = instance(t)?;
    let rev = app.revision(&t.generator, Some(t.revision))?;
    let provenance = provenance(t, rev.script_sha256);
    let name = format!("kiln-{}-r{}-{}", t.generator, t.revision, t.id);
    let image = match &t.image_id {
        Some(id) => ImageId(id.clone()),
        None => {
            failpoint::hit("start-image:before-call").await;
            let id = call("create image", || provider.start_image(&t.cloud, &instance, &name, &provenance)).await?;
            failpoint::hit("start-image:after-call").await;
            advance(app, t, |r| r.image_id = Some(id.0.clone())).await?;
            id
        }
    };
    let info = wait_image(app, t, provider, &image).await?;
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
    advance(app, t, |r| {
        r.image = Some(record.clone());
        r.timings.image_ready_at.get_or_insert(now);
        r.step = Step::Record;
    })
    .await?;
    Ok(())
}

/// Polls the image until it is usable: one look per poll, and a transient
/// error costs that poll only (retried at the next), not the whole wait.
async fn wait_image(
    app: &App,
    t: &TargetRecord,
    provider: &Arc<dyn Provider>,
    image: &ImageId,
) -> Result<ImageInfo, StepError> {
    let poll = provider.poll_interval(&t.cloud).unwrap_or(app.0.config.timeouts.poll_interval);
    let limit = provider.image_timeout(&t.cloud);
    let deadline = remaining(t.timings.sealed_at, limit);
    let mut transient = 0u32;
    loop {
        match provider.image_state(&t.cloud, image).await {
            Ok(ImageProgress::Ready(info)) => return Ok(info),
            Ok(ImageProgress::Pending) => transient = 0,
            Err(e) if e.is_transient() && transient < MAX_TRANSIENT_POLLS => {
                transient += 1;
                tracing::warn!(error = %e, transient, "image state: retrying at the next poll");
            }
            Err(e) => return Err(StepError::fail(FailureReason::Provider, format!("wait for image: {e}"))),
        }
        if Instant::now() >= deadline {
            return Err(StepError::fail(
                FailureReason::Provider,
                format!(
                    "image {image} was not usable within {}s; raise the cloud's image_timeout_secs",
                    limit.as_secs()
                ),
            ));
        }
        tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

async fn record(app: &App, t: &TargetRecord) -> Result<(), StepError> {
    let image = t.image.clone().ok_or_else(|| StepError::fail(FailureReason::Internal, "no image to record"))?;
    // One transaction: the image is never recorded without the step moving
    // past it, so an unwind can never delete a recorded image.
    app.0.store.record_output(t.id, &image, |r| r.step = Step::CleanUp)?;
    app.0.store.flush().await?;
    app.notify();
    Ok(())
}

async fn clean_up(app: &App, t: &TargetRecord, provider: &Arc<dyn Provider>) -> Result<(), StepError> {
    if let Some(instance) = t.instance.clone().map(InstanceId) {
        call("terminate", || provider.terminate(&t.cloud, &instance)).await?;
        failpoint::hit("terminate:after-call").await;
    }
    advance(app, t, |r| {
        r.step = Step::Done;
        r.status = Status::Successful;
        r.instruction = Instruction::Finish;
        r.timings.finished_at.get_or_insert(Timestamp::now());
    })
    .await?;
    tracing::info!("target successful");
    Ok(())
}
