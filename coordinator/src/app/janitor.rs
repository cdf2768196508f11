//! The janitor: removes what a crash left on a cloud.
//!
//! A crash in the middle of a cloud call (an instance launched, its id not yet
//! stored) leaves a resource no target record knows, so no undo will ever
//! remove it. Every resource kiln creates carries this coordinator's id
//! ([`CoordinatorId`](crate::providers::CoordinatorId)); the janitor asks each
//! cloud for what carries it ([`Provider::owned`](crate::providers::Provider::owned))
//! and removes what is garbage ([`verdict`], pure and unit-tested):
//!
//! - garbage: a resource whose target this coordinator does not know, or whose
//!   target has ended (successful, failed, cancelled);
//! - never garbage: an image recorded as a build's output (in the images tree,
//!   or a target's recorded `image`), its snapshots and its regional copies;
//! - left alone: a resource of an unfinished target (its workflow, or the
//!   resume at start-up, owns it), and one whose target record cannot be read.
//!
//! It runs once at start and then every `--janitor-interval-secs`; `GET` and
//! `POST /v1/janitor` run it on demand (dry run, removal). Clouds that ask for
//! their password at every build are skipped: the janitor has no password.

use std::collections::HashSet;
use std::time::Duration;

use kiln_protocol::TargetId;
use kiln_protocol::api::{Garbage, JanitorFailure, JanitorReport, JanitorSkip, Status};
use tokio_util::sync::CancellationToken;

use super::catalog::asks_password;
use super::{App, AppError};
use crate::providers::{OwnedResource, ResourceKind};
use crate::store::records::TargetRecord;

/// What the store says about the target a resource names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetKnown {
    /// The resource names no target, or one this coordinator never had.
    Unknown,
    /// The target has not ended: its workflow owns the resource.
    Unfinished,
    /// The target has ended with this status, and with this output image
    /// when it recorded one.
    Ended(Status, Option<String>),
    /// The record exists but cannot be read: leave the resource alone.
    Unreadable,
}

/// Why a resource is garbage, or `None` when it must stay. `protected` holds
/// the ids of every recorded output image.
pub fn verdict(resource: &OwnedResource, target: &TargetKnown, protected: &HashSet<String>) -> Option<String> {
    let output = match target {
        TargetKnown::Ended(_, image) => image.as_deref(),
        _ => None,
    };
    let recorded = |id: &str| protected.contains(id) || output == Some(id);
    if recorded(&resource.id) || resource.source_image.as_deref().is_some_and(recorded) {
        return None;
    }
    match target {
        TargetKnown::Unknown => Some(match resource.target {
            Some(t) => format!("its target {t} is unknown to this coordinator (a crash before its id was stored?)"),
            None => "it names no target".to_owned(),
        }),
        TargetKnown::Ended(status, _) => Some(format!("its target has ended ({})", status.as_str())),
        TargetKnown::Unfinished | TargetKnown::Unreadable => None,
    }
}

impl App {
    /// Finds this coordinator's garbage on every configured cloud and, unless
    /// `dry_run`, removes it. One run at a time.
    pub async fn janitor(&self, dry_run: bool) -> Result<JanitorReport, AppError> {
        let _one = self.0.janitor.lock().await;
        let mut report = JanitorReport { dry_run, found: Vec::new(), failed: Vec::new(), skipped: Vec::new() };
        // Several clouds may reach the same account (or the same data directory).
        let mut seen: HashSet<(ResourceKind, String, Option<String>)> = HashSet::new();
        for cloud in self.clouds()? {
            let skip = |why: String| JanitorSkip { cloud: cloud.name.clone(), why };
            if asks_password(&cloud) {
                report.skipped.push(skip(
                    "it asks for its password at every build, and the janitor has none; remove its leftovers by hand \
                     (they carry the kiln:coordinator tag)"
                        .into(),
                ));
                continue;
            }
            let Some(provider) = self.0.providers.get(cloud.kind) else {
                report
                    .skipped
                    .push(skip(format!("this kiln has no provider for clouds of kind {}", cloud.kind.as_str())));
                continue;
            };
            let with_credentials = match self.with_credentials(&cloud, None) {
                Ok(c) => c,
                Err(e) => {
                    report.skipped.push(skip(format!("its credentials cannot be read: {e}")));
                    continue;
                }
            };
            // Targets still running when the listing starts keep what it
            // finds of them, even if they end before it is looked at: their
            // own unwind is removing it (a server being deleted is still
            // listed), and a next run sees whatever it missed.
            let busy: HashSet<TargetId> = self.0.store.unfinished_targets()?.into_iter().map(|t| t.id).collect();
            let owned = match provider.owned(&with_credentials).await {
                Ok(owned) => owned,
                Err(e) => {
                    report.skipped.push(skip(format!("listing what this coordinator made there failed: {e}")));
                    continue;
                }
            };
            // Read after the listing, so an image recorded meanwhile is protected.
            let protected = self.protected_images()?;
            for resource in owned {
                if !seen.insert((resource.kind, resource.id.clone(), resource.region.clone())) {
                    continue;
                }
                let known = match resource.target {
                    Some(t) if busy.contains(&t) => TargetKnown::Unfinished,
                    target => self.target_known(target),
                };
                let Some(why) = verdict(&resource, &known, &protected) else { continue };
                let garbage = Garbage {
                    cloud: cloud.name.clone(),
                    kind: resource.kind,
                    id: resource.id.clone(),
                    region: resource.region.clone(),
                    target: resource.target,
                    why,
                };
                if dry_run {
                    report.found.push(garbage);
                    continue;
                }
                match provider.remove(&with_credentials, &resource).await {
                    Ok(()) => {
                        tracing::info!(
                            cloud = %cloud.name, kind = resource.kind.as_str(), id = %resource.id,
                            target = ?resource.target, why = %garbage.why, "janitor removed a leftover"
                        );
                        report.found.push(garbage);
                    }
                    Err(e) => {
                        let error = crate::error_chain(&e);
                        tracing::warn!(
                            cloud = %cloud.name, kind = resource.kind.as_str(), id = %resource.id,
                            %error, "janitor could not remove a leftover; the next run tries again"
                        );
                        report.failed.push(JanitorFailure { garbage, error });
                    }
                }
            }
        }
        Ok(report)
    }

    /// The ids of every image recorded as a build's output.
    fn protected_images(&self) -> Result<HashSet<String>, AppError> {
        Ok(self.0.store.images()?.into_iter().map(|i| i.id).collect())
    }

    fn target_known(&self, target: Option<TargetId>) -> TargetKnown {
        let Some(id) = target else { return TargetKnown::Unknown };
        match self.0.store.target(id) {
            Ok(None) => TargetKnown::Unknown,
            Ok(Some(t)) => known(&t),
            Err(e) => {
                tracing::warn!(target = %id, error = %crate::error_chain(&e), "janitor: unreadable target record; its resources stay");
                TargetKnown::Unreadable
            }
        }
    }
}

fn known(t: &TargetRecord) -> TargetKnown {
    if t.status.is_terminal() {
        TargetKnown::Ended(t.status, t.image.as_ref().map(|i| i.id.clone()))
    } else {
        TargetKnown::Unfinished
    }
}

/// Runs the janitor now and then every `interval` (never again when `None`)
/// until `stop`, logging what each run removed and could not remove.
pub async fn run_periodically(app: App, interval: Option<Duration>, stop: CancellationToken) {
    loop {
        // A run stops where it is at shutdown: every removal is idempotent.
        let run = tokio::select! {
            () = stop.cancelled() => return,
            run = app.janitor(false) => run,
        };
        match run {
            Ok(report) => {
                tracing::info!(removed = report.found.len(), failed = report.failed.len(), "janitor run done");
                for skip in &report.skipped {
                    tracing::info!(cloud = %skip.cloud, why = %skip.why, "janitor skipped a cloud");
                }
            }
            Err(e) => tracing::warn!(error = %crate::error_chain(&e), "janitor run failed"),
        }
        let Some(interval) = interval else { return };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(kind: ResourceKind, id: &str, source: Option<&str>) -> OwnedResource {
        OwnedResource {
            kind,
            id: id.into(),
            target: Some(TargetId::generate()),
            source_image: source.map(String::from),
            region: None,
        }
    }

    // Which resources are garbage: one case a line.
    #[test]
    fn verdicts() {
        use ResourceKind::*;
        use TargetKnown::*;
        let protected: HashSet<String> = ["ami-out".to_owned()].into();
        let cases: &[(OwnedResource, TargetKnown, bool)] = &[
            // A crash before the instance id was stored: the target does not know it.
            (resource(Instance, "i-1", None), Unknown, true),
            (resource(Instance, "i-1", None), Ended(Status::Cancelled, None), true),
            (resource(Instance, "i-1", None), Ended(Status::Failed, None), true),
            (resource(Instance, "i-1", None), Ended(Status::Successful, Some("ami-out".into())), true),
            // An unfinished target's resources belong to its workflow.
            (resource(Instance, "i-1", None), Unfinished, false),
            (resource(Image, "ami-half", None), Unfinished, false),
            (resource(Instance, "i-1", None), Unreadable, false),
            // A half-made image of an ended target goes.
            (resource(Image, "ami-half", None), Ended(Status::Failed, None), true),
            // A recorded output, its snapshots and its copies stay, whatever the target.
            (resource(Image, "ami-out", None), Ended(Status::Successful, None), false),
            // A successful target's own image stays even when the images tree lacks it.
            (resource(Image, "ami-own", None), Ended(Status::Successful, Some("ami-own".into())), false),
            (resource(Snapshot, "snap-3", Some("ami-own")), Ended(Status::Successful, Some("ami-own".into())), false),
            (resource(Image, "ami-out", None), Unknown, false),
            (resource(Snapshot, "snap-1", Some("ami-out")), Ended(Status::Successful, None), false),
            (resource(Image, "ami-copy", Some("ami-out")), Unknown, false),
            (resource(Snapshot, "snap-2", Some("ami-half")), Ended(Status::Failed, None), true),
        ];
        for (r, known, garbage) in cases {
            assert_eq!(verdict(r, known, &protected).is_some(), *garbage, "{r:?} with {known:?}");
        }
    }
}
