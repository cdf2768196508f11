//! Each target's workflow: a saga of persisted, idempotent steps with undo.
//!
//! `launch → await agent → run → seal → snapshot → record → clean up`.
//! Each step writes its result and the next step's name to the store (and
//! flushes) before the next starts. On failure or cancellation the target
//! unwinds: a half-made image is deleted, the instance terminated ("not found"
//! counts as done), then it ends failed or cancelled. At start-up every
//! unfinished target is resumed from its record ([`plan`]).

pub mod plan;
mod steps;
mod undo;

use kiln_protocol::TargetId;
use kiln_protocol::api::{FailureReason, Step};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::{App, AppError};
use crate::failpoint;
use crate::store::StoreError;
use crate::store::records::TargetRecord;

/// Why a step did not complete.
#[derive(Debug)]
pub(crate) enum StepError {
    /// The target failed: record this and unwind.
    Fail { reason: FailureReason, message: String },
    /// A user cancelled, or the coordinator is shutting down: re-read the record.
    Interrupted,
    /// The store failed; the workflow stops and resumes at the next start.
    Store(StoreError),
}

impl StepError {
    pub(crate) fn fail(reason: FailureReason, message: impl Into<String>) -> Self {
        Self::Fail { reason, message: message.into() }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fail { message, .. } => f.write_str(message),
            Self::Interrupted => f.write_str("interrupted"),
            Self::Store(e) => write!(f, "store: {e}"),
        }
    }
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<AppError> for StepError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Store(e) => Self::Store(e),
            other => Self::fail(FailureReason::Internal, other.to_string()),
        }
    }
}

/// Resumes every target that had not ended when the coordinator stopped.
pub(crate) fn resume_all(app: &App) -> Result<(), AppError> {
    for t in app.0.store.unfinished_targets()? {
        tracing::info!(build = %t.build, target = %t.id, step = t.step.as_str(), "resuming target");
        spawn(app, t.id);
    }
    Ok(())
}

/// Starts (or resumes) the workflow of one target.
pub(crate) fn spawn(app: &App, id: TargetId) {
    let Ok(Some(t)) = app.0.store.target(id) else {
        return;
    };
    let span = tracing::info_span!("target", build = %t.build, target = %id, cloud = %t.cloud.name);
    let task_app = app.clone();
    app.0.tasks.spawn(
        async move {
            run(&task_app, id).await;
            task_app.0.interrupts.lock().expect("interrupts poisoned").remove(&id);
        }
        .instrument(span),
    );
}

/// Interrupts the current step of a target (after a cancel), so it unwinds now.
pub(crate) fn interrupt(app: &App, id: TargetId) {
    if let Some(token) = app.0.interrupts.lock().expect("interrupts poisoned").get(&id) {
        token.cancel();
    }
}

fn fresh_interrupt(app: &App, id: TargetId) -> CancellationToken {
    let token = app.0.shutdown.child_token();
    app.0.interrupts.lock().expect("interrupts poisoned").insert(id, token.clone());
    token
}

/// One forward step; with the failpoints feature's `KILN_REPEAT_STEPS=1`,
/// twice, the second time from the record as it was before the first.
async fn run_step(app: &App, t: &TargetRecord, step: Step) -> Result<(), StepError> {
    steps::run(app, t, step).await?;
    if failpoint::repeat_steps() {
        tracing::info!(step = step.as_str(), "step run again from its stale record");
        steps::run(app, t, step).await?;
    }
    Ok(())
}

async fn run(app: &App, id: TargetId) {
    let mut interrupt = fresh_interrupt(app, id);
    loop {
        if app.0.shutdown.is_cancelled() {
            return;
        }
        let t = match app.0.store.target(id) {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot read target; it resumes at the next start");
                return;
            }
        };
        let result = match plan::next(&t) {
            plan::Next::Nothing => {
                app.forget_secrets_if_done(t.build);
                return;
            }
            plan::Next::Unwind => {
                tokio::select! {
                    r = undo::unwind(app, &t) => r,
                    () = app.0.shutdown.cancelled() => return,
                }
            }
            plan::Next::Run(step) => {
                tracing::debug!(step = step.as_str(), "step");
                tokio::select! {
                    r = run_step(app, &t, step) => r,
                    () = interrupt.cancelled() => Err(StepError::Interrupted),
                }
            }
        };
        match result {
            Ok(()) => {}
            Err(StepError::Interrupted) => {
                if interrupt.is_cancelled() {
                    interrupt = fresh_interrupt(app, id);
                }
            }
            Err(StepError::Fail { reason, message }) => {
                tracing::warn!(step = t.step.as_str(), ?reason, %message, "target failed");
                let recorded = app.0.store.update_target(id, |r| r.fail(reason, message.clone()));
                if let Err(e) = recorded {
                    tracing::error!(error = %e, "cannot record failure; it resumes at the next start");
                    return;
                }
                let _ = app.0.store.flush().await;
                app.notify();
            }
            Err(StepError::Store(e)) => {
                tracing::error!(error = %e, "store failed; the target resumes at the next start");
                return;
            }
        }
    }
}
