//! Unwinding a failed or cancelled target: nothing may be left behind.
//!
//! A removal the cloud refuses for a transient reason (throttling, a 5xx, a
//! network error) is retried with backoff for as long as it takes; meanwhile
//! the target shows `cleanup_pending` and does not end, so it is never
//! reported clean while something is left. A permanent refusal, or an hour
//! of transient ones, ends the target with what to remove by hand.

use std::time::Duration;

use kiln_protocol::Timestamp;
use kiln_protocol::agent::Instruction;
use kiln_protocol::api::{FailureReason, Status};

use super::steps::{provider, with_credentials};
use super::{StepError, plan};
use crate::app::App;
use crate::failpoint;
use crate::providers::{ImageId, InstanceId, ProviderError};
use crate::store::records::TargetRecord;

/// The first wait before a refused removal is tried again; it doubles up to
/// [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(120);
/// How long a pending clean-up is retried before the target ends with what
/// is left to remove by hand (counted from this process's first refusal).
const GIVE_UP_AFTER: Duration = Duration::from_secs(3600);

/// What one pass over the undo list left.
enum Left {
    Nothing,
    /// The cloud refused for a reason that may pass: try again later.
    Transient(String),
    /// Could not be removed, and trying again will not help.
    Permanent(Vec<String>),
}

pub(super) async fn unwind(app: &App, t: &TargetRecord) -> Result<(), StepError> {
    // Tell a live agent to stop before its instance goes away.
    app.0.store.update_target(t.id, |r| r.instruction = Instruction::Finish)?;
    app.notify();
    let mut delay = FIRST_RETRY_DELAY;
    let started = tokio::time::Instant::now();
    let problems = loop {
        match remove(app, t).await? {
            Left::Nothing => break Vec::new(),
            Left::Permanent(problems) => break problems,
            Left::Transient(what) if started.elapsed() >= GIVE_UP_AFTER => {
                break vec![format!(
                    "still refused after {} minutes ({what}); remove it by hand",
                    GIVE_UP_AFTER.as_secs() / 60
                )];
            }
            Left::Transient(what) => {
                tracing::warn!(%what, ?delay, "clean-up pending: retrying");
                app.0.store.update_target(t.id, |r| r.cleanup_pending = Some(what.clone()))?;
                app.0.store.flush().await?;
                app.notify();
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    };
    app.0.store.remove_token(&app.token_hash(t.id).0)?;
    let cancelled = t.error.as_ref().is_some_and(|e| e.reason == FailureReason::Cancelled);
    app.0.store.update_target(t.id, |r| {
        if let Some(err) = r.error.as_mut() {
            for p in &problems {
                err.message.push_str("; clean-up: ");
                err.message.push_str(p);
            }
        }
        r.cleanup_pending = None;
        r.status = if cancelled { Status::Cancelled } else { Status::Failed };
        r.timings.finished_at.get_or_insert(Timestamp::now());
    })?;
    app.0.store.flush().await?;
    app.notify();
    tracing::info!(cancelled, "target unwound");
    Ok(())
}

/// One attempt at removing the half-made image and the instance, from the
/// record as it is now (what an earlier attempt removed is not tried again).
async fn remove(app: &App, t: &TargetRecord) -> Result<Left, StepError> {
    let t = app.target_record(t.id)?;
    let undo = plan::undo(&t);
    if undo.delete_image.is_none() && undo.terminate.is_none() {
        return Ok(Left::Nothing);
    }
    // Without the provider or the cloud's credentials nothing can be undone:
    // the target still ends, and its error says what to remove by hand.
    let (provider, t) = match provider(app, &t).and_then(|p| Ok((p, with_credentials(app, &t)?))) {
        Ok(found) => found,
        Err(e) => return Ok(Left::Permanent(vec![e.to_string()])),
    };
    let mut transient = Vec::new();
    let mut permanent = Vec::new();
    let mut refused = |e: ProviderError, what: String, by_hand: &str| {
        if e.is_transient() {
            transient.push(format!("{what}: {e}"));
        } else {
            permanent.push(format!("{what} ({e}); {by_hand}"));
        }
    };
    if let Some(image) = undo.delete_image.map(ImageId) {
        match provider.delete_image(&t.cloud, &image).await {
            Ok(()) => {
                failpoint::hit("unwind:after-delete-image").await;
                app.0.store.update_target(t.id, |r| r.image_id = None)?;
                tracing::info!(%image, "half-made image deleted");
            }
            Err(e) => refused(e, format!("image {image} could not be deleted"), "delete it by hand"),
        }
    }
    if let Some(instance) = undo.terminate.map(InstanceId) {
        match provider.terminate(&t.cloud, &instance).await {
            Ok(()) => {
                failpoint::hit("unwind:after-terminate").await;
                tracing::info!(%instance, "instance terminated");
            }
            Err(e) => refused(e, format!("instance {instance} could not be terminated"), "terminate it by hand"),
        }
    }
    app.0.store.flush().await?;
    Ok(if !transient.is_empty() {
        Left::Transient(transient.join("; "))
    } else if !permanent.is_empty() {
        Left::Permanent(permanent)
    } else {
        Left::Nothing
    })
}
