//! All-or-nothing file writes, the one writer every output of the engine goes through.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary name next to `path` that no other writer uses (process id and a counter).
fn temporary_next_to(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("output");
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{n}.partial", std::process::id()))
}

/// `e`, or where `path`'s folder does not exist, an error that says so (the OS's "No such file
/// or directory" does not say which).
pub fn missing_folder(path: &Path, e: std::io::Error) -> std::io::Error {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if e.kind() == std::io::ErrorKind::NotFound && !dir.is_dir() {
        std::io::Error::new(e.kind(), format!("folder {} does not exist", dir.display()))
    } else {
        e
    }
}

/// A file written completely under a temporary name next to its destination, not yet renamed
/// into place: [`Staged::commit`] renames it; dropping it uncommitted removes it. Staging
/// several files then committing them all is how a multi-output write is all-or-nothing.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl Staged {
    /// The destination.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the temporary file over the destination.
    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes what `fill` produces into a new temporary file next to `path` (created exclusively,
/// so a planted file or symlink there is never followed) and syncs it; `path` is untouched
/// until [`Staged::commit`]. On failure nothing is left behind.
pub fn stage_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<Staged> {
    let tmp = temporary_next_to(path);
    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| missing_folder(path, e))?;
    let staged = Staged { tmp, path: path.to_path_buf(), committed: false };
    let mut w = std::io::BufWriter::new(f);
    fill(&mut w)?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    Ok(staged)
}

/// Writes what `fill` produces to `path` atomically: staged (see [`stage_with`]), then renamed
/// over `path`. On any failure `path` is left as it was and no temporary file remains. The
/// error is the underlying I/O error.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<()> {
    stage_with(path, fill)?.commit()
}

/// Opens a file for reading, refusing what is not a regular file (checked before opening, so a
/// FIFO does not block, and again on the opened handle); returns it with its length.
pub fn open_regular(path: &Path) -> std::io::Result<(std::fs::File, u64)> {
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok((file, meta.len()))
}

/// Reads a whole file, refusing what is not a regular file (a device such as `/dev/zero` or a
/// FIFO would never end, a folder cannot be read) and files over `max` bytes, before reading.
pub fn read_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let (mut file, len) = open_regular(path)?;
    if len > max {
        return Err(std::io::Error::other(format!("holds {len} bytes, more than the {max} accepted")));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// [`read_file`] as UTF-8 text.
pub fn read_text(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_file(path, max)?).map_err(|_| std::io::Error::other("not UTF-8 text"))
}

/// The most bytes a JSON or TOML file the engine reads may hold (configs, indexes, manifests,
/// board profiles): 16 MiB, far above any real one.
pub const MAX_TEXT_BYTES: u64 = 16 << 20;

/// True when `a` and `b` name the same existing file (same device and inode on Unix, same
/// canonical path elsewhere), however they are spelled (links, `..`, relative paths).
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Refuses an output path that is one of the `inputs` (the same file by inode or canonical
/// path): writing it would destroy the input. The message names both.
pub fn check_not_input(output: &Path, inputs: &[&Path]) -> Result<(), String> {
    match inputs.iter().find(|i| same_file(output, i)) {
        Some(i) => Err(format!(
            "{}: output would overwrite the input {}; choose another output path",
            output.display(),
            i.display()
        )),
        None => Ok(()),
    }
}

/// True for a name usable as one file name inside a folder the user named: not empty, no path
/// separator, not `.`/`..`, no leading dot (no hidden or temporary names), no control characters.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && !name.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}

/// Writes `bytes` to `path` atomically (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_names() {
        let dir = std::env::temp_dir().join(format!("pe-fsio-alias-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let p = dir.join("in.npy");
        std::fs::write(&p, b"x").unwrap();
        assert!(same_file(&p, &dir.join("sub/../in.npy")));
        std::os::unix::fs::symlink(&p, dir.join("link.npy")).unwrap();
        assert!(check_not_input(&dir.join("link.npy"), &[&p]).is_err());
        assert!(check_not_input(&dir.join("out.npy"), &[&p]).is_ok());
        assert!(is_plain_file_name("logits"));
        for bad in ["", "..", "../x", "/etc/passwd", ".hidden", "a/b", "a\\b", "a\nb"] {
            assert!(!is_plain_file_name(bad), "{bad:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn staged_files_appear_only_on_commit() {
        let dir = std::env::temp_dir().join(format!("pe-fsio-stage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = stage_with(&dir.join("a"), |w| w.write_all(b"a")).unwrap();
        let b = stage_with(&dir.join("b"), |w| w.write_all(b"b")).unwrap();
        assert!(!dir.join("a").exists());
        drop(b);
        a.commit().unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a")], "only the committed file remains");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_whole_file_or_nothing() {
        let dir = std::env::temp_dir().join(format!("pe-fsio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out.bin");
        write_atomic(&p, b"first").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        let err = write_atomic_with(&p, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("stop"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"first", "a failed write leaves the old file");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
