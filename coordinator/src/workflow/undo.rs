//! Unwinding a failed or cancelled target: nothing may be left behind.

use kiln_protocol::Timestamp;
use kiln_protocol::agent::Instruction;
use kiln_protocol::api::{FailureReason, Status};

use super::steps::{call, provider, with_credentials};
use super::{StepError, plan};
use crate::app::App;
use crate::providers::{ImageId, InstanceId};
use crate::store::records::TargetRecord;

pub(super) async fn unwind(app: &App, t: &TargetRecord) -> Result<(), StepError> {
    let undo = plan::undo(t);
    let mut problems = Vec::new();
    // Tell a live agent to stop before its instance goes away.
    app.0.store.update_target(t.id, |r| r.instruction = Instruction::Finish)?;
    app.notify();
    if undo.delete_image.is_some() || undo.terminate.is_some() {
        // Without the provider or the cloud's credentials nothing can be undone:
        // the target still ends, and its error says what to remove by hand.
        match provider(app, t).and_then(|p| Ok((p, with_credentials(app, t)?))) {
            Ok((provider, t)) => {
                let t = &t;
                if let Some(image) = undo.delete_image.map(ImageId) {
                    match call("delete image", || provider.delete_image(&t.cloud, &image)).await {
                        Ok(()) => {
                            app.0.store.update_target(t.id, |r| r.image_id = None)?;
                            tracing::info!(%image, "half-made image deleted");
                        }
                        Err(e) => problems.push(format!("image {image} could not be deleted ({e}); delete it by hand")),
                    }
                }
                if let Some(instance) = undo.terminate.map(InstanceId) {
                    match call("terminate", || provider.terminate(&t.cloud, &instance)).await {
                        Ok(()) => tracing::info!(%instance, "instance terminated"),
                        Err(e) => problems
                            .push(format!("instance {instance} could not be terminated ({e}); terminate it by hand")),
                    }
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    app.0.store.remove_token(&app.token_hash(t.id).0)?;
    let cancelled = t.error.as_ref().is_some_and(|e| e.reason == FailureReason::Cancelled);
    app.0.store.update_target(t.id, |r| {
        if let Some(err) = r.error.as_mut() {
            for p in &problems {
                err.message.push_str("; clean-up: ");
                err.message.push_str(p);
            }
        }
        r.status = if cancelled { Status::Cancelled } else { Status::Failed };
        r.timings.finished_at.get_or_insert(Timestamp::now());
    })?;
    app.0.store.flush().await?;
    app.notify();
    tracing::info!(cancelled, "target unwound");
    Ok(())
}
