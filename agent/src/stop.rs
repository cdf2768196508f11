//! The ends of a run that have their own exit code.

use crate::cli::NEVER_POWEROFF_ENV;

#[derive(Debug, thiserror::Error)]
pub enum Stop {
    #[error("enrollment refused: token replayed, expired or wrong, or this machine's identity not accepted")]
    EnrollRefused,
    #[error("the coordinator says this target has ended or is not ours")]
    TargetEnded,
    #[error("refused to seal: {NEVER_POWEROFF_ENV}=1 forbids powering off this machine")]
    RefusedToSeal,
}

impl Stop {
    /// The `Stop` somewhere in `err`'s chain, if any.
    pub fn find(err: &anyhow::Error) -> Option<&Stop> {
        err.chain().find_map(|e| e.downcast_ref::<Stop>())
    }
}

/// The process exit code for a failed run: 1 unless a [`Stop`] says otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    match Stop::find(err) {
        Some(Stop::EnrollRefused) => 2,
        Some(Stop::TargetEnded) => 3,
        Some(Stop::RefusedToSeal) => 4,
        None => 1,
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    #[test]
    fn exit_codes_survive_context() {
        let wrapped = Err::<(), _>(Stop::TargetEnded).context("sending the log").context("running");
        assert_eq!(exit_code(&wrapped.unwrap_err()), 3);
        assert_eq!(exit_code(&Stop::EnrollRefused.into()), 2);
        assert_eq!(exit_code(&Stop::RefusedToSeal.into()), 4);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), 1);
    }
}
