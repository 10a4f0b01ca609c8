//! All-or-nothing output folders: everything is written into a work folder next to OUT and
//! moved into OUT at the end; a failure removes the work folder and leaves OUT as it was.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A command's work folder (`tune`, `distill`): a new folder next to OUT (unique name, created exclusively), moved
/// into place by [`WorkDir::finish`]; removed with what it holds if tune fails.
pub(crate) struct WorkDir {
    pub(crate) path: PathBuf,
    out: PathBuf,
    done: bool,
}

impl WorkDir {
    /// Creates `.{OUT name}.{what}-{pid}.partial` next to `out`.
    pub(crate) fn create(out: &Path, what: &str) -> Result<WorkDir> {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = out.file_name().and_then(|n| n.to_str()).context("-o must name a folder")?;
        if out.exists() && !out.is_dir() {
            bail!("{}: exists and is not a folder ({what} writes a folder)", out.display());
        }
        let path = parent.join(format!(".{name}.{what}-{}.partial", std::process::id()));
        std::fs::create_dir(&path)
            .map_err(|e| perceiver_edge_runtime::fsio::missing_folder(out, e))
            .with_context(|| format!("{}: cannot create", out.display()))?;
        Ok(WorkDir { path, out: out.to_path_buf(), done: false })
    }

    /// Moves the results into OUT: the whole folder when OUT does not exist yet, otherwise
    /// file by file (each replaced atomically), then removes the work folder.
    pub(crate) fn finish(mut self) -> Result<()> {
        let _ = std::fs::remove_dir_all(self.path.join("candidates"));
        if !self.out.exists() {
            std::fs::rename(&self.path, &self.out).with_context(|| format!("{}: cannot create", self.out.display()))?;
        } else {
            for e in std::fs::read_dir(&self.path)? {
                let e = e?;
                let to = self.out.join(e.file_name());
                if e.path().is_dir() && to.is_dir() {
                    std::fs::remove_dir_all(&to).with_context(|| format!("{}: cannot replace", to.display()))?;
                }
                std::fs::rename(e.path(), &to).with_context(|| format!("{}: cannot write", to.display()))?;
            }
            std::fs::remove_dir(&self.path)?;
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
