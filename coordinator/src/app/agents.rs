//! What an agent may do. Enrollment trades a one-time token and a CSR for a
//! certificate; every later call is authorized by that certificate alone.

use std::time::Duration;

use kiln_protocol::agent::{
    EnrollRequest, EnrollResponse, ExitReport, InstanceIdentity, Instruction, Job, LogAck, SealReport,
};
use kiln_protocol::api::{CloudCredentials, FailureReason};
use kiln_protocol::{TargetId, Timestamp};

use sha2::{Digest, Sha256};

use super::{App, AppError};
use crate::pki::TokenHash;
use crate::providers::InstanceId;
use crate::secrets::Masker;
use crate::store::TokenRefusal;
use crate::store::logs::{Append, MaskedAppend, masked_append};
use crate::store::records::{CertRecord, MaskCursor, TargetRecord};

/// Who is calling, from the verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// From the certificate's SAN URI.
    pub target: TargetId,
    /// Lowercase hex of the certificate's serial number.
    pub serial: String,
}

/// How long past the script's timeout an agent certificate stays valid.
const CERT_SLACK: Duration = Duration::from_secs(3600);

impl App {
    /// Consumes the token, then signs a certificate for the CSR's key.
    pub async fn enroll(&self, req: EnrollRequest) -> Result<EnrollResponse, AppError> {
        let refused = |why: &str| AppError::Unauthorized(format!("enrollment refused: {why}"));
        // The CSR is checked first so a garbled request does not burn the token.
        let Ok(csr) = rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem) else {
            return Err(refused("the certificate request is malformed or its signature is wrong"));
        };
        let key = hex::encode(Sha256::digest(rcgen::PublicKeyData::der_bytes(&csr.public_key)));
        let hash = TokenHash::of(&req.token);
        let now = Timestamp::now();
        let target = match self.0.store.consume_token(&hash.0, req.target, now, &key)? {
            Ok(t) => t,
            Err(TokenRefusal::Unknown) => match self.spent_token(&req, &hash, &key)? {
                Some(t) => t,
                None => {
                    self.0.store.flush().await?;
                    self.notify();
                    return Err(refused("the token is unknown, already used, or not this target's"));
                }
            },
            Err(TokenRefusal::Expired) => {
                self.0.store.flush().await?;
                return Err(refused("the token has expired; start a new build"));
            }
        };
        self.0.store.flush().await?;
        self.check_identity(&target, req.identity.as_ref()).await?;
        let not_after = now + self.script_timeout(&target) + CERT_SLACK;
        let issued = self.0.pki.issue(req.target, &req.csr_pem, not_after)?;
        self.0.store.record_cert(&issued.serial, &CertRecord { target: req.target, not_after })?;
        self.0.store.flush().await?;
        tracing::info!(build = %target.build, target = %req.target, serial = %issued.serial, "agent enrolled");
        self.notify();
        Ok(EnrollResponse { certificate_pem: issued.pem, not_after })
    }

    /// On a cloud that checks instance identity, the one the agent sent must
    /// be the target's instance. Checked once the token is known good, so no
    /// one without it can fail a target; a refusal fails the target at once
    /// (reason `identity_refused`) rather than leaving it to time out, since
    /// the token is spent and no real agent can enroll after it.
    async fn check_identity(&self, t: &TargetRecord, identity: Option<&InstanceIdentity>) -> Result<(), AppError> {
        let Some(provider) = self.0.providers.get(t.cloud.kind) else { return Ok(()) };
        let instance = t.instance.clone().map(InstanceId);
        if instance.is_none() && provider.checks_identity(&t.cloud) {
            // Launch records it as soon as the cloud answers: the agent retries a 503.
            return Err(AppError::Unavailable(format!("target {}'s instance is not recorded yet; retry", t.id)));
        }
        match provider.check_identity(&t.cloud, instance.as_ref(), identity) {
            Ok(None) => Ok(()),
            Ok(Some(verified)) => {
                tracing::info!(build = %t.build, target = %t.id, "instance identity verified: {verified}");
                Ok(())
            }
            Err(refused) => {
                tracing::warn!(build = %t.build, target = %t.id, "instance identity refused: {refused}");
                self.0.store.update_target(t.id, |r| r.fail(FailureReason::IdentityRefused, refused.0.clone()))?;
                self.0.store.flush().await?;
                self.notify();
                Err(AppError::Forbidden(format!("enrollment refused: {refused}")))
            }
        }
    }

    /// A request with this target's own spent token. With the enrolled key it
    /// repeats the enrollment whose answer was lost, and gets the target back:
    /// a certificate for a key the agent alone holds gives nobody else
    /// anything. With any other key it trips the wire: someone else has read
    /// the user-data, so the target fails (and unwinds) before anything is
    /// made of a machine they may now reach.
    fn spent_token(&self, req: &EnrollRequest, hash: &TokenHash, key: &str) -> Result<Option<TargetRecord>, AppError> {
        let Some(t) = self.0.store.target(req.target)? else { return Ok(None) };
        let same_token = TokenHash::of(&self.0.pki.tokens().token(req.target)) == *hash;
        if !same_token || !t.enrolled || t.status.is_terminal() {
            return Ok(None);
        }
        if t.enrolled_key.as_deref() == Some(key) {
            tracing::info!(build = %t.build, target = %t.id, "enrollment retried with the same key");
            return Ok(Some(t));
        }
        tracing::warn!(build = %t.build, target = %t.id, "the spent token was presented with another key; failing the target");
        self.0.store.update_target(req.target, |r| {
            r.fail(
                FailureReason::EnrollmentConflict,
                "the target's spent enrollment token was presented again with a key other than the enrolled \
                 agent's: its user-data has leaked (to a script or process in the VM, or to whoever can read the \
                 instance's metadata), so no image is made; find who read it, then build again",
            )
        })?;
        Ok(None)
    }

    /// Checks that `peer` may act for `target`, and returns the target.
    pub fn authorize(&self, peer: Option<&PeerIdentity>, target: TargetId) -> Result<TargetRecord, AppError> {
        let peer = peer.ok_or_else(|| {
            AppError::Unauthorized("this route needs the client certificate issued at enrollment".into())
        })?;
        if peer.target != target {
            return Err(AppError::Forbidden(format!(
                "this certificate belongs to target {}, not {target}",
                peer.target
            )));
        }
        let cert = self.0.store.cert(&peer.serial)?;
        let record = self.0.store.target(target)?;
        match (cert, record) {
            (Some(c), Some(t)) if c.target == target && t.cert_serial.as_deref() == Some(peer.serial.as_str()) => {
                if t.status.is_terminal() {
                    Err(AppError::Forbidden(format!("target {target} has ended; its certificate opens nothing")))
                } else {
                    Ok(t)
                }
            }
            _ => Err(AppError::Forbidden("this certificate was not issued to this target".into())),
        }
    }

    /// The job: the revision's script and environment.
    pub async fn job(&self, peer: Option<&PeerIdentity>, target: TargetId) -> Result<Job, AppError> {
        let t = self.authorize(peer, target)?;
        let rev = self.revision(&t.generator, Some(t.revision))?;
        let timeout = self.script_timeout(&t);
        if t.timings.script_started_at.is_none() {
            self.0.store.update_target(target, |r| {
                r.timings.script_started_at.get_or_insert(Timestamp::now());
            })?;
            self.0.store.flush().await?;
            self.notify();
        }
        let mut env = rev.spec.env.clone();
        // Secrets reach the script only here, over mutual TLS, as plain
        // environment variables (never in user-data, never in a view).
        for (name, value) in self.0.store.secret_env(&t.generator, t.revision)? {
            env.insert(name, value.0);
        }
        env.insert("KILN_BUILD".into(), t.build.to_string());
        env.insert("KILN_CLOUD".into(), t.cloud.name.to_string());
        let network = self.0.providers.get(t.cloud.kind).and_then(|p| p.script_network(&t.cloud));
        let (egress_proxy, no_proxy) = network.map(|n| (Some(n.proxy), n.no_proxy)).unwrap_or_default();
        Ok(Job {
            target,
            script: rev.spec.script,
            env,
            timeout_secs: timeout.as_secs(),
            egress_proxy,
            no_proxy,
            generalize: rev.spec.generalize.unwrap_or(true),
        })
    }

    /// Appends a chunk idempotently and answers with the durable offset.
    /// Once the exit is reported, nothing past the reported total is taken.
    pub async fn append_log(
        &self,
        peer: Option<&PeerIdentity>,
        target: TargetId,
        offset: u64,
        bytes: bytes::Bytes,
    ) -> Result<LogAck, AppError> {
        let t = self.authorize(peer, target)?;
        let quota = self.0.config.limits.log_quota_bytes;
        if offset.saturating_add(bytes.len() as u64) > quota {
            return Err(self.fail_over_quota(&t, quota));
        }
        if let Some(total) = t.reported_total
            && offset.saturating_add(bytes.len() as u64) > total
        {
            return Err(AppError::Conflict(format!(
                "the exit was reported with {total} bytes of output; no output past it is taken"
            )));
        }
        let masker = self.masker(&t)?;
        if masker.is_empty() && !self.0.store.has_mask_cursor(target)? {
            return match self.0.logs.append(target, offset, bytes).await {
                Ok(Append::Committed(committed)) => {
                    self.notify();
                    Ok(LogAck { committed })
                }
                Ok(Append::Mismatch { committed }) => Err(AppError::LogMismatch { committed }),
                Err(e) => match AppError::from(e) {
                    AppError::DiskFull(why) => Err(self.fail_disk_full(&t, &why).await),
                    other => Err(other),
                },
            };
        }
        let committed = match self.append_masked(target, offset, &bytes, &masker, false).await {
            Err(AppError::DiskFull(why)) => return Err(self.fail_disk_full(&t, &why).await),
            other => other?,
        };
        Ok(LogAck { committed })
    }

    /// Fails a target whose log chunk found the data directory full (below
    /// its reserve); the committed log stays as it is. The reserve is there so
    /// that this write, and the unwind after it, still fit. The agent's
    /// answer: 507, then 403 once it tries again.
    async fn fail_disk_full(&self, t: &TargetRecord, full: &str) -> AppError {
        let dir = self.0.config.data_dir.display();
        tracing::error!(build = %t.build, target = %t.id, error = full, "the data directory is full; failing the target");
        let failed = self.0.store.update_target(t.id, |r| {
            r.fail(
                FailureReason::DiskFull,
                format!(
                    "the coordinator's data directory {dir} is full ({full}), so the script's output was cut off; \
                     the log up to there is kept. Free space on that disk (delete images you no longer need with \
                     `kiln image rm NAME`, and other files there), or move --data-dir to a larger disk, then build again"
                ),
            )
        });
        if let Err(e) = failed {
            return e.into();
        }
        if let Err(e) = self.0.store.flush().await {
            return e.into();
        }
        self.notify();
        AppError::DiskFull(format!("{full}; nothing of this chunk was kept and the target has failed"))
    }

    /// Fails a target whose output passed the log quota; the committed log
    /// stays as it is. The agent's answer: 413.
    fn fail_over_quota(&self, t: &TargetRecord, quota: u64) -> AppError {
        tracing::warn!(build = %t.build, target = %t.id, quota, "the script's output passed the log quota; failing the target");
        let failed = self.0.store.update_target(t.id, |r| {
            r.fail(
                FailureReason::LogQuota,
                format!(
                    "the script wrote more than the log quota of {quota} bytes; the log up to it is kept. \
                     Write less (send bulk output to a file), or raise --log-quota-bytes"
                ),
            )
        });
        if let Err(e) = failed {
            return e.into();
        }
        self.notify();
        AppError::PayloadTooLarge(format!("the target's log is limited to {quota} bytes; the target has failed"))
    }

    /// The secret values masked in a target's log: its revision's secret env
    /// and its cloud's stored credentials.
    fn masker(&self, t: &TargetRecord) -> Result<Masker, AppError> {
        let mut values: Vec<String> =
            self.0.store.secret_env(&t.generator, t.revision)?.into_values().map(|s| s.0).collect();
        match self.0.store.credentials(t.cloud_name())? {
            Some(CloudCredentials::AccessKey { secret_access_key, .. }) => values.push(secret_access_key),
            Some(CloudCredentials::Password { password }) => values.push(password),
            None => {}
        }
        Ok(Masker::new(values))
    }

    /// Appends to a masked log: one writer at a time, the masked bytes made
    /// durable first, then the cursor, then the answer. A crash in between
    /// leaves bytes past the stored cursor, cut off at the next append (the
    /// agent resends what was not acknowledged, masked the same again).
    /// With `end` the held-back bytes are written out: no output follows.
    async fn append_masked(
        &self,
        target: TargetId,
        offset: u64,
        bytes: &[u8],
        masker: &Masker,
        end: bool,
    ) -> Result<u64, AppError> {
        let _writer = self.0.logs.writer(target).await;
        let mut cursor = self.0.store.mask_cursor(target)?;
        if cursor == MaskCursor::default() {
            // Masking began after plain bytes were committed (credentials
            // added mid-build): those stay as they are.
            let len = self.0.logs.len(target).await?;
            cursor.raw = len;
            cursor.stored = len;
        }
        match masked_append(&cursor, offset, bytes, masker, end) {
            MaskedAppend::Committed(committed) => Ok(committed),
            MaskedAppend::Mismatch { committed } => Err(AppError::LogMismatch { committed }),
            MaskedAppend::Write { bytes, cursor: next } => {
                self.0.logs.write_masked(target, cursor.stored, bytes).await?;
                self.0.store.put_mask_cursor(target, &next)?;
                self.0.store.flush().await?;
                self.notify();
                Ok(next.raw)
            }
        }
    }

    /// Raw bytes committed: the agent's offset.
    async fn committed(&self, target: TargetId) -> Result<u64, AppError> {
        if self.0.store.has_mask_cursor(target)? {
            Ok(self.0.store.mask_cursor(target)?.raw)
        } else {
            Ok(self.0.logs.len(target).await?)
        }
    }

    /// Records how the script ended, once every byte of its output is committed.
    pub async fn report_exit(
        &self,
        peer: Option<&PeerIdentity>,
        target: TargetId,
        report: ExitReport,
    ) -> Result<LogAck, AppError> {
        let t = self.authorize(peer, target)?;
        let committed = self.committed(target).await?;
        if committed < report.total_bytes {
            return Err(AppError::LogMismatch { committed });
        }
        if committed == report.total_bytes && self.0.store.has_mask_cursor(target)? {
            // Every byte is in: what was held back as a possible secret's start is not one.
            let masker = self.masker(&t)?;
            if let Err(e) = self.append_masked(target, committed, &[], &masker, true).await {
                return Err(match e {
                    AppError::DiskFull(why) => self.fail_disk_full(&t, &why).await,
                    other => other,
                });
            }
        }
        if committed > report.total_bytes {
            let message =
                format!("the agent reported {} bytes of output but {committed} were committed", report.total_bytes);
            self.0.store.update_target(target, |r| r.fail(FailureReason::Internal, message.clone()))?;
            self.0.store.flush().await?;
            self.notify();
            return Err(AppError::Conflict(message));
        }
        if let Some(outcome) = &t.outcome {
            if outcome != &report.outcome {
                return Err(AppError::Conflict(format!("the exit was already reported as {outcome}")));
            }
        } else {
            self.0.store.update_target(target, |r| {
                r.outcome = Some(report.outcome.clone());
                r.reported_total = Some(report.total_bytes);
                r.timings.script_finished_at.get_or_insert(Timestamp::now());
            })?;
            self.0.store.flush().await?;
            tracing::info!(build = %t.build, target = %target, outcome = %report.outcome, bytes = committed, "script ended");
            self.notify();
        }
        Ok(LogAck { committed })
    }

    /// Long poll: the agent's next instruction, or `Wait` after `wait`.
    pub async fn instruction(
        &self,
        peer: Option<&PeerIdentity>,
        target: TargetId,
        wait: Duration,
    ) -> Result<Instruction, AppError> {
        let wait = wait.min(self.0.config.timeouts.instruction_wait);
        let mut rx = self.0.changes.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            rx.mark_unchanged();
            let t = self.authorize(peer, target)?;
            if t.instruction != Instruction::Wait {
                return Ok(t.instruction);
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Ok(Instruction::Wait) },
                () = tokio::time::sleep_until(deadline) => return Ok(Instruction::Wait),
                () = self.0.shutdown.cancelled() => return Ok(Instruction::Wait),
            }
        }
    }

    /// The agent has begun to seal the machine; this is for the log.
    pub async fn sealing(&self, peer: Option<&PeerIdentity>, target: TargetId) -> Result<(), AppError> {
        let t = self.authorize(peer, target)?;
        tracing::info!(build = %t.build, target = %target, "agent is sealing the machine");
        Ok(())
    }

    /// The agent has sealed the machine and powers off next. The seal step
    /// makes an image only of a target with this report, and only if every
    /// file system was scrubbed. A repeated report (its answer was lost)
    /// keeps the first.
    pub async fn sealed(
        &self,
        peer: Option<&PeerIdentity>,
        target: TargetId,
        report: SealReport,
    ) -> Result<(), AppError> {
        let t = self.authorize(peer, target)?;
        if t.instruction != Instruction::Seal {
            return Err(AppError::Conflict(format!("target {target} was not told to seal")));
        }
        if t.seal.is_none() {
            self.0.store.update_target(target, |r| {
                r.seal.get_or_insert_with(|| report.clone());
            })?;
            self.0.store.flush().await?;
            let scrubbed: Vec<String> = report
                .scrubbed
                .iter()
                .map(|s| {
                    let why = s.fallback.as_deref().map(|f| format!("; {f}")).unwrap_or_default();
                    format!("{} ({}, {:?}, {} MiB, {} ms{why})", s.mount, s.fs_type, s.method, s.bytes >> 20, s.millis)
                })
                .collect();
            tracing::info!(
                build = %t.build,
                target = %target,
                generalized = report.generalized,
                read_only = report.read_only,
                scrubbed = scrubbed.join(", "),
                "agent sealed the machine and is powering off"
            );
            self.notify();
        }
        Ok(())
    }

    /// Renders a target's user-data; the token is derived, so this gives the
    /// same bytes every time.
    pub(crate) fn user_data(
        &self,
        t: &TargetRecord,
        endpoints: &crate::providers::AgentEndpoints,
        token: &str,
    ) -> Result<String, AppError> {
        let binary = self
            .agent_binary()
            .ok_or_else(|| AppError::Unavailable("the coordinator has no agent binary to serve".into()))?;
        kiln_bootstrap::UserData {
            agent_url: &endpoints.agent_url,
            agent_binary_url: &endpoints.agent_binary_url(),
            ca_pem: self.pki().ca_pem(),
            agent_sha256: &binary.sha256,
            target: t.id,
            token,
            fetch_timeout_secs: kiln_bootstrap::DEFAULT_FETCH_TIMEOUT_SECS,
            ec2_identity: self.0.providers.get(t.cloud.kind).is_some_and(|p| p.checks_identity(&t.cloud)),
        }
        .render()
        .map_err(|e| AppError::Unavailable(format!("cannot render user-data: {e}")))
    }

    /// What a target's VM may reach through the egress proxy: its cloud's
    /// `egress` and `egress_allow` options, overridden by the target's own.
    /// A target that has ended reaches nothing.
    pub fn egress_policy(&self, target: &str) -> Result<crate::egress::Policy, AppError> {
        let id: TargetId = target.parse().map_err(|_| AppError::Forbidden(format!("{target:?} is not a target id")))?;
        let t = self.target_record(id)?;
        if t.status.is_terminal() {
            return Err(AppError::Forbidden(format!("target {id} has ended; its VM reaches nothing")));
        }
        crate::egress::Policy::from_layers(&t.cloud.options, &t.spec.options)
            .map_err(|e| AppError::BadRequest(e.to_string()))
    }

    pub(crate) fn script_timeout(&self, t: &TargetRecord) -> Duration {
        self.revision(&t.generator, Some(t.revision))
            .ok()
            .and_then(|r| r.spec.timeout_secs)
            .map(Duration::from_secs)
            .unwrap_or(self.0.config.timeouts.default_script)
    }
}
