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

use super::plan::{self, Undo};
use super::{Host, StepError, steps};
use crate::failpoint;
use crate::pki::TokenHash;
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

pub(super) async fn unwind(host: &dyn Host, t: &TargetRecord) -> Result<(), StepError> {
    // Tell a live agent to stop before its instance goes away.
    host.store().update_target(t.id, |r| r.instruction = Instruction::Finish)?;
    host.notify();
    let mut delay = FIRST_RETRY_DELAY;
    let started = tokio::time::Instant::now();
    let problems = loop {
        match remove(host, t).await? {
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
                host.store().update_target(t.id, |r| r.cleanup_pending = Some(what.clone()))?;
                host.store().flush().await?;
                host.notify();
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    };
    host.store().remove_token(&TokenHash::of(&host.enrollment_token(t.id)).0)?;
    let cancelled = t.error.as_ref().is_some_and(|e| e.reason == FailureReason::Cancelled);
    host.store().update_target(t.id, |r| {
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
    host.store().flush().await?;
    host.notify();
    tracing::info!(cancelled, "target unwound");
    Ok(())
}

/// One attempt at removing the half-made image and the instance, from the
/// record as it is now (what an earlier attempt removed is not tried again).
async fn remove(host: &dyn Host, t: &TargetRecord) -> Result<Left, StepError> {
    let t = host.target_record(t.id)?;
    let undo = plan::undo(steps::SAGA, &t);
    if undo.is_empty() {
        return Ok(Left::Nothing);
    }
    // Without the provider or the cloud's credentials nothing can be undone:
    // the target still ends, and its error says what to remove by hand.
    let (provider, cloud) = match host.provider(&t).and_then(|p| Ok((p, host.with_credentials(&t.cloud, t.build)?))) {
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
    // Last made first, as the table says.
    for (action, resource) in undo {
        match action {
            Undo::DeleteImage => {
                let image = ImageId(resource);
                match provider.delete_image(&cloud, &image).await {
                    Ok(()) => {
                        failpoint::hit("unwind:after-delete-image").await;
                        host.store().update_target(t.id, |r| r.image_id = None)?;
                        tracing::info!(%image, "half-made image deleted");
                    }
                    Err(e) => refused(e, format!("image {image} could not be deleted"), "delete it by hand"),
                }
            }
            Undo::TerminateInstance => {
                let instance = InstanceId(resource);
                match provider.terminate(&cloud, &instance).await {
                    Ok(()) => {
                        failpoint::hit("unwind:after-terminate").await;
                        tracing::info!(%instance, "instance terminated");
                    }
                    Err(e) => {
                        refused(e, format!("instance {instance} could not be terminated"), "terminate it by hand");
                    }
                }
            }
        }
    }
    host.store().flush().await?;
    Ok(if !transient.is_empty() {
        Left::Transient(transient.join("; "))
    } else if !permanent.is_empty() {
        Left::Permanent(permanent)
    } else {
        Left::Nothing
    })
}
