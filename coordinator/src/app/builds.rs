//! Builds: start one revision on a set of clouds, watch it, cancel it, read its logs.

use std::collections::BTreeSet;

use futures::Stream;
use kiln_protocol::agent::Instruction;
use kiln_protocol::api::{Build, BuildListQuery, BuildRequest, FailureReason, Status, Step, Target, Timings};
use kiln_protocol::{BuildId, TargetId, Timestamp};

use super::{App, AppError};
use crate::store::records::{BuildRecord, TargetRecord};

use kiln_protocol::api::MAX_BUILD_LIST;
pub use kiln_protocol::api::MAX_LOG_READ;
/// Largest chunk one follow event carries.
const FOLLOW_CHUNK: u64 = 256 * 1024;

/// One event of a log follow.
#[derive(Debug, Clone, PartialEq)]
pub enum FollowEvent {
    Chunk { offset: u64, bytes: Vec<u8> },
    End { total: u64, status: Status },
}

impl App {
    /// Checks the request, records the build and its targets, and starts them.
    pub async fn start_build(&self, req: BuildRequest) -> Result<Build, AppError> {
        let rev = self.revision(&req.generator, req.revision)?;
        let clouds: Vec<_> = if req.clouds.is_empty() {
            rev.spec.targets.keys().cloned().collect()
        } else {
            let mut seen = BTreeSet::new();
            req.clouds.into_iter().filter(|c| seen.insert(c.clone())).collect()
        };
        if clouds.is_empty() {
            return Err(AppError::Conflict(format!(
                "generator {} revision {} names no cloud: add a target (a cloud and its base image) and save",
                rev.generator, rev.number
            )));
        }
        if self.agent_binary().is_none() {
            return Err(AppError::Unavailable(format!(
                "the coordinator has no agent binary at {}: build kiln-agent and restart with --agent-binary",
                self.0.config.agent_binary.display()
            )));
        }
        let build_id = BuildId::generate();
        let now = Timestamp::now();
        let mut targets = Vec::new();
        for name in &clouds {
            let spec = rev.spec.targets.get(name).ok_or_else(|| {
                let known: Vec<_> = rev.spec.targets.keys().map(|c| c.to_string()).collect();
                AppError::NotFound(format!(
                    "generator {} revision {} has no target for cloud {name}; it has: {}",
                    rev.generator,
                    rev.number,
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                ))
            })?;
            let cloud = self.cloud(name)?;
            let provider = self.0.providers.get(cloud.kind).ok_or_else(|| {
                AppError::BadRequest(format!(
                    "cloud {name} is of kind {}, which this coordinator has no provider for",
                    cloud.kind.as_str()
                ))
            })?;
            let mut checked = self.with_credentials(&cloud, None).ok().unwrap_or_else(|| cloud.clone());
            if super::catalog::asks_password(&cloud) {
                let password = req.passwords.get(name).filter(|p| !p.0.is_empty()).ok_or_else(|| {
                    AppError::BadRequest(format!(
                        "cloud {name} asks for its password at every build: give it (`kiln build start` asks for it; the API takes it in `passwords`)"
                    ))
                })?;
                checked.credentials =
                    Some(kiln_protocol::api::CloudCredentials::Password { password: password.0.clone() });
            }
            provider.preflight(&checked, spec).await.map_err(|e| AppError::BadRequest(format!("cloud {name}: {e}")))?;
            targets.push(TargetRecord {
                id: TargetId::generate(),
                build: build_id,
                cloud,
                spec: spec.clone(),
                generator: rev.generator.clone(),
                revision: rev.number,
                status: Status::Submitted,
                step: Step::Launch,
                error: None,
                instance: None,
                image_id: None,
                image: None,
                enrolled: false,
                enrolled_key: None,
                cert_serial: None,
                outcome: None,
                reported_total: None,
                instruction: Instruction::Wait,
                seal: None,
                cleanup_pending: None,
                timings: Timings { created_at: Some(now), ..Timings::default() },
            });
        }
        let build = BuildRecord {
            id: build_id,
            generator: rev.generator.clone(),
            revision: rev.number,
            script_sha256: rev.script_sha256.clone(),
            created_at: now,
            targets: targets.iter().map(|t| t.id).collect(),
            cancel_requested: false,
        };
        let asked: std::collections::HashMap<_, _> = req
            .passwords
            .into_iter()
            .filter(|(c, _)| targets.iter().any(|t| &t.cloud.name == c && super::catalog::asks_password(&t.cloud)))
            .collect();
        if !asked.is_empty() {
            self.0.build_secrets.lock().expect("secrets poisoned").insert(build_id, asked);
        }
        self.0.store.insert_build(&build, &targets)?;
        self.0.store.flush().await?;
        tracing::info!(build = %build_id, generator = %rev.generator, revision = rev.number, "build started");
        for t in &targets {
            crate::workflow::spawn(&self.host(), t.id);
        }
        self.build(build_id).await
    }

    pub async fn build(&self, id: BuildId) -> Result<Build, AppError> {
        let record = self
            .0
            .store
            .build(id)?
            .ok_or_else(|| AppError::not_found(format!("build {id}"), "list builds with `kiln build list`"))?;
        self.build_view(record).await
    }

    pub async fn builds(&self, query: BuildListQuery) -> Result<Vec<Build>, AppError> {
        let limit = query.limit.unwrap_or(50);
        if !(1..=MAX_BUILD_LIST).contains(&limit) {
            return Err(AppError::BadRequest(format!("limit is {limit}; give a number from 1 to {MAX_BUILD_LIST}")));
        }
        let limit = limit as usize;
        let records = self.0.store.builds(limit, |b| query.generator.as_ref().is_none_or(|g| &b.generator == g))?;
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            out.push(self.build_view(r).await?);
        }
        Ok(out)
    }

    /// The builds that have a target not yet ended, oldest first.
    pub fn unfinished_builds(&self) -> Result<Vec<BuildId>, AppError> {
        let mut ids: Vec<BuildId> = self.0.store.unfinished_targets()?.into_iter().map(|t| t.build).collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Cancels every unfinished target of a build; each unwinds (terminates
    /// its instance, deletes a half-made image) and ends `cancelled`.
    pub async fn cancel_build(&self, id: BuildId) -> Result<Build, AppError> {
        let build = self.build(id).await?;
        if build.status.is_terminal() {
            return Err(AppError::Conflict(format!("build {id} has already ended ({})", build.status.as_str())));
        }
        self.0.store.update_build(id, |b| b.cancel_requested = true)?;
        for t in &build.targets {
            self.0.store.update_target(t.id, |r| {
                if !r.status.is_terminal() {
                    r.fail(FailureReason::Cancelled, "cancelled by a user");
                }
            })?;
        }
        self.0.store.flush().await?;
        for t in &build.targets {
            crate::workflow::interrupt(self, t.id);
        }
        self.notify();
        tracing::info!(build = %id, "build cancelled");
        self.build(id).await
    }

    pub(crate) fn target_record(&self, id: TargetId) -> Result<TargetRecord, AppError> {
        self.0
            .store
            .target(id)?
            .ok_or_else(|| AppError::not_found(format!("target {id}"), "see a build's targets with `kiln build show`"))
    }

    /// Reads at most `limit` bytes of a target's log from `offset`.
    pub async fn read_log(&self, id: TargetId, offset: u64, limit: u64) -> Result<Vec<u8>, AppError> {
        self.target_record(id)?;
        if !(1..=MAX_LOG_READ).contains(&limit) {
            return Err(AppError::BadRequest(format!(
                "limit is {limit}; give a number of bytes from 1 to {MAX_LOG_READ}"
            )));
        }
        self.check_log_offset(id, offset).await?;
        Ok(self.0.logs.read(id, offset, limit).await?)
    }

    /// A log offset is at most the bytes committed: reading from the end
    /// gives nothing, reading from past it is an error.
    async fn check_log_offset(&self, id: TargetId, offset: u64) -> Result<(), AppError> {
        let committed = self.0.logs.len(id).await?;
        if offset > committed {
            return Err(AppError::RangeNotSatisfiable(format!(
                "offset {offset} is past the end of the log, which has {committed} bytes so far; give an offset from 0 to {committed}"
            )));
        }
        Ok(())
    }

    /// Follows a target's log from `offset` until the target has ended and
    /// every committed byte was sent.
    pub async fn follow_log(
        &self,
        id: TargetId,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<FollowEvent, AppError>> + Send + use<>, AppError> {
        self.target_record(id)?;
        self.check_log_offset(id, offset).await?;
        let app = self.clone();
        let rx = self.0.changes.subscribe();
        Ok(futures::stream::try_unfold((app, rx, offset, false), move |(app, mut rx, offset, done)| async move {
            if done {
                return Ok(None);
            }
            loop {
                rx.mark_unchanged();
                let len = app.0.logs.len(id).await?;
                if len > offset {
                    let bytes = app.0.logs.read(id, offset, FOLLOW_CHUNK).await?;
                    let next = offset + bytes.len() as u64;
                    return Ok(Some((FollowEvent::Chunk { offset, bytes }, (app, rx, next, false))));
                }
                let status = app.target_record(id)?.status;
                if status.is_terminal() {
                    return Ok(Some((FollowEvent::End { total: len, status }, (app, rx, offset, true))));
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return Ok(None) },
                    () = app.0.shutdown.cancelled() => return Ok(None),
                }
            }
        }))
    }

    async fn build_view(&self, record: BuildRecord) -> Result<Build, AppError> {
        let mut targets = Vec::with_capacity(record.targets.len());
        for id in &record.targets {
            let t = self.target_record(*id)?;
            targets.push(self.target_view(t).await?);
        }
        let status = build_status(targets.iter().map(|t| t.status));
        let finished_at =
            if status.is_terminal() { targets.iter().filter_map(|t| t.timings.finished_at).max() } else { None };
        Ok(Build {
            id: record.id,
            generator: record.generator,
            revision: record.revision,
            script_sha256: record.script_sha256,
            created_at: record.created_at,
            finished_at,
            status,
            cancel_requested: record.cancel_requested,
            targets,
        })
    }

    pub(crate) async fn target_view(&self, t: TargetRecord) -> Result<Target, AppError> {
        let log_bytes = self.0.logs.len(t.id).await?;
        Ok(Target {
            id: t.id,
            build: t.build,
            cloud: t.cloud.name,
            base_image: t.spec.base_image,
            status: t.status,
            step: t.step,
            instance: t.instance,
            image: t.image,
            outcome: t.outcome,
            error: t.error,
            timings: t.timings,
            log_bytes,
            cleanup_pending: t.cleanup_pending,
        })
    }
}

/// A build's status from its targets': failed if any failed, cancelled if any
/// was cancelled, successful when all succeeded, else running or submitted.
pub fn build_status(targets: impl IntoIterator<Item = Status>) -> Status {
    let all: Vec<Status> = targets.into_iter().collect();
    if all.iter().any(|s| !s.is_terminal()) {
        if all.iter().all(|s| *s == Status::Submitted) { Status::Submitted } else { Status::Running }
    } else if all.contains(&Status::Failed) {
        Status::Failed
    } else if all.contains(&Status::Cancelled) {
        Status::Cancelled
    } else {
        Status::Successful
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    // The build's colour follows from its targets, one case per line.
    #[test]
    fn build_status_cases() {
        let cases: &[(&[Status], Status)] = &[
            (&[Submitted, Submitted], Submitted),
            (&[Submitted, Running], Running),
            (&[Successful, Running], Running),
            (&[Successful, Successful], Successful),
            (&[Successful, Failed], Failed),
            (&[Cancelled, Successful], Cancelled),
            (&[Cancelled, Failed], Failed),
        ];
        for (targets, want) in cases {
            assert_eq!(build_status(targets.iter().copied()), *want, "{targets:?}");
        }
    }
}
