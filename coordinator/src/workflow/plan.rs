//! What to do next with a target, decided from its record alone.
//!
//! Kept pure so that resuming after a crash is a unit-tested function.

use kiln_protocol::api::Step;

use crate::store::records::TargetRecord;

/// The next action for a target's workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run this forward step (again, if it was interrupted: steps are idempotent).
    Run(Step),
    /// The target failed or was cancelled: undo what exists, then end it.
    Unwind,
    /// The target has ended.
    Nothing,
}

pub fn next(t: &TargetRecord) -> Next {
    if t.status.is_terminal() {
        Next::Nothing
    } else if t.error.is_some() {
        Next::Unwind
    } else if t.step == Step::Done {
        // Done but not marked terminal: the last write is redone by CleanUp.
        Next::Run(Step::CleanUp)
    } else {
        Next::Run(t.step)
    }
}

/// What an unwind must remove, given how far the target got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undo {
    /// Delete this half-made image (never one that was recorded).
    pub delete_image: Option<String>,
    /// Terminate this instance.
    pub terminate: Option<String>,
}

pub fn undo(t: &TargetRecord) -> Undo {
    let recorded = t.step >= Step::CleanUp;
    Undo { delete_image: if recorded { None } else { t.image_id.clone() }, terminate: t.instance.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::agent::Instruction;
    use kiln_protocol::api::{Cloud, CloudKind, FailureReason, Status, TargetSpec, Timings};
    use kiln_protocol::{BuildId, TargetId};

    fn record(step: Step, status: Status) -> TargetRecord {
        TargetRecord {
            id: TargetId::generate(),
            build: BuildId::generate(),
            cloud: Cloud {
                name: "local".parse().unwrap(),
                kind: CloudKind::Qemu,
                region: None,
                endpoint: None,
                options: Default::default(),
                credentials: None,
            },
            spec: TargetSpec {
                base_image: "base".into(),
                instance_type: None,
                network: None,
                options: Default::default(),
            },
            generator: "g".parse().unwrap(),
            revision: 1,
            status,
            step,
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
            timings: Timings::default(),
        }
    }

    // Resume picks up where the record says, one case per line.
    #[test]
    fn resume_plan() {
        use Status::*;
        let cases = [
            (Step::Launch, Submitted, false, Next::Run(Step::Launch)),
            (Step::Run, Running, false, Next::Run(Step::Run)),
            (Step::Snapshot, Running, false, Next::Run(Step::Snapshot)),
            (Step::Done, Running, false, Next::Run(Step::CleanUp)),
            (Step::Run, Running, true, Next::Unwind),
            (Step::Done, Successful, false, Next::Nothing),
            (Step::Run, Failed, true, Next::Nothing),
        ];
        for (step, status, failed, want) in cases {
            let mut t = record(step, status);
            if failed {
                t.fail(FailureReason::ScriptFailed, "exit 3");
            }
            assert_eq!(next(&t), want, "{step:?} {status:?} failed={failed}");
        }
    }

    // A half-made image is deleted on unwind; a recorded one never is.
    #[test]
    fn undo_plan() {
        let mut t = record(Step::Snapshot, Status::Running);
        t.instance = Some("i-1".into());
        t.image_id = Some("ami-1".into());
        assert_eq!(undo(&t), Undo { delete_image: Some("ami-1".into()), terminate: Some("i-1".into()) });
        t.step = Step::CleanUp;
        assert_eq!(undo(&t), Undo { delete_image: None, terminate: Some("i-1".into()) });
        let fresh = record(Step::Launch, Status::Submitted);
        assert_eq!(undo(&fresh), Undo { delete_image: None, terminate: None });
    }
}
