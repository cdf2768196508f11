//! Each target's workflow: a saga of persisted, idempotent steps with undo.
//!
//! `launch → await agent → run → seal → snapshot → record → clean up`.
//! Each step writes its result and the next step's name to the store (and
//! flushes) before the next starts. On failure or cancellation the target
//! unwinds: a half-made image is deleted, the instance terminated ("not found"
//! counts as done), then it ends failed or cancelled. At start-up every
//! unfinished target is resumed from its record ([`plan`]).
//!
//! - [`steps`]: the step table (each step with its undo) and the forward steps.
//! - [`plan`]: what to do next, derived from the record and the table; pure.
//! - [`undo`]: the unwind.
//! - [`wait`]: the one polling loop behind every wait on the cloud.
//! - [`context`]: the [`Host`] the application implements, and the narrow
//!   [`StepContext`](context::StepContext) a step sees.
//!
//! The workflow does not know the application layer: the application builds
//! a [`Runner`], implements [`Host`], and calls [`spawn`], [`interrupt`] and
//! [`resume_all`] with itself as the host.

mod context;
pub mod plan;
mod steps;
mod undo;
mod wait;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_protocol::TargetId;
use kiln_protocol::api::{FailureReason, Step};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub(crate) use context::Host;

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

/// The running workflows: their tasks, the interrupt of each running target,
/// and the shutdown signal. The application owns one.
pub(crate) struct Runner {
    /// The workflow tasks, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Cancelled at shutdown: workflows stop where they are, to be resumed.
    shutdown: CancellationToken,
    /// Per running target: cancelled to interrupt its current step.
    interrupts: Mutex<HashMap<TargetId, CancellationToken>>,
}

impl Runner {
    /// Workflows that stop where they are when `shutdown` is cancelled.
    pub(crate) fn new(shutdown: CancellationToken) -> Self {
        Self { tasks: TaskTracker::new(), shutdown, interrupts: Mutex::default() }
    }

    /// Whether no target's workflow is running.
    pub(crate) fn is_idle(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Stops every workflow where it is (each resumes at the next start) and
    /// waits for them.
    pub(crate) async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn fresh_interrupt(&self, id: TargetId) -> CancellationToken {
        let token = self.shutdown.child_token();
        self.interrupts.lock().expect("interrupts poisoned").insert(id, token.clone());
        token
    }
}

/// Resumes every target that had not ended when the coordinator stopped.
pub(crate) fn resume_all(host: &Arc<dyn Host>) -> Result<(), StoreError> {
    for t in host.store().unfinished_targets()? {
        tracing::info!(build = %t.build, target = %t.id, step = t.step.as_str(), "resuming target");
        spawn(host, t.id);
    }
    Ok(())
}

/// Starts (or resumes) the workflow of one target.
pub(crate) fn spawn(host: &Arc<dyn Host>, id: TargetId) {
    let Ok(Some(t)) = host.store().target(id) else {
        return;
    };
    let span = tracing::info_span!("target", build = %t.build, target = %id, cloud = %t.cloud.name);
    let task_host = host.clone();
    host.runner().tasks.spawn(
        async move {
            run(&task_host, id).await;
            task_host.runner().interrupts.lock().expect("interrupts poisoned").remove(&id);
        }
        .instrument(span),
    );
}

/// Interrupts the current step of a target (after a cancel), so it unwinds now.
pub(crate) fn interrupt(host: &dyn Host, id: TargetId) {
    if let Some(token) = host.runner().interrupts.lock().expect("interrupts poisoned").get(&id) {
        token.cancel();
    }
}

/// One forward step, from the table; with the failpoints feature's
/// `KILN_REPEAT_STEPS=1`, twice, the second time from the record as it was
/// before the first.
async fn run_step(host: &Arc<dyn Host>, t: &TargetRecord, step: Step) -> Result<(), StepError> {
    let row = steps::row(step).ok_or_else(|| {
        StepError::fail(FailureReason::Internal, format!("step {} is not in the saga", step.as_str()))
    })?;
    let context = context::StepContext::new(host.clone(), t, plan::after(steps::SAGA, step))?;
    (row.forward)(&context).await?;
    // After the last step the target has ended: nothing is left to resume.
    let last = plan::after(steps::SAGA, step) == Step::Done;
    if !last {
        failpoint::hit(&format!("step-done:{}", step.as_str())).await;
    }
    if failpoint::repeat_steps() {
        tracing::info!(step = step.as_str(), "step run again from its stale record");
        (row.forward)(&context).await?;
        if !last {
            failpoint::hit(&format!("step-done:{}", step.as_str())).await;
        }
    }
    Ok(())
}

async fn run(host: &Arc<dyn Host>, id: TargetId) {
    let runner = host.runner();
    let mut interrupt = runner.fresh_interrupt(id);
    loop {
        if runner.shutdown.is_cancelled() {
            return;
        }
        let t = match host.store().target(id) {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot read target; it resumes at the next start");
                return;
            }
        };
        let result = match plan::next(steps::SAGA, &t) {
            plan::Next::Nothing => {
                host.forget_secrets_if_done(t.build);
                return;
            }
            plan::Next::Unwind => {
                tokio::select! {
                    r = undo::unwind(host.as_ref(), &t) => r,
                    () = runner.shutdown.cancelled() => return,
                }
            }
            plan::Next::Run(step) => {
                tracing::debug!(step = step.as_str(), "step");
                tokio::select! {
                    r = run_step(host, &t, step) => r,
                    () = interrupt.cancelled() => Err(StepError::Interrupted),
                }
            }
        };
        match result {
            Ok(()) => {}
            Err(StepError::Interrupted) => {
                if interrupt.is_cancelled() {
                    interrupt = runner.fresh_interrupt(id);
                }
            }
            Err(StepError::Fail { reason, message }) => {
                tracing::warn!(step = t.step.as_str(), ?reason, %message, "target failed");
                let recorded = host.store().update_target(id, |r| r.fail(reason, message.clone()));
                if let Err(e) = recorded {
                    tracing::error!(error = %e, "cannot record failure; it resumes at the next start");
                    return;
                }
                let _ = host.store().flush().await;
                host.notify();
            }
            Err(StepError::Store(e)) => {
                tracing::error!(error = %e, "store failed; the target resumes at the next start");
                return;
            }
        }
    }
}
