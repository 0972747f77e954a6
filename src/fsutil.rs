//! File-system helpers shared by every command that writes output.

use anyhow::{Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Outputs being written (temporary files and directories): removed if the process is
/// interrupted by a signal before they are renamed into place.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Temporary outputs about to be created under a random name: `(directory, name prefix)`.
/// An interruption between the creation and [`PendingOutput::register`] removes what the
/// prefix matches.
static PENDING_PREFIXES: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());

/// Removes a path, file or directory, ignoring a missing one.
fn remove_path(p: &Path) {
    if p.is_dir() {
        // A writer may still be creating files in it: try a few times.
        for _ in 0..5 {
            if std::fs::remove_dir_all(p).is_ok() || !p.exists() {
                break;
            }
        }
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// A temporary output registered for removal on SIGINT, SIGTERM or SIGHUP (see
/// [`install_signal_cleanup`]); dropping the guard (after the rename, or on an error path,
/// where the temporary's own guard removes it) unregisters it.
#[derive(Debug)]
pub struct PendingOutput {
    path: PathBuf,
}

impl PendingOutput {
    /// Registers `path`, a temporary file or directory about to be filled.
    pub fn register(path: &Path) -> Self {
        PENDING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_path_buf());
        Self {
            path: path.to_path_buf(),
        }
    }

    /// Runs `f` (the final rename) while no signal handler can remove the temporary, and
    /// unregisters it: an interruption lands either before (nothing left) or after (the
    /// complete output) the rename, never in between.
    pub fn commit<T>(self, f: impl FnOnce() -> T) -> T {
        let mut list = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        let out = f();
        list.retain(|p| p != &self.path);
        drop(list);
        std::mem::forget(self);
        out
    }
}

impl Drop for PendingOutput {
    fn drop(&mut self) {
        PENDING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p != &self.path);
    }
}

/// Every entry of a directory whose name starts with a prefix, registered before a temporary
/// output with that prefix and a random tail is created, so that a signal landing between
/// the creation and [`PendingOutput::register`] still removes it (see
/// [`install_signal_cleanup`]); dropping the guard unregisters the prefix. The prefix names
/// the output (`.NAME.dorafuse-tmp-`), so it matches only temporaries of that output.
#[derive(Debug)]
pub struct PendingPrefix {
    entry: (PathBuf, String),
}

impl PendingPrefix {
    /// Registers entries of `dir` whose names start with `prefix`.
    pub fn register(dir: &Path, prefix: &str) -> Self {
        let entry = (dir.to_path_buf(), prefix.to_string());
        PENDING_PREFIXES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(entry.clone());
        Self { entry }
    }
}

impl Drop for PendingPrefix {
    fn drop(&mut self) {
        PENDING_PREFIXES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p != &self.entry);
    }
}

/// Installs handlers for SIGINT, SIGTERM and SIGHUP that remove every registered temporary
/// output and exit with 128 + the signal number, so that an interrupted command leaves no
/// partial output behind. (SIGKILL cannot be caught: its leftovers are dot-prefixed
/// temporaries, never a file under the output's name.)
///
/// # Errors
/// The handlers cannot be installed.
pub fn install_signal_cleanup() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("cannot install signal handlers")?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            // Held until exit, so no rename can complete after the removal.
            let list = PENDING.lock().unwrap_or_else(|e| e.into_inner());
            for p in list.iter() {
                remove_path(p);
            }
            let prefixes = PENDING_PREFIXES.lock().unwrap_or_else(|e| e.into_inner());
            for (dir, prefix) in prefixes.iter() {
                for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                    if e.file_name().to_string_lossy().starts_with(prefix.as_str()) {
                        remove_path(&e.path());
                    }
                }
            }
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

/// Streams bytes into a file through a 1 MiB buffer and starts the disk writeback of each
/// [`WRITEBACK_CHUNK`] as soon as it is written, waiting for the chunk before it: on Linux
/// `sync_file_range(2)` (`SYNC_FILE_RANGE_WRITE`, then `WAIT_BEFORE | WRITE | WAIT_AFTER`
/// on the previous chunk), elsewhere nothing. The disk then writes while the program
/// computes what comes next, the final `fsync` finds at most two chunks to flush, and the
/// dirty page cache of one output stays bounded (writing a 2 GB model otherwise leaves
/// all of it to a final flush that overlaps nothing). The bytes written are the same;
/// durability still comes from [`std::fs::File::sync_all`] at the end.
#[derive(Debug)]
pub struct StreamWriter {
    inner: std::io::BufWriter<File>,
    /// Bytes handed to `inner` so far (the file offset of the next byte).
    written: u64,
    /// The end of the range whose writeback was started last.
    started: u64,
    /// The start of that range.
    started_from: u64,
}

/// Bytes between two writeback requests of a [`StreamWriter`].
pub const WRITEBACK_CHUNK: u64 = 32 << 20;

impl StreamWriter {
    /// A writer at the start of `file`.
    pub fn new(file: File) -> Self {
        Self {
            inner: std::io::BufWriter::with_capacity(1 << 20, file),
            written: 0,
            started: 0,
            started_from: 0,
        }
    }

    /// Writes all of `buf`, starting writeback when another chunk is complete.
    ///
    /// # Errors
    /// As [`std::io::Write::write_all`].
    pub fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.inner.write_all(buf)?;
        self.written += buf.len() as u64;
        if self.written - self.started >= WRITEBACK_CHUNK {
            self.inner.flush()?;
            self.writeback();
        }
        Ok(())
    }

    /// Requests writeback of `started..written` and waits for the range before it.
    fn writeback(&mut self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd;
            let fd = self.inner.get_ref().as_raw_fd();
            let (prev_from, prev_to) = (self.started_from, self.started);
            // SAFETY: `fd` is the open descriptor of the file `inner` owns for the whole
            // call; sync_file_range only reads the ranges' state (no memory is passed), and
            // a failure (EINVAL on a file system without it, say) only loses the overlap:
            // the final fsync flushes everything either way, so its result is ignored.
            unsafe {
                libc::sync_file_range(
                    fd,
                    self.started as libc::off64_t,
                    (self.written - self.started) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
                if prev_to > prev_from {
                    libc::sync_file_range(
                        fd,
                        prev_from as libc::off64_t,
                        (prev_to - prev_from) as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                }
            }
        }
        self.started_from = self.started;
        self.started = self.written;
    }

    /// Flushes the buffer and returns the file (not yet synced to disk).
    ///
    /// # Errors
    /// The final buffer cannot be written.
    pub fn into_inner(self) -> std::io::Result<File> {
        self.inner.into_inner().map_err(|e| e.into_error())
    }
}

/// Checks, before a long run, that `path` can be written by [`write_atomic`]: its directory
/// exists, and an existing file there (or the file a symbolic link names) is writable.
///
/// # Errors
/// A missing directory, a path that is not a file path, or a file the user cannot write;
/// the message names `path`.
pub fn check_writable(path: &Path) -> Result<()> {
    let target = resolve(path)?;
    let dir = parent(&target);
    anyhow::ensure!(
        dir.is_dir(),
        "cannot write {}: no directory {}",
        path.display(),
        dir.display()
    );
    if target.exists() {
        // Opening for writing without truncating changes nothing and asks the OS, which
        // knows the permissions, ACLs and read-only mounts. Non-blocking, so a named pipe
        // without a reader is refused rather than waited on.
        let mut open = std::fs::OpenOptions::new();
        open.write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, libc::O_NONBLOCK);
        open.open(&target)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The file `path` names: the target of a symbolic link (followed to the end), else `path`.
fn resolve(path: &Path) -> Result<PathBuf> {
    anyhow::ensure!(
        path.file_name().is_some(),
        "cannot write {}: not a file path",
        path.display()
    );
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path)
            .with_context(|| format!("cannot write {}: a broken symbolic link", path.display())),
        _ => Ok(path.to_path_buf()),
    }
}

/// The directory of a file path (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Writes `path` atomically: `write` fills a temporary file created in the destination's own
/// directory (so the final rename never crosses a file system), the data is flushed to disk,
/// and the file is renamed over `path` only once everything succeeded.
///
/// On any failure (an error from `write`, a full disk, a failed rename) the temporary file is
/// removed and `path` is untouched: a failed run never leaves a half-written output behind,
/// and an existing file at `path` keeps its old contents. An existing file is replaced as an
/// edit in place would replace it: a symbolic link is followed and stays a link, the file's
/// permissions are kept, and a file the user cannot write is refused ([`check_writable`]).
///
/// # Errors
/// The destination directory does not exist or is not writable, the file exists and is not
/// writable, `write` fails, or the rename fails; the message names `path`.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut File) -> Result<()>,
{
    check_writable(path)?;
    let target = resolve(path)?;
    let dir = parent(&target);
    let file_name = target.file_name().expect("checked by resolve");
    // A dot-prefixed name in the same directory: hidden from globs such as `*.safetensors`
    // while it is being written, and removed by the guard's Drop if anything fails.
    let prefix = format!(".{}.dorafuse-tmp-", file_name.to_string_lossy());
    // Removed by the signal handler from before it exists (an interruption between creating
    // and registering it would otherwise leave it behind).
    let _creating = PendingPrefix::register(dir, &prefix);
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // A temporary file is private (0600) by default; the renamed output is an ordinary file:
    // the existing file's permissions, or the usual 0666 for a new one, less the umask, as
    // any other created file.
    let existing = std::fs::metadata(&target).ok().map(|m| m.permissions());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir).with_context(|| {
        format!(
            "cannot write {}: cannot create a file in {}",
            path.display(),
            dir.display()
        )
    })?;
    let pending = PendingOutput::register(tmp.path());
    if let Some(p) = existing {
        tmp.as_file()
            .set_permissions(p)
            .with_context(|| format!("writing {}: keeping its permissions", path.display()))?;
    }
    write(tmp.as_file_mut()).with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("writing {}: flushing to disk", path.display()))?;
    pending
        .commit(|| tmp.persist(&target))
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}: rename failed", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[cfg(unix)]
    #[test]
    fn rewriting_keeps_permissions_and_links_and_refuses_what_cannot_be_written() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.md");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_atomic(&path, |f| Ok(f.write_all(b"new")?)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            (std::fs::read_to_string(&path).unwrap().as_str(), mode),
            ("new", 0o600)
        );
        // A link stays a link; its target gets the contents.
        let link = dir.path().join("link.md");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        write_atomic(&link, |f| Ok(f.write_all(b"via link")?)).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "via link");
        // A missing directory is named before anything is written.
        let e = check_writable(&dir.path().join("no/such.json")).unwrap_err();
        assert!(e.to_string().contains("no directory"), "{e}");
        // Read-only: refused (root may write anyway, as the OS allows it).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let writable = std::fs::OpenOptions::new().write(true).open(&path).is_ok();
        let res = write_atomic(&path, |f| Ok(f.write_all(b"x")?));
        assert_eq!(res.is_ok(), writable, "{res:?}");
        if !writable {
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "via link");
        }
    }

    #[cfg(unix)]
    #[test]
    fn output_is_an_ordinary_file_not_a_private_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        write_atomic(&path, |f| Ok(f.write_all(b"abc")?)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        // Whatever the umask, the group/other read bits of 0666 survive the usual 022/002/027.
        assert_ne!(mode, 0o600, "output kept the temporary file's private mode");
        assert_eq!(mode & 0o600, 0o600);
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        write_atomic(&p, |f| Ok(f.write_all(b"one")?)).unwrap();
        write_atomic(&p, |f| Ok(f.write_all(b"two")?)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(entries(dir.path()), vec!["out.bin".to_string()]);
    }

    #[test]
    fn failure_leaves_nothing_and_keeps_old_contents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        let e = write_atomic(&p, |f| {
            f.write_all(b"partial")?;
            anyhow::bail!("simulated failure")
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("out.bin"), "{e:#}");
        assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
        write_atomic(&p, |f| Ok(f.write_all(b"good")?)).unwrap();
        assert!(write_atomic(&p, |_| anyhow::bail!("again")).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"good");
        assert_eq!(entries(dir.path()), vec!["out.bin".to_string()]);
    }

    #[test]
    fn missing_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no/such/dir/out.bin");
        let e = format!("{:#}", write_atomic(&p, |_| Ok(())).unwrap_err());
        assert!(e.contains("out.bin") && e.contains("no directory"), "{e}");
    }
}
