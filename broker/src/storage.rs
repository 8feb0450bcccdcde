//! Storage behind a small trait (docs/design.md §5, §6).
//!
//! The partition log only needs to create directories, list them, open files that it appends to
//! and reads from by position, truncate a torn tail, delete old segments, and fsync files and
//! directories. [`FsStorage`] does that with real files. [`MemStorage`] keeps files in memory
//! and remembers which bytes were synced, so a test can "pull the plug" with
//! [`MemStorage::crash`] and reopen a log from what a disk would really hold. With
//! `QUIVER_TEST_SYNC_LEDGER` set (tests only), [`FsStorage`] also records what it made durable,
//! so a fault harness can simulate a power loss on real files ([`ledger`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

/// A directory tree of append-only files.
pub trait Storage: Send + Sync + std::fmt::Debug + 'static {
    /// Creates `dir` and its missing parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the regular files directly in `dir` (not sorted).
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens `path` for reading and appending, creating it empty if missing. Never truncates.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens a segment's log file, like [`open`](Storage::open), for large sequential appends.
    /// The file may be longer than [`len`](StorageFile::len) says (padding that the log cuts
    /// when it seals the segment and that recovery drops), and only one handle may be open.
    fn open_segment(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        self.open(path)
    }
    /// Most file descriptors one file from [`open_segment`](Storage::open_segment) holds (the
    /// open-file budget of docs/design.md §5.6 counts with it).
    fn fds_per_segment_file(&self) -> u64 {
        1
    }
    /// Deletes a file. Handles already open stay readable (as with unlinked files on Unix).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Atomically renames a file, replacing `to` if it exists. Like creation, the new name is
    /// durable only after [`sync_dir`](Storage::sync_dir) of its directory; a crash before that
    /// may leave the old names (the temp-file, fsync, rename, fsync-directory pattern).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the creation and deletion of entries in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// One open file. Shared (`Arc`) between the log, which appends under its lock, and readers and
/// syncers, which work without it.
pub trait StorageFile: Send + Sync + std::fmt::Debug {
    /// Current length in bytes, synced or not.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Reads exactly `buf.len()` bytes at `pos`; `UnexpectedEof` if the file is shorter.
    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Reads `len` bytes at `pos` into a buffer of their own (what deliveries send).
    fn read_bytes(&self, pos: u64, len: usize) -> io::Result<Bytes> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(pos, &mut buf)?;
        Ok(Bytes::from(buf))
    }
    /// Writes `data` at the end of the file.
    fn append(&self, data: &[u8]) -> io::Result<()>;
    /// Overwrites `data.len()` bytes at `pos`, all below the file's length (never extends it):
    /// a damaged batch replaced by the same batch from another replica, the one write that
    /// changes bytes already in a segment. Durable after [`sync`](StorageFile::sync). Files
    /// that cannot do it say so (`Unsupported`), and the damage stays.
    fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        let _ = (pos, data);
        Err(io::Error::new(io::ErrorKind::Unsupported, "this file cannot be written in place"))
    }
    /// Cuts the file to `len` bytes.
    fn truncate(&self, len: u64) -> io::Result<()>;
    /// `fdatasync`: once it returns, every byte written before the call is durable.
    fn sync(&self) -> io::Result<()>;
}

#[cfg(test)]
pub(crate) mod countdown;
mod direct;
pub mod ledger;

/// Largest zero padding a segment file may carry past its last batch (one block).
pub const PADDING_BLOCK: usize = direct::BLOCK;
/// With `direct_writes`, writes of at least this many bytes bypass the page cache.
pub const DIRECT_MIN_BYTES: usize = direct::DIRECT_MIN_BYTES;

/// Real files through `std::fs`.
#[derive(Debug, Clone, Copy)]
pub struct FsStorage {
    direct_writes: bool,
}

impl Default for FsStorage {
    fn default() -> Self {
        FsStorage::new()
    }
}

impl FsStorage {
    /// The storage of the local file system, every write through the page cache.
    pub fn new() -> Self {
        FsStorage { direct_writes: false }
    }

    /// With `true`, large segment appends bypass the page cache (`O_DIRECT`, `direct.rs`)
    /// where the file system allows it; other files and small appends stay buffered.
    pub fn direct_writes(mut self, on: bool) -> Self {
        self.direct_writes = on;
        self
    }
}

impl Storage for FsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                // A non-UTF-8 name cannot be one of ours; the lossy form makes the caller skip it.
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        // O_APPEND: every write lands at the end, whatever a concurrent pread does.
        let file = OpenOptions::new().read(true).append(true).create(true).open(path)?;
        Ok(ledger::wrap(path, Arc::new(FsFile { file, path: path.to_path_buf() })))
    }

    fn fds_per_segment_file(&self) -> u64 {
        // A direct file is two descriptors: O_DIRECT for large appends, buffered for the rest.
        if self.direct_writes {
            2
        } else {
            1
        }
    }

    fn open_segment(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        if self.direct_writes {
            if let Some(file) = direct::open(path)? {
                return Ok(ledger::wrap(path, Arc::new(file)));
            }
        }
        self.open(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)?;
        ledger::removed(path);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)?;
        ledger::renamed(from, to);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()?;
        ledger::dir_synced(dir);
        Ok(())
    }
}

/// A file opened by [`FsStorage`]. (`File`'s `Debug` shows the path on Linux.)
#[derive(Debug)]
struct FsFile {
    file: File,
    /// For writes in place: `file` appends (O_APPEND), and Linux puts a `pwrite` on such a
    /// descriptor at the end whatever position it names.
    path: PathBuf,
}

impl StorageFile for FsFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, pos)
    }

    fn append(&self, data: &[u8]) -> io::Result<()> {
        (&self.file).write_all(data)
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        check_inside(pos, data.len(), self.len()?)?;
        // A descriptor of its own, without O_APPEND (rare: a repair); the caller's `sync`
        // covers it (an fdatasync on any descriptor of a file flushes all its dirty pages).
        let file = OpenOptions::new().write(true).open(&self.path)?;
        // The same file, not another one created under the name since (a topic deleted and
        // created again while the repair fetched its copy).
        let (mine, there) = (self.file.metadata()?, file.metadata()?);
        if (mine.dev(), mine.ino()) != (there.dev(), there.ino()) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "the file was replaced under its name"));
        }
        FileExt::write_all_at(&file, data, pos)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Refuses a write in place that would reach past `len`.
pub(crate) fn check_inside(pos: u64, n: usize, len: u64) -> io::Result<()> {
    match pos.checked_add(n as u64) {
        Some(end) if end <= len => Ok(()),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "a write in place past the end of the file")),
    }
}

/// Wraps every file a storage opens: the shape of the test doubles that fail, count or panic
/// on chosen file operations (see [`Wrapped`]).
pub trait FileWrapper: Send + Sync + std::fmt::Debug + 'static {
    /// The file handed out for `path`, built around the inner storage's `file`.
    fn wrap(&self, path: &Path, file: Arc<dyn StorageFile>) -> Arc<dyn StorageFile>;
}

/// A storage that forwards to `inner` and passes every file it opens through `wrapper`.
#[derive(Debug, Default)]
pub struct Wrapped<S, W> {
    /// The storage that does the work.
    pub inner: S,
    /// What every opened file is wrapped with (its state is the test's handle).
    pub wrapper: W,
}

impl<S: Storage, W: FileWrapper> Storage for Wrapped<S, W> {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(self.wrapper.wrap(path, self.inner.open(path)?))
    }
    fn open_segment(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(self.wrapper.wrap(path, self.inner.open_segment(path)?))
    }
    fn fds_per_segment_file(&self) -> u64 {
        self.inner.fds_per_segment_file()
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
}

/// In-memory storage that models what survives a power loss.
///
/// Each file keeps its bytes and how many of them a `sync` made durable; a directory's entries
/// (new names, renames) are durable only after `sync_dir` of that directory, until when a
/// crash brings back the entries of its last sync. [`crash`](MemStorage::crash) keeps exactly
/// the durable state. Simplifications, chosen because the log never relies on the opposite:
/// directories, truncations and removals are durable at once.
///
/// After a crash the storage holds fresh file objects, so handles from before the crash (a log
/// that was not dropped) can no longer change what a reopened log sees.
#[derive(Debug, Default)]
pub struct MemStorage {
    state: Mutex<MemState>,
}

#[derive(Debug, Default)]
struct MemState {
    dirs: BTreeSet<PathBuf>,
    /// The directory entries as the running system sees them.
    files: BTreeMap<PathBuf, Arc<MemFile>>,
    /// The directory entries a crash keeps: as of each directory's last `sync_dir` (removals
    /// apply at once).
    durable: BTreeMap<PathBuf, Arc<MemFile>>,
}

#[derive(Debug, Default)]
struct MemFile {
    data: Mutex<MemData>,
}

#[derive(Debug, Default, Clone)]
struct MemData {
    bytes: Vec<u8>,
    synced: usize,
}

impl MemStorage {
    /// An empty storage with no directories.
    pub fn new() -> Self {
        MemStorage::default()
    }

    /// Power loss: every file falls back to its synced length, and files whose names were never
    /// made durable disappear.
    pub fn crash(&self) {
        self.crash_torn(0);
    }

    /// Power loss during a write: like [`crash`](MemStorage::crash), but each file keeps up to
    /// `keep_unsynced` of its unsynced bytes, a torn tail.
    pub fn crash_torn(&self, keep_unsynced: usize) {
        self.crash_with(|data| {
            let keep = data.synced + keep_unsynced.min(data.bytes.len().saturating_sub(data.synced));
            data.bytes[..keep.min(data.bytes.len())].to_vec()
        });
    }

    /// Power loss with writes reaching the disk out of order (buffered writeback in any order,
    /// or a direct write overtaking buffered ones, or a disk cache that reorders): every file
    /// keeps all its unsynced bytes except those in `lost`, counted from the end of its synced
    /// bytes, which read back as zeros. Later unsynced bytes survive a lost block before them.
    pub fn crash_reordered(&self, lost: std::ops::Range<usize>) {
        self.crash_with(|data| {
            let mut bytes = data.bytes.clone();
            let end = bytes.len();
            let from = data.synced.saturating_add(lost.start).min(end);
            let to = data.synced.saturating_add(lost.end).min(end);
            bytes[from..to.max(from)].fill(0);
            bytes
        });
    }

    /// Power loss: every durable name keeps a fresh file holding `survive(old contents)`, all of
    /// it synced.
    fn crash_with(&self, survive: impl Fn(&MemData) -> Vec<u8>) {
        let mut state = self.state.lock();
        let durable = std::mem::take(&mut state.durable);
        // One file under two durable names (a rename over a synced directory) stays one file.
        let mut fresh: Vec<(*const MemFile, Arc<MemFile>)> = Vec::new();
        let mut files = BTreeMap::new();
        for (path, file) in durable {
            let key = Arc::as_ptr(&file);
            let new = match fresh.iter().find(|(k, _)| *k == key) {
                Some((_, f)) => f.clone(),
                None => {
                    let bytes = survive(&file.data.lock());
                    let synced = bytes.len();
                    let f = Arc::new(MemFile { data: Mutex::new(MemData { bytes, synced }) });
                    fresh.push((key, f.clone()));
                    f
                }
            };
            files.insert(path, new);
        }
        state.durable = files.clone();
        state.files = files;
    }

    /// All bytes of a file, synced or not; `None` if it does not exist. For tests.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.state.lock();
        let file = state.files.get(path)?;
        let bytes = file.data.lock().bytes.clone();
        Some(bytes)
    }

    /// How many leading bytes of `path` a crash now would keep: its synced length, if its name
    /// is durable and names the file the running system sees; `None` otherwise. For tests.
    pub fn durable_len(&self, path: &Path) -> Option<u64> {
        let state = self.state.lock();
        let (live, durable) = (state.files.get(path)?, state.durable.get(path)?);
        if !Arc::ptr_eq(live, durable) {
            return None;
        }
        let synced = durable.data.lock().synced;
        Some(synced as u64)
    }

    /// Replaces (or creates) a file with `bytes`, all durable, as a test's way to damage a file
    /// behind the log's back. The parent directory must exist.
    pub fn set_contents(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock();
        check_parent(&state, path)?;
        let data = MemData { bytes: bytes.to_vec(), synced: bytes.len() };
        let file = Arc::new(MemFile { data: Mutex::new(data) });
        state.files.insert(path.to_path_buf(), file.clone());
        state.durable.insert(path.to_path_buf(), file);
        Ok(())
    }
}

fn check_parent(state: &MemState, path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if state.dirs.contains(parent) => Ok(()),
        _ => Err(io::Error::new(io::ErrorKind::NotFound, format!("no directory for {}", path.display()))),
    }
}

impl Storage for MemStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        for ancestor in dir.ancestors() {
            state.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.state.lock();
        if !state.dirs.contains(dir) {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("no directory {}", dir.display())));
        }
        let names = state
            .files
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        Ok(names)
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.state.lock();
        if let Some(file) = state.files.get(path) {
            return Ok(file.clone());
        }
        check_parent(&state, path)?;
        let file = Arc::new(MemFile::default());
        state.files.insert(path.to_path_buf(), file.clone());
        Ok(file)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        match state.files.remove(path) {
            Some(_) => {
                state.durable.remove(path);
                Ok(())
            }
            None => Err(io::Error::new(io::ErrorKind::NotFound, format!("no file {}", path.display()))),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        check_parent(&state, to)?;
        match state.files.remove(from) {
            Some(file) => {
                state.files.insert(to.to_path_buf(), file);
                Ok(())
            }
            None => Err(io::Error::new(io::ErrorKind::NotFound, format!("no file {}", from.display()))),
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        if !state.dirs.contains(dir) {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("no directory {}", dir.display())));
        }
        let MemState { files, durable, .. } = &mut *state;
        durable.retain(|path, _| path.parent() != Some(dir) || files.contains_key(path));
        for (path, file) in files.iter() {
            if path.parent() == Some(dir) {
                durable.insert(path.clone(), file.clone());
            }
        }
        Ok(())
    }
}

impl StorageFile for MemFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().bytes.len() as u64)
    }

    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.data.lock();
        let start = usize::try_from(pos).unwrap_or(usize::MAX);
        let src = start.checked_add(buf.len()).and_then(|end| data.bytes.get(start..end));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the file")),
        }
    }

    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        self.data.lock().bytes.extend_from_slice(bytes);
        Ok(())
    }

    fn write_at(&self, pos: u64, bytes: &[u8]) -> io::Result<()> {
        let mut data = self.data.lock();
        check_inside(pos, bytes.len(), data.bytes.len() as u64)?;
        let at = pos as usize;
        data.bytes[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        let mut data = self.data.lock();
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        data.bytes.resize(len, 0);
        data.synced = data.synced.min(len);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut data = self.data.lock();
        data.synced = data.bytes.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(storage: &dyn Storage, dir: &Path) -> io::Result<()> {
        storage.create_dir_all(dir)?;
        let path = dir.join("a.log");
        let file = storage.open(&path)?;
        file.append(b"hello ")?;
        file.append(b"world")?;
        assert_eq!(file.len()?, 11);
        let mut buf = [0u8; 5];
        file.read_exact_at(6, &mut buf)?;
        assert_eq!(&buf, b"world");
        assert_eq!(file.read_exact_at(8, &mut buf).map_err(|e| e.kind()), Err(io::ErrorKind::UnexpectedEof));
        // Reopening never truncates, and appends still go to the end after a truncate.
        let again = storage.open(&path)?;
        assert_eq!(again.len()?, 11);
        again.truncate(5)?;
        again.append(b"!")?;
        let mut all = [0u8; 6];
        file.read_exact_at(0, &mut all)?;
        assert_eq!(&all, b"hello!");
        file.sync()?;
        storage.sync_dir(dir)?;
        assert_eq!(storage.list(dir)?, vec!["a.log".to_string()]);
        storage.remove(&path)?;
        assert!(storage.list(dir)?.is_empty());
        // An open handle stays readable after removal.
        file.read_exact_at(0, &mut all)?;
        Ok(())
    }

    #[test]
    fn fs_storage_behaves() -> io::Result<()> {
        let tmp = tempfile::tempdir()?;
        exercise(&FsStorage::new(), &tmp.path().join("p/0"))
    }

    #[test]
    fn mem_storage_behaves() -> io::Result<()> {
        exercise(&MemStorage::new(), Path::new("/data/p/0"))
    }

    #[test]
    fn crash_keeps_only_synced_bytes_and_names() -> io::Result<()> {
        let storage = MemStorage::new();
        let dir = Path::new("/d");
        storage.create_dir_all(dir)?;
        let a = storage.open(&dir.join("a"))?;
        a.append(b"durable")?;
        a.sync()?;
        storage.sync_dir(dir)?;
        a.append(b" lost")?;
        let b = storage.open(&dir.join("b"))?;
        b.append(b"never named")?;
        b.sync()?;
        storage.crash();
        assert_eq!(storage.contents(&dir.join("a")).as_deref(), Some(&b"durable"[..]));
        assert_eq!(storage.contents(&dir.join("b")), None);
        // The old handle is detached from the crashed state.
        a.append(b"zombie")?;
        assert_eq!(storage.open(&dir.join("a"))?.len()?, 7);
        Ok(())
    }

    #[test]
    fn torn_crash_keeps_a_prefix_of_unsynced_bytes() -> io::Result<()> {
        let storage = MemStorage::new();
        let dir = Path::new("/d");
        storage.create_dir_all(dir)?;
        let a = storage.open(&dir.join("a"))?;
        storage.sync_dir(dir)?;
        a.append(b"abc")?;
        a.sync()?;
        a.append(b"defgh")?;
        storage.crash_torn(2);
        assert_eq!(storage.contents(&dir.join("a")).as_deref(), Some(&b"abcde"[..]));
        storage.crash_torn(100);
        assert_eq!(storage.contents(&dir.join("a")).as_deref(), Some(&b"abcde"[..]));
        Ok(())
    }

    #[test]
    fn reordered_crash_loses_a_block_in_the_middle() -> io::Result<()> {
        let storage = MemStorage::new();
        let dir = Path::new("/d");
        storage.create_dir_all(dir)?;
        let a = storage.open(&dir.join("a"))?;
        storage.sync_dir(dir)?;
        a.append(b"abc")?;
        a.sync()?;
        a.append(b"defgh")?;
        storage.crash_reordered(1..3);
        assert_eq!(storage.contents(&dir.join("a")).as_deref(), Some(&b"abcd\0\0gh"[..]));
        Ok(())
    }

    #[test]
    fn rename_is_durable_only_after_sync_dir() -> io::Result<()> {
        let storage = MemStorage::new();
        let dir = Path::new("/d");
        storage.create_dir_all(dir)?;
        let (old, tmp, dst) = (dir.join("f"), dir.join("f.tmp"), dir.join("f"));
        let f = storage.open(&old)?;
        f.append(b"old")?;
        f.sync()?;
        storage.sync_dir(dir)?;
        let t = storage.open(&tmp)?;
        t.append(b"new")?;
        t.sync()?;
        storage.rename(&tmp, &dst)?;
        assert_eq!(storage.contents(&dst).as_deref(), Some(&b"new"[..]));
        assert_eq!(storage.contents(&tmp), None);
        storage.crash();
        // The rename was never made durable: the old name and contents come back.
        assert_eq!(storage.contents(&dst).as_deref(), Some(&b"old"[..]));
        assert_eq!(storage.contents(&tmp), None);
        let t = storage.open(&tmp)?;
        t.append(b"new")?;
        t.sync()?;
        storage.rename(&tmp, &dst)?;
        storage.sync_dir(dir)?;
        storage.crash();
        assert_eq!(storage.contents(&dst).as_deref(), Some(&b"new"[..]));
        assert_eq!(storage.contents(&tmp), None);
        Ok(())
    }

    #[test]
    fn open_without_directory_fails() {
        let storage = MemStorage::new();
        assert!(storage.open(Path::new("/nowhere/x")).is_err());
        assert!(storage.list(Path::new("/nowhere")).is_err());
    }
}
