//! Power loss on a stopped broker's data directory: every write not covered by a completed
//! fsync is dropped, as the broker's sync ledger (`QUIVER_TEST_SYNC_LEDGER`,
//! `quiver_broker::storage::ledger`) tells. Call it only after `kill -9` (the process must
//! not run: it would write on).
//!
//! The rule, per regular file under the data directory (except `tls/`, written once before
//! the broker serves, and the files the harness or the lock own):
//! - the ledger names the file with a synced length (its last `sync`, lowered by later
//!   truncations, carried over renames): cut to that length if longer;
//! - the ledger names it as replaced whole (topic.json, producer ids): kept as it is;
//! - the ledger does not name it (never synced under this name): cut to 0 bytes if its
//!   directory was ever fsynced (the name may have reached the disk, its data did not), removed
//!   otherwise.
//!
//! Simplifications, each keeping more than a real disk might (never less): a file synced but
//! whose name's directory was not fsynced since its creation is kept; directories are kept;
//! removals and truncations count as durable at once.

use std::path::{Path, PathBuf};

use anyhow::Context;
use quiver_broker::storage::ledger::{Durable, DurableView};

/// What a power loss did to one data directory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PowerLoss {
    /// Files cut to their synced length, and the bytes dropped.
    pub cut: usize,
    pub bytes_dropped: u64,
    /// Files never synced, emptied or removed.
    pub emptied: usize,
    pub removed: usize,
    /// Those emptied or removed files, relative to the data directory.
    pub never_synced: Vec<PathBuf>,
}

impl std::fmt::Display for PowerLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} files cut to their synced length ({} bytes dropped), {} never-synced files emptied, {} removed",
            self.cut, self.bytes_dropped, self.emptied, self.removed
        )?;
        if !self.never_synced.is_empty() {
            let names: Vec<String> = self.never_synced.iter().map(|p| p.display().to_string()).collect();
            write!(f, " ({})", names.join(", "))?;
        }
        Ok(())
    }
}

/// Names at the top of a data directory that are not the broker's durable state.
const SKIPPED: [&str; 4] = ["tls", "quiverd.lock", "quiverd-test.log", "quiverd-test.toml"];

/// Applies a power loss to `data_dir` by the ledger at `ledger` (missing: nothing was synced).
pub fn power_loss(data_dir: &Path, ledger: &Path) -> anyhow::Result<PowerLoss> {
    let text = match std::fs::read_to_string(ledger) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", ledger.display())),
    };
    let view = DurableView::replay(&text);
    let mut files = Vec::new();
    for entry in std::fs::read_dir(data_dir).with_context(|| format!("listing {}", data_dir.display()))? {
        let entry = entry?;
        if SKIPPED.iter().any(|s| entry.file_name() == *s) {
            continue;
        }
        collect(&entry.path(), &mut files)?;
    }
    let mut done = PowerLoss::default();
    for path in files {
        let len = std::fs::metadata(&path)?.len();
        match view.files.get(&path) {
            Some(Durable::Whole) => {}
            Some(Durable::Prefix(n)) => {
                if len > *n {
                    cut(&path, *n)?;
                    done.cut += 1;
                    done.bytes_dropped += len - n;
                }
            }
            None => {
                let dir_synced = path.parent().is_some_and(|d| view.dirs.contains(d));
                if dir_synced {
                    if len > 0 {
                        cut(&path, 0)?;
                        done.bytes_dropped += len;
                        done.emptied += 1;
                        done.never_synced.push(path.strip_prefix(data_dir).unwrap_or(&path).to_path_buf());
                    }
                } else {
                    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                    done.bytes_dropped += len;
                    done.removed += 1;
                    done.never_synced.push(path.strip_prefix(data_dir).unwrap_or(&path).to_path_buf());
                }
            }
        }
    }
    Ok(done)
}

/// Every regular file at or under `path`.
fn collect(path: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            collect(&entry?.path(), out)?;
        }
    } else if meta.is_file() {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn cut(path: &Path, len: u64) -> anyhow::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(len).with_context(|| format!("cutting {} to {len} bytes", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_fall_back_to_what_the_ledger_says_was_synced() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let data = tmp.path().join("node-1");
        let part = data.join("topics/t/0");
        let fresh = data.join("fresh");
        std::fs::create_dir_all(&part)?;
        std::fs::create_dir_all(&fresh)?;
        std::fs::create_dir_all(data.join("tls"))?;
        let write = |p: &Path, n: usize| std::fs::write(p, vec![7u8; n]);
        write(&part.join("0.log"), 100)?;
        write(&part.join("raft-state"), 30)?;
        write(&part.join("unsynced.idx"), 12)?;
        write(&part.join("topic.json"), 50)?;
        write(&fresh.join("new.log"), 9)?;
        write(&data.join("tls/ca.pem"), 9)?;
        write(&data.join("quiverd.lock"), 5)?;
        let p = |name: &str| part.join(name).display().to_string();
        let ledger = tmp.path().join("node-1.synced.ledger");
        let text = format!(
            "dir\t-\t{}\nsync\t60\t{}\nsync\t30\t{}.tmp\nrename\t-\t{}.tmp\t{}\nwhole\t50\t{}\n",
            part.display(),
            p("0.log"),
            p("raft-state"),
            p("raft-state"),
            p("raft-state"),
            p("topic.json")
        );
        std::fs::write(&ledger, text)?;
        let done = power_loss(&data, &ledger)?;
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
        assert_eq!(len(&part.join("0.log")), Some(60));
        assert_eq!(len(&part.join("raft-state")), Some(30));
        assert_eq!(len(&part.join("unsynced.idx")), Some(0), "its directory was synced: emptied");
        assert_eq!(len(&part.join("topic.json")), Some(50));
        assert_eq!(len(&fresh.join("new.log")), None, "its directory was never synced: removed");
        assert_eq!(len(&data.join("tls/ca.pem")), Some(9));
        assert_eq!(len(&data.join("quiverd.lock")), Some(5));
        let never_synced = [PathBuf::from("fresh/new.log"), PathBuf::from("topics/t/0/unsynced.idx")];
        assert_eq!(done.never_synced.len(), 2);
        assert!(never_synced.iter().all(|p| done.never_synced.contains(p)), "{done:?}");
        assert_eq!((done.cut, done.bytes_dropped, done.emptied, done.removed), (1, 40 + 12 + 9, 1, 1));
        Ok(())
    }
}
