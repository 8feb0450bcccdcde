//! The sync ledger: a test-only record of what a power loss would keep (docs/faults.md, "Power
//! loss"). Off unless `QUIVER_TEST_SYNC_LEDGER=<path>` is set when the broker starts.
//!
//! `kill -9` keeps the page cache, so a fault harness that only kills brokers never loses a
//! write that was not fsynced. To simulate a power loss it must know what was synced: with the
//! variable set, every operation that changes what a disk would keep appends one line to the
//! ledger file (a plain `write`, no fsync: the harness reads it after a `kill -9`, from the page
//! cache). The harness replays the lines ([`DurableView::replay`]) and cuts the files.
//!
//! Lines, fields separated by one tab, paths last as the broker spelled them:
//!
//! | line | written after |
//! |---|---|
//! | `sync <len> <path>` | a successful fsync of a file opened through [`FsStorage`](super::FsStorage); `len` is its length *before* the call (bytes appended during the fsync are not covered) |
//! | `trunc <len> <path>` | a successful truncation (taken as durable at once, as in [`MemStorage`](super::MemStorage)) |
//! | `remove - <path>` | a successful removal |
//! | `rename - <from>\t<to>` | a successful rename: `to` now has what `from` had synced |
//! | `dir - <path>` | a successful fsync of a directory |
//! | `whole <len> <path>` | a file written whole by tmp, fsync, rename, fsync of the directory outside the `Storage` trait (topic.json, producer ids): durable as a whole |
//!
//! Why a process-wide value rather than a handle passed in (STYLE §12): the hook must also see
//! the few files written with `std::fs` outside the `Storage` trait, and a test-only handle
//! threaded through every constructor would cost more than it shows. It is read once, by
//! [`init`] at start-up; when unset, files are not wrapped at all and the one cost is a load
//! per opened file and per directory operation.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::StorageFile;

/// The environment variable that turns the ledger on: the path of the file to append to.
pub const ENV: &str = "QUIVER_TEST_SYNC_LEDGER";

static LEDGER: OnceLock<Option<File>> = OnceLock::new();

/// Reads [`ENV`] once and opens the ledger it names (created if missing, appended to). Returns
/// the path when the ledger is on. Later calls return what the first decided.
pub fn init() -> io::Result<Option<PathBuf>> {
    let path = std::env::var_os(ENV).filter(|p| !p.is_empty()).map(PathBuf::from);
    let file = match &path {
        Some(p) => Some(OpenOptions::new().create(true).append(true).open(p)?),
        None => None,
    };
    let _ = LEDGER.set(file);
    Ok(path)
}

fn ledger() -> Option<&'static File> {
    LEDGER.get().and_then(Option::as_ref)
}

/// Whether [`init`] turned the ledger on.
pub fn enabled() -> bool {
    ledger().is_some()
}

/// One line, in one `write` (O_APPEND: lines of concurrent writers do not interleave). A failed
/// write is logged, not returned: the broker's own operation succeeded.
fn record(op: &str, len: Option<u64>, paths: &[&Path]) {
    let Some(mut file) = ledger() else { return };
    let mut line = String::with_capacity(96);
    line.push_str(op);
    line.push('\t');
    match len {
        Some(n) => line.push_str(&n.to_string()),
        None => line.push('-'),
    }
    for p in paths {
        line.push('\t');
        line.push_str(&p.to_string_lossy());
    }
    line.push('\n');
    if let Err(e) = file.write_all(line.as_bytes()) {
        tracing::error!("writing the test sync ledger: {e}");
    }
}

/// `file`, wrapped to record its syncs and truncations when the ledger is on.
pub(crate) fn wrap(path: &Path, file: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
    if enabled() {
        Arc::new(LedgerFile { path: path.to_path_buf(), inner: file })
    } else {
        file
    }
}

pub(crate) fn removed(path: &Path) {
    record("remove", None, &[path]);
}

pub(crate) fn renamed(from: &Path, to: &Path) {
    record("rename", None, &[from, to]);
}

pub(crate) fn dir_synced(dir: &Path) {
    record("dir", None, &[dir]);
}

/// Records that `path` was just replaced whole and made durable (tmp, fsync, rename, fsync of
/// its directory) by a writer outside the `Storage` trait.
pub fn replaced_whole(path: &Path) {
    if enabled() {
        let len = std::fs::metadata(path).map(|m| m.len()).ok();
        record("whole", len, &[path]);
    }
}

#[derive(Debug)]
struct LedgerFile {
    path: PathBuf,
    inner: Arc<dyn StorageFile>,
}

impl StorageFile for LedgerFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(pos, buf)
    }
    fn read_bytes(&self, pos: u64, len: usize) -> io::Result<Bytes> {
        self.inner.read_bytes(pos, len)
    }
    fn append(&self, data: &[u8]) -> io::Result<()> {
        self.inner.append(data)
    }
    fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        // The length does not change: what a power loss keeps is the same prefix.
        self.inner.write_at(pos, data)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)?;
        record("trunc", Some(len), &[&self.path]);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        // Before the call: an append racing with the fsync may or may not be covered.
        let len = self.inner.len()?;
        self.inner.sync()?;
        record("sync", Some(len), &[&self.path]);
        Ok(())
    }
}

/// What a power loss keeps of a file, by the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// Its first `n` bytes.
    Prefix(u64),
    /// All of it (a file replaced whole).
    Whole,
}

/// The ledger replayed: what each path named in it keeps, and which directories were synced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DurableView {
    /// Paths with something durable; a path not here was never synced under its name.
    pub files: BTreeMap<PathBuf, Durable>,
    /// Directories fsynced at least once.
    pub dirs: BTreeSet<PathBuf>,
}

impl DurableView {
    /// Replays a ledger's text. A line that does not parse (the last one, torn by a kill
    /// mid-write, say) is skipped.
    pub fn replay(text: &str) -> DurableView {
        let mut view = DurableView::default();
        for line in text.lines() {
            let mut fields = line.split('\t');
            let (Some(op), Some(len), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            let path = PathBuf::from(path);
            let len = len.parse::<u64>().ok();
            match (op, len) {
                ("sync", Some(n)) => {
                    view.files.insert(path, Durable::Prefix(n));
                }
                ("whole", _) => {
                    view.files.insert(path, Durable::Whole);
                }
                ("trunc", Some(n)) => {
                    if let Some(Durable::Prefix(m)) = view.files.get_mut(&path) {
                        *m = (*m).min(n);
                    }
                }
                ("remove", _) => {
                    view.files.remove(&path);
                }
                ("rename", _) => {
                    let Some(to) = fields.next() else { continue };
                    let to = PathBuf::from(to);
                    match view.files.remove(&path) {
                        Some(d) => view.files.insert(to, d),
                        None => view.files.remove(&to),
                    };
                }
                ("dir", _) => {
                    view.dirs.insert(path);
                }
                _ => {}
            }
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_follows_syncs_truncations_renames_and_removals() {
        let text = "dir\t-\t/d\n\
                    sync\t10\t/d/a.log\n\
                    sync\t25\t/d/a.log\n\
                    trunc\t20\t/d/a.log\n\
                    sync\t7\t/d/x.tmp\n\
                    rename\t-\t/d/x.tmp\t/d/x\n\
                    sync\t3\t/d/gone\n\
                    remove\t-\t/d/gone\n\
                    whole\t40\t/d/topic.json\n\
                    rename\t-\t/d/never.tmp\t/d/x2\n\
                    sync\t9\t/d/tor";
        let view = DurableView::replay(text);
        assert_eq!(view.files.get(Path::new("/d/a.log")), Some(&Durable::Prefix(20)));
        assert_eq!(view.files.get(Path::new("/d/x")), Some(&Durable::Prefix(7)));
        assert_eq!(view.files.get(Path::new("/d/x.tmp")), None);
        assert_eq!(view.files.get(Path::new("/d/gone")), None);
        assert_eq!(view.files.get(Path::new("/d/topic.json")), Some(&Durable::Whole));
        assert_eq!(view.files.get(Path::new("/d/x2")), None);
        // A last line without its newline still counts if whole; a torn field does not parse.
        assert_eq!(view.files.get(Path::new("/d/tor")), Some(&Durable::Prefix(9)));
        assert!(view.dirs.contains(Path::new("/d")));
        let torn = DurableView::replay("sync\t1");
        assert!(torn.files.is_empty());
    }
}
