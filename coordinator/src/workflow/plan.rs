//! What to do next with a target, decided from its record and the step table
//! alone.
//!
//! Kept pure so that resuming after a crash is a unit-tested function. The
//! table ([`super::steps::SAGA`]) lists each step once with its undo; the
//! order of the steps, whether the output is recorded, and what an unwind
//! removes (in reverse order) are all derived from it here.

use kiln_protocol::api::Step;

use crate::store::records::TargetRecord;

/// One step of the saga: `+ forward - undo`.
#[derive(Debug)]
pub struct Row<F> {
    pub step: Step,
    /// What the step does; the table gives its function, the plan never calls it.
    pub forward: F,
    /// What removes the resource this step makes, if it makes one.
    pub undo: Option<Undo>,
    /// Past this step the output is recorded: from then on an output's undo
    /// ([`Undo::is_output`]) is never run again.
    pub commits: bool,
}

/// How a step's resource is removed when the target unwinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undo {
    /// Terminate the target's instance.
    TerminateInstance,
    /// Delete the half-made image.
    DeleteImage,
}

impl Undo {
    /// The resource this undo removes, as the record names it (none yet: nothing to undo).
    pub fn resource(self, t: &TargetRecord) -> Option<&str> {
        match self {
            Self::TerminateInstance => t.instance.as_deref(),
            Self::DeleteImage => t.image_id.as_deref(),
        }
    }

    /// Whether the resource becomes the build's output once recorded.
    pub fn is_output(self) -> bool {
        matches!(self, Self::DeleteImage)
    }
}

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

pub fn next<F>(saga: &[Row<F>], t: &TargetRecord) -> Next {
    if t.status.is_terminal() {
        Next::Nothing
    } else if t.error.is_some() {
        Next::Unwind
    } else if position(saga, t.step).is_none() {
        // Past the last step but not marked terminal: the last step (whose
        // final write this is) runs again.
        Next::Run(saga.last().expect("the saga has steps").step)
    } else {
        Next::Run(t.step)
    }
}

/// The step that follows `step` in the table; [`Step::Done`] after the last.
pub fn after<F>(saga: &[Row<F>], step: Step) -> Step {
    position(saga, step).and_then(|i| saga.get(i + 1)).map_or(Step::Done, |r| r.step)
}

/// Where `step` is in the table (`None` for [`Step::Done`]).
fn position<F>(saga: &[Row<F>], step: Step) -> Option<usize> {
    saga.iter().position(|r| r.step == step)
}

/// Whether the target is past a committing step: its output is recorded.
pub fn recorded<F>(saga: &[Row<F>], t: &TargetRecord) -> bool {
    let at = position(saga, t.step).unwrap_or(saga.len());
    saga[..at].iter().any(|r| r.commits)
}

/// What an unwind must remove, last made first: each undo in the table (in
/// reverse) whose resource the record names, except a recorded output.
pub fn undo<F>(saga: &[Row<F>], t: &TargetRecord) -> Vec<(Undo, String)> {
    let recorded = recorded(saga, t);
    saga.iter()
        .rev()
        .filter_map(|r| r.undo)
        .filter(|u| !(recorded && u.is_output()))
        .filter_map(|u| Some((u, u.resource(t)?.to_owned())))
        .collect()
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

    use crate::workflow::steps::SAGA;

    // Resume picks up where the record says, one case per line.
    #[test]
    fn resume_plan() {
        use Status::*;
        let cases = [
            (Step::Launch, Submitted, false, Next::Run(Step::Launch)),
            (Step::Run, Running, false, Next::Run(Step::Run)),
            (Step::Snapshot, Running, false, Next::Run(Step::Snapshot)),
            (Step::CleanUp, Running, false, Next::Run(Step::CleanUp)),
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
            assert_eq!(next(SAGA, &t), want, "{step:?} {status:?} failed={failed}");
        }
    }

    // The order of the steps is the table's, and Done follows the last.
    #[test]
    fn order_from_the_table() {
        let cases = [
            (Step::Launch, Step::AwaitAgent),
            (Step::AwaitAgent, Step::Run),
            (Step::Run, Step::Seal),
            (Step::Seal, Step::Snapshot),
            (Step::Snapshot, Step::Record),
            (Step::Record, Step::CleanUp),
            (Step::CleanUp, Step::Done),
            (Step::Done, Step::Done),
        ];
        for (step, want) in cases {
            assert_eq!(after(SAGA, step), want, "after {step:?}");
        }
    }

    // The output counts as recorded only past the committing Record step.
    #[test]
    fn recorded_from_the_table() {
        let cases = [
            (Step::Launch, false),
            (Step::Snapshot, false),
            (Step::Record, false),
            (Step::CleanUp, true),
            (Step::Done, true),
        ];
        for (step, want) in cases {
            assert_eq!(recorded(SAGA, &record(step, Status::Running)), want, "{step:?}");
        }
    }

    // An unwind removes what the record names, last made first; a half-made
    // image is deleted, a recorded one never is.
    #[test]
    fn undo_plan() {
        use Undo::*;
        let image = || (DeleteImage, "ami-1".to_owned());
        let instance = || (TerminateInstance, "i-1".to_owned());
        let cases = [
            (Step::Launch, false, false, vec![]),
            (Step::Launch, true, false, vec![instance()]),
            (Step::Run, true, false, vec![instance()]),
            (Step::Snapshot, true, true, vec![image(), instance()]),
            (Step::Record, true, true, vec![image(), instance()]),
            (Step::CleanUp, true, true, vec![instance()]),
            (Step::Done, true, true, vec![instance()]),
            (Step::Done, false, true, vec![]),
        ];
        for (step, has_instance, has_image, want) in cases {
            let mut t = record(step, Status::Running);
            t.instance = has_instance.then(|| "i-1".into());
            t.image_id = has_image.then(|| "ami-1".into());
            assert_eq!(undo(SAGA, &t), want, "{step:?} instance={has_instance} image={has_image}");
        }
    }

    // A custom table: a new resource is one row, and its undo joins the
    // unwind in table order with no other change.
    #[test]
    fn a_new_row_joins_order_and_undo() {
        let saga = [
            Row { step: Step::Launch, forward: (), undo: Some(Undo::TerminateInstance), commits: false },
            Row { step: Step::Snapshot, forward: (), undo: Some(Undo::DeleteImage), commits: false },
            Row { step: Step::CleanUp, forward: (), undo: None, commits: false },
        ];
        assert_eq!(after(&saga, Step::Launch), Step::Snapshot);
        assert_eq!(after(&saga, Step::CleanUp), Step::Done);
        let mut t = record(Step::CleanUp, Status::Running);
        t.instance = Some("i-1".into());
        t.image_id = Some("ami-1".into());
        // Nothing commits in this table: the image is still half-made.
        assert!(!recorded(&saga, &t));
        assert_eq!(
            undo(&saga, &t),
            vec![(Undo::DeleteImage, "ami-1".to_owned()), (Undo::TerminateInstance, "i-1".to_owned())]
        );
    }
}
