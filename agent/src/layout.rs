//! Where the agent keeps its files, all under `--dir`.

use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
    /// Holds the script and its work directory.
    pub job_dir: PathBuf,
    pub script: PathBuf,
    /// The script's working directory.
    pub work_dir: PathBuf,
    pub spool_dir: PathBuf,
    /// Everything the script wrote, stdout and stderr merged, in order.
    pub spool_file: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        let job_dir = dir.join("job");
        let spool_dir = dir.join("spool");
        Layout {
            dir: dir.to_owned(),
            script: job_dir.join("script"),
            work_dir: job_dir.join("work"),
            spool_file: spool_dir.join("output.log"),
            job_dir,
            spool_dir,
        }
    }

    /// Creates the directories (mode 0700) and an empty spool file.
    pub fn prepare(&self) -> io::Result<()> {
        let mut dirs = DirBuilder::new();
        dirs.recursive(true).mode(0o700);
        for dir in [&self.work_dir, &self.spool_dir] {
            dirs.create(dir)?;
        }
        OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&self.spool_file)?;
        Ok(())
    }
}
