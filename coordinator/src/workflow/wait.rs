//! Waiting on the cloud: the one loop behind every wait for an instance or an
//! image.
//!
//! Each poll makes at most one cloud call. A transient error costs that poll
//! only (it is tried again at the next), not the whole wait, which may last
//! an hour; [`MAX_TRANSIENT_POLLS`] in a row fail the target.

use std::time::Duration;

use kiln_protocol::api::FailureReason;
use tokio::sync::watch;
use tokio::time::Instant;

use super::StepError;
use crate::providers::ProviderError;

/// Transient errors in a row that a wait rides out before failing.
const MAX_TRANSIENT_POLLS: u32 = 10;

/// What one look found.
pub(super) enum Look<T> {
    Ready(T),
    NotYet,
}

/// Why a look failed: a cloud call's error (transient ones are retried at
/// the next poll) or the step's own.
pub(super) enum LookError {
    Provider(ProviderError),
    Step(StepError),
}

impl From<ProviderError> for LookError {
    fn from(e: ProviderError) -> Self {
        Self::Provider(e)
    }
}

impl From<StepError> for LookError {
    fn from(e: StepError) -> Self {
        Self::Step(e)
    }
}

impl From<crate::store::StoreError> for LookError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Step(e.into())
    }
}

/// One wait: `what` names the cloud call in error messages.
pub(super) struct Wait {
    pub(super) what: &'static str,
    pub(super) poll: Duration,
    pub(super) deadline: Instant,
    /// Also look (without a cloud call) whenever a record changes.
    pub(super) changes: Option<watch::Receiver<()>>,
}

impl Wait {
    /// Calls `look` until it is ready (`Some`) or the deadline passes
    /// (`None`). `look` gets whether a poll is due: only then may it call the
    /// cloud, once; between polls it is called again on record changes.
    pub(super) async fn until<T, F, Fut>(mut self, mut look: F) -> Result<Option<T>, StepError>
    where
        F: FnMut(bool) -> Fut,
        Fut: Future<Output = Result<Look<T>, LookError>>,
    {
        let mut transient = 0u32;
        let mut next_poll = if self.changes.is_some() { Instant::now() + self.poll } else { Instant::now() };
        loop {
            if let Some(rx) = self.changes.as_mut() {
                rx.mark_unchanged();
            }
            let now = Instant::now();
            let due = now >= next_poll;
            match look(due).await {
                Ok(Look::Ready(v)) => return Ok(Some(v)),
                Ok(Look::NotYet) if due => transient = 0,
                Ok(Look::NotYet) => {}
                Err(LookError::Step(e)) => return Err(e),
                Err(LookError::Provider(e)) if e.is_transient() && transient < MAX_TRANSIENT_POLLS => {
                    transient += 1;
                    tracing::warn!(error = %e, transient, "{}: retrying at the next poll", self.what);
                }
                Err(LookError::Provider(e)) => {
                    return Err(StepError::fail(FailureReason::Provider, format!("{}: {e}", self.what)));
                }
            }
            if due {
                next_poll = now + self.poll;
            }
            if Instant::now() >= self.deadline {
                return Ok(None);
            }
            let sleep = tokio::time::sleep_until(self.deadline.min(next_poll));
            match self.changes.as_mut() {
                Some(rx) => {
                    tokio::select! {
                        _ = rx.changed() => {}
                        () = sleep => {}
                    }
                }
                None => sleep.await,
            }
        }
    }
}
