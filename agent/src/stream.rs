//! Ships the spool to the coordinator while the script runs: each chunk
//! tagged with its offset, resent from the committed offset after any failure.

use std::fs::File;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::client::{Failure, Retry, RetryPolicy};
use crate::spool::{MAX_CHUNK, read_chunk};

/// How often the spool is checked for new output while the script is quiet.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The coordinator's answer to a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put {
    /// Accepted: this many bytes are durable.
    Committed(u64),
    /// The chunk did not start at or agree with the committed log, which has this many bytes.
    Mismatch(u64),
}

/// Where log chunks go: the coordinator, or a fake in tests.
pub trait LogSink {
    fn put(&self, offset: u64, bytes: Vec<u8>) -> impl Future<Output = Result<Put, Failure>>;
}

pub struct Shipper<S> {
    sink: S,
    spool: Arc<File>,
    /// What the coordinator last said it holds.
    committed: u64,
    policy: RetryPolicy,
}

impl<S: LogSink> Shipper<S> {
    pub fn new(sink: S, spool: File, policy: RetryPolicy) -> Self {
        Shipper { sink, spool: Arc::new(spool), committed: 0, policy }
    }

    /// Takes the coordinator's committed offset, e.g. from a refused exit report.
    pub fn resync(&mut self, committed: u64) {
        self.committed = committed;
    }

    /// Sends the spool until `ended` is true and every byte is committed;
    /// returns the spool's length then.
    pub async fn ship(&mut self, ended: &mut watch::Receiver<bool>) -> anyhow::Result<u64> {
        let mut retry = Retry::new(self.policy, "sending the log");
        loop {
            // Read before the length: once the script has ended, nothing
            // is appended after this point, so `len` is the final length.
            let script_ended = *ended.borrow_and_update() || ended.has_changed().is_err();
            let len = self.spool.metadata().context("reading the spool's length")?.len();
            if self.committed > len {
                bail!("the coordinator holds {} bytes of log but the spool only {len}", self.committed);
            }
            if self.committed == len {
                if script_ended {
                    return Ok(len);
                }
                // Quiet script: look again soon, or at once when it ends.
                let _ = tokio::time::timeout(POLL_INTERVAL, ended.changed()).await;
                continue;
            }

            let offset = self.committed;
            let spool = self.spool.clone();
            let chunk = tokio::task::spawn_blocking(move || read_chunk(&spool, offset, MAX_CHUNK))
                .await?
                .context("reading the spool")?;
            let sent = chunk.len() as u64;
            match self.sink.put(offset, chunk).await {
                Ok(put) => {
                    let committed = match put {
                        Put::Committed(n) => n,
                        Put::Mismatch(n) => {
                            info!(offset, committed = n, "the coordinator holds a different offset: resending from it");
                            n
                        }
                    };
                    self.committed = committed;
                    if committed == offset {
                        // Neither taken nor redirected: do not hammer.
                        retry.after(anyhow!("the coordinator took none of {sent} bytes at offset {offset}")).await?;
                    } else {
                        debug!(offset, sent, committed, "log chunk committed");
                        retry.succeeded();
                    }
                }
                Err(Failure::Transient(err)) => retry.after(err).await?,
                Err(Failure::Fatal(err)) => return Err(err.context("sending the log")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::io::Write;

    use super::*;
    use crate::stop::Stop;

    /// A coordinator's log in memory, following a script of answers.
    #[derive(Default)]
    struct FakeLog {
        log: RefCell<Vec<u8>>,
        /// Answers to give before behaving normally, one per request.
        scripted: RefCell<Vec<Answer>>,
        offsets: RefCell<Vec<u64>>,
    }

    enum Answer {
        Down,
        Forbidden,
        /// Commit the chunk but lose the answer, as a dropped connection would.
        CommitThenDown,
    }

    impl LogSink for &FakeLog {
        async fn put(&self, offset: u64, bytes: Vec<u8>) -> Result<Put, Failure> {
            self.offsets.borrow_mut().push(offset);
            let answer = {
                let mut scripted = self.scripted.borrow_mut();
                (!scripted.is_empty()).then(|| scripted.remove(0))
            };
            let mut log = self.log.borrow_mut();
            match answer {
                Some(Answer::Down) => {
                    return Err(Failure::Transient(anyhow!("connection refused")));
                }
                Some(Answer::Forbidden) => return Err(Failure::Fatal(Stop::TargetEnded.into())),
                Some(Answer::CommitThenDown) | None => {}
            }
            if offset != log.len() as u64 {
                return Ok(Put::Mismatch(log.len() as u64));
            }
            log.extend_from_slice(&bytes);
            if matches!(answer, Some(Answer::CommitThenDown)) {
                return Err(Failure::Transient(anyhow!("connection reset")));
            }
            Ok(Put::Committed(log.len() as u64))
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy { max_backoff: Duration::from_millis(1), give_up: Duration::from_secs(10) }
    }

    fn spool_with(data: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(data).unwrap();
        file
    }

    fn ended() -> watch::Receiver<bool> {
        watch::channel(true).1
    }

    #[tokio::test]
    async fn ships_everything_in_capped_chunks() {
        let data: Vec<u8> = (0..MAX_CHUNK * 2 + 10).map(|i| i as u8).collect();
        let spool = spool_with(&data);
        let fake = FakeLog::default();
        let mut shipper = Shipper::new(&fake, spool.reopen().unwrap(), policy());
        assert_eq!(shipper.ship(&mut ended()).await.unwrap(), data.len() as u64);
        assert_eq!(*fake.log.borrow(), data);
        assert_eq!(*fake.offsets.borrow(), [0, MAX_CHUNK as u64, 2 * MAX_CHUNK as u64]);
    }

    // A lost answer makes the agent resend; the 409 moves it on.
    #[tokio::test]
    async fn resends_after_failures_and_resyncs_on_conflict() {
        let data = b"hello world\n".repeat(1000);
        let spool = spool_with(&data);
        let fake = FakeLog::default();
        *fake.scripted.borrow_mut() = vec![Answer::Down, Answer::CommitThenDown];
        let mut shipper = Shipper::new(&fake, spool.reopen().unwrap(), policy());
        assert_eq!(shipper.ship(&mut ended()).await.unwrap(), data.len() as u64);
        assert_eq!(*fake.log.borrow(), data);
        assert_eq!(*fake.offsets.borrow(), [0, 0, 0]);
    }

    // A resync to an earlier offset re-reads bytes the spool still holds.
    #[tokio::test]
    async fn resyncs_backwards() {
        let data = b"0123456789".to_vec();
        let spool = spool_with(&data);
        let fake = FakeLog::default();
        fake.log.borrow_mut().extend_from_slice(b"0123");
        let mut shipper = Shipper::new(&fake, spool.reopen().unwrap(), policy());
        shipper.resync(8);
        assert_eq!(shipper.ship(&mut ended()).await.unwrap(), 10);
        assert_eq!(*fake.log.borrow(), data);
        assert_eq!(*fake.offsets.borrow(), [8, 4]);
    }

    #[tokio::test]
    async fn stops_when_the_target_has_ended() {
        let spool = spool_with(b"output");
        let fake = FakeLog::default();
        *fake.scripted.borrow_mut() = vec![Answer::Forbidden];
        let mut shipper = Shipper::new(&fake, spool.reopen().unwrap(), policy());
        let err = shipper.ship(&mut ended()).await.unwrap_err();
        assert!(matches!(Stop::find(&err), Some(Stop::TargetEnded)), "{err:#}");
    }

    #[tokio::test]
    async fn gives_up_when_the_coordinator_stays_away() {
        let spool = spool_with(b"output");
        let fake = FakeLog::default();
        *fake.scripted.borrow_mut() = (0..1000).map(|_| Answer::Down).collect();
        let policy = RetryPolicy { max_backoff: Duration::from_millis(1), give_up: Duration::from_millis(20) };
        let mut shipper = Shipper::new(&fake, spool.reopen().unwrap(), policy);
        let err = shipper.ship(&mut ended()).await.unwrap_err();
        assert!(format!("{err:#}").starts_with("sending the log: gave up after"), "{err:#}");
    }

    // Output written while the script runs is shipped, and shipping ends
    // only once the script has ended and everything is committed.
    #[tokio::test]
    async fn follows_a_growing_spool_until_the_script_ends() {
        let mut spool = spool_with(b"first\n");
        let fake = FakeLog::default();
        let (ended_tx, mut ended_rx) = watch::channel(false);
        let mut shipper = Shipper::new(&fake, spool.reopen().unwrap(), policy());
        let writer = async {
            while fake.log.borrow().len() < 6 {
                tokio::task::yield_now().await;
            }
            spool.write_all(b"second\n").unwrap();
            ended_tx.send(true).unwrap();
        };
        let (shipped, ()) = tokio::join!(shipper.ship(&mut ended_rx), writer);
        assert_eq!(shipped.unwrap(), 13);
        assert_eq!(*fake.log.borrow(), b"first\nsecond\n");
    }
}
