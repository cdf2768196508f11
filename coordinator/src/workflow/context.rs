//! What the workflow needs from the rest of the coordinator, and the narrow
//! view a step gets of it.
//!
//! [`Host`] is implemented by the application layer, which builds the
//! workflow's [`Runner`](super::Runner) and hands itself over as a host: the
//! workflow never names the application. A step sees a [`StepContext`]: its
//! target's record (with the cloud's credentials), the provider for that
//! target, and the few things it may do (advance the record, offer the
//! enrollment token, render user-data, read the log's tail, the timeouts).

use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::api::{Cloud, FailureReason, Image, Step};
use kiln_protocol::{BuildId, GeneratorName, TargetId, Timestamp};
use tokio::sync::watch;

use super::{Runner, StepError};
use crate::config::Timeouts;
use crate::pki::TokenHash;
use crate::providers::{AgentEndpoints, InstanceId, Provider, Served};
use crate::store::Store;
use crate::store::logs::LogFiles;
use crate::store::records::{TargetRecord, TokenRecord};

/// The coordinator as the workflow sees it; the application implements it.
pub(crate) trait Host: Send + Sync + 'static {
    /// The workflows' tasks, interrupts and shutdown signal.
    fn runner(&self) -> &Runner;
    fn store(&self) -> &Store;
    fn logs(&self) -> &LogFiles;
    fn timeouts(&self) -> &Timeouts;
    /// Where instances reach the listeners.
    fn served(&self) -> &Served;
    /// Tells every waiter that something changed.
    fn notify(&self);
    /// A receiver that wakes on every change of a target or a log.
    fn subscribe_changes(&self) -> watch::Receiver<()>;
    /// The provider for a target's cloud.
    fn provider(&self, t: &TargetRecord) -> Result<Arc<dyn Provider>, StepError>;
    /// `cloud` with its credentials, for the provider's calls only.
    fn with_credentials(&self, cloud: &Cloud, build: BuildId) -> Result<Cloud, StepError>;
    /// A target's current record.
    fn target_record(&self, id: TargetId) -> Result<TargetRecord, StepError>;
    /// A target's enrollment token (derived, so the same every time).
    fn enrollment_token(&self, id: TargetId) -> String;
    /// Renders a target's user-data.
    fn user_data(&self, t: &TargetRecord, endpoints: &AgentEndpoints, token: &str) -> Result<String, StepError>;
    /// The SHA-256 of the script of a generator's revision.
    fn script_sha256(&self, generator: &GeneratorName, revision: u32) -> Result<String, StepError>;
    /// How long a target's script may run.
    fn script_timeout(&self, t: &TargetRecord) -> Duration;
    /// Forgets a build's passwords once all its targets have ended.
    fn forget_secrets_if_done(&self, build: BuildId);
}

/// Everything one step of one target may use.
pub(super) struct StepContext {
    host: Arc<dyn Host>,
    /// The target's record as the step started, with its cloud's credentials.
    pub(super) t: TargetRecord,
    /// The provider for this target's cloud.
    pub(super) provider: Arc<dyn Provider>,
    /// The step that follows this one in the table.
    next: Step,
}

impl StepContext {
    pub(super) fn new(host: Arc<dyn Host>, t: &TargetRecord, next: Step) -> Result<Self, StepError> {
        let provider = host.provider(t)?;
        let mut t = t.clone();
        t.cloud = host.with_credentials(&t.cloud, t.build)?;
        Ok(Self { host, t, provider, next })
    }

    /// Writes `f`'s change and flushes it before anything else happens.
    pub(super) async fn advance(&self, f: impl Fn(&mut TargetRecord)) -> Result<TargetRecord, StepError> {
        let r = self.host.store().update_target(self.t.id, f)?;
        self.host.store().flush().await?;
        self.host.notify();
        Ok(r)
    }

    /// Writes `f`'s change with the record moved on to the next step, and
    /// flushes it: the step is done.
    pub(super) async fn complete(&self, f: impl Fn(&mut TargetRecord)) -> Result<TargetRecord, StepError> {
        let next = self.next;
        self.advance(|r| {
            f(r);
            r.step = next;
        })
        .await
    }

    /// Records `image` as the output and moves on to the next step in one
    /// transaction, so an unwind can never delete a recorded image.
    pub(super) async fn complete_with_output(&self, image: &Image) -> Result<(), StepError> {
        let next = self.next;
        self.host.store().record_output(self.t.id, image, |r| r.step = next)?;
        self.host.store().flush().await?;
        self.host.notify();
        Ok(())
    }

    /// The target's record as it is now.
    pub(super) fn record(&self) -> Result<TargetRecord, StepError> {
        self.host.target_record(self.t.id)
    }

    /// Offers the target's enrollment token (stored and flushed) and returns it.
    pub(super) async fn offer_token(&self) -> Result<String, StepError> {
        let token = self.host.enrollment_token(self.t.id);
        let expires_at = Timestamp::now() + self.host.timeouts().token_ttl;
        self.host.store().offer_token(&TokenHash::of(&token).0, &TokenRecord { target: self.t.id, expires_at })?;
        self.host.store().flush().await?;
        Ok(token)
    }

    pub(super) fn served(&self) -> &Served {
        self.host.served()
    }

    pub(super) fn user_data(&self, endpoints: &AgentEndpoints, token: &str) -> Result<String, StepError> {
        self.host.user_data(&self.t, endpoints, token)
    }

    /// The SHA-256 of the script this target runs.
    pub(super) fn script_sha256(&self) -> Result<String, StepError> {
        self.host.script_sha256(&self.t.generator, self.t.revision)
    }

    pub(super) fn script_timeout(&self) -> Duration {
        self.host.script_timeout(&self.t)
    }

    pub(super) fn timeouts(&self) -> &Timeouts {
        self.host.timeouts()
    }

    /// How often this target's cloud is asked about its instance or image.
    pub(super) fn poll_interval(&self) -> Duration {
        self.provider.poll_interval(&self.t.cloud).unwrap_or(self.host.timeouts().poll_interval)
    }

    pub(super) fn subscribe_changes(&self) -> watch::Receiver<()> {
        self.host.subscribe_changes()
    }

    /// The last `bytes` of the target's log (what is there; empty if unreadable).
    pub(super) async fn log_tail(&self, bytes: u64) -> Vec<u8> {
        let logs = self.host.logs();
        let committed = logs.len(self.t.id).await.unwrap_or(0);
        logs.read(self.t.id, committed.saturating_sub(bytes), bytes).await.unwrap_or_default()
    }

    pub(super) fn instance(&self) -> Result<InstanceId, StepError> {
        self.t
            .instance
            .clone()
            .map(InstanceId)
            .ok_or_else(|| StepError::fail(FailureReason::Internal, "the target has no instance"))
    }
}
