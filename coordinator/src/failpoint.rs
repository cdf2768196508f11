//! Named points where a test stops the coordinator dead (`failpoints` feature).
//!
//! Built with the feature, `KILN_FAILPOINT=NAME[,NAME…]` makes a task that
//! reaches `hit(NAME)` print `kiln failpoint reached: NAME` on stderr and
//! wait forever, so that a test can SIGKILL the process exactly there and
//! check what a restart makes of it. The wait is an ordinary await, so a
//! cancel still interrupts the step that waits (and its unwind may reach the
//! next failpoint). Without the feature `hit` does nothing.

/// Every failpoint, in the order a build reaches them. `step-done:*` follow
/// each step's last write; `*:after-call` sit after a cloud call and before
/// its result is stored (the window where a crash leaves a resource unknown).
pub const ALL: &[&str] = &[
    "launch:before-call",
    "launch:after-call",
    "step-done:launch",
    "step-done:await_agent",
    "step-done:run",
    "step-done:seal",
    "start-image:before-call",
    "start-image:after-call",
    "wait-image:ready",
    "step-done:snapshot",
    "step-done:record",
    "terminate:after-call",
    "unwind:after-delete-image",
    "unwind:after-terminate",
];

#[cfg(feature = "failpoints")]
pub async fn hit(name: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    debug_assert!(ALL.contains(&name), "unknown failpoint {name}");
    let armed = ARMED.get_or_init(|| std::env::var("KILN_FAILPOINT").ok());
    if armed.as_deref().is_some_and(|list| list.split(',').any(|n| n == name)) {
        eprintln!("kiln failpoint reached: {name}");
        std::future::pending::<()>().await;
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn hit(_name: &str) {}

/// Whether every forward step runs twice, the second time from the record as
/// it was before the first (`KILN_REPEAT_STEPS=1`): each must then do nothing
/// new, which is what makes resuming after a crash safe.
#[cfg(feature = "failpoints")]
pub fn repeat_steps() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("KILN_REPEAT_STEPS").is_some_and(|v| v == "1"))
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn repeat_steps() -> bool {
    false
}
