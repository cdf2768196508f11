//! The application as the workflows' [`Host`]: the few things a target's
//! saga may use, each delegated to the application's own method.

use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::api::{Cloud, FailureReason};
use kiln_protocol::{BuildId, GeneratorName, TargetId};
use tokio::sync::watch;

use super::{App, AppError};
use crate::config::Timeouts;
use crate::providers::{AgentEndpoints, Provider, Served};
use crate::store::Store;
use crate::store::logs::LogFiles;
use crate::store::records::TargetRecord;
use crate::workflow::{Host, Runner, StepError};

impl From<AppError> for StepError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Store(e) => Self::Store(e),
            other => Self::fail(FailureReason::Internal, other.to_string()),
        }
    }
}

impl Host for App {
    fn runner(&self) -> &Runner {
        &self.0.workflows
    }

    fn store(&self) -> &Store {
        &self.0.store
    }

    fn logs(&self) -> &LogFiles {
        &self.0.logs
    }

    fn timeouts(&self) -> &Timeouts {
        &self.0.config.timeouts
    }

    fn served(&self) -> &Served {
        &self.0.served
    }

    fn notify(&self) {
        App::notify(self);
    }

    fn subscribe_changes(&self) -> watch::Receiver<()> {
        App::subscribe_changes(self)
    }

    fn provider(&self, t: &TargetRecord) -> Result<Arc<dyn Provider>, StepError> {
        self.0.providers.get(t.cloud.kind).ok_or_else(|| {
            StepError::fail(
                FailureReason::Internal,
                format!("this coordinator has no provider for clouds of kind {}", t.cloud.kind.as_str()),
            )
        })
    }

    fn with_credentials(&self, cloud: &Cloud, build: BuildId) -> Result<Cloud, StepError> {
        Ok(App::with_credentials(self, cloud, Some(build))?)
    }

    fn target_record(&self, id: TargetId) -> Result<TargetRecord, StepError> {
        Ok(App::target_record(self, id)?)
    }

    fn enrollment_token(&self, id: TargetId) -> String {
        self.0.pki.tokens().token(id)
    }

    fn user_data(&self, t: &TargetRecord, endpoints: &AgentEndpoints, token: &str) -> Result<String, StepError> {
        Ok(App::user_data(self, t, endpoints, token)?)
    }

    fn script_sha256(&self, generator: &GeneratorName, revision: u32) -> Result<String, StepError> {
        Ok(App::revision(self, generator, Some(revision))?.script_sha256)
    }

    fn script_timeout(&self, t: &TargetRecord) -> Duration {
        App::script_timeout(self, t)
    }

    fn forget_secrets_if_done(&self, build: BuildId) {
        App::forget_secrets_if_done(self, build);
    }
}
