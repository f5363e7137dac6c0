//! Directories that appear whole or not at all: written under a hidden sibling name, then renamed
//! into place. Used by `prepare`, `generate` and checkpoints, so an error or a crash midway never
//! leaves a half-written result where a good one is expected, and never destroys the old one.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::error::UserError;

pub struct StagingDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// Starts writing what will become `dest` (its parent is created if needed).
    pub fn new(dest: &Path) -> Result<Self> {
        let parent = parent_of(dest);
        fs::create_dir_all(&parent).with_context(|| format!("create {}", parent.display()))?;
        let name = dest
            .file_name()
            .context("the destination has no file name")?
            .to_string_lossy();
        recover(&parent, &name, dest)?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Makes the staged directory durable and puts it in place of `dest`. An old `dest` is moved
    /// aside first and deleted only once the new one is in place.
    pub fn commit(mut self) -> Result<PathBuf> {
        fsync(&self.tmp)?;
        let parent = parent_of(&self.dest);
        if self.dest.exists() {
            let name = self
                .dest
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            fs::rename(&self.dest, &old)
                .with_context(|| format!("move {} aside", self.dest.display()))?;
            fs::rename(&self.tmp, &self.dest)?;
            fs::remove_dir_all(&old).with_context(|| format!("remove {}", old.display()))?;
        } else {
            fs::rename(&self.tmp, &self.dest)
                .with_context(|| format!("rename into {}", self.dest.display()))?;
        }
        fsync(&parent)?;
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Cleans up after a process that died while staging `dest`: its half-written `.tmp-PID`
/// directories are deleted, and an `.old-PID` left between the two renames of a commit is put
/// back if `dest` went missing (else deleted). Live processes' directories are left alone.
fn recover(parent: &Path, name: &str, dest: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&format!(".{name}.")) else {
            continue;
        };
        let (kind, pid) = rest.split_once('-').unwrap_or((rest, ""));
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match kind {
            "old" if !dest.exists() => {
                eprintln!(
                    "recovering {} from an interrupted replacement",
                    dest.display()
                );
                fs::rename(entry.path(), dest)?;
            }
            "tmp" | "old" => fs::remove_dir_all(entry.path())
                .with_context(|| format!("remove the stale {}", entry.path().display()))?,
            _ => {}
        }
    }
    Ok(())
}

/// A filesystem error while writing `dest` (the value of `flag`) through a staging directory,
/// told with the user's path instead of the hidden sibling's, and the fix. A permission, space
/// or path problem is the user's to fix: a [`UserError`] (exit 2).
pub fn write_error(flag: &str, dest: &Path, e: anyhow::Error) -> anyhow::Error {
    use std::io::ErrorKind;
    let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>());
    let user_fixable = io.is_some_and(|io| {
        matches!(
            io.kind(),
            ErrorKind::PermissionDenied
                | ErrorKind::ReadOnlyFilesystem
                | ErrorKind::StorageFull
                | ErrorKind::QuotaExceeded
                | ErrorKind::NotADirectory
                | ErrorKind::AlreadyExists
        )
    });
    let why = io.map_or_else(|| format!("{e:#}"), |io| io.to_string());
    let parent = parent_of(dest);
    let message = format!(
        "cannot write {flag} {}: {why}; it is written beside it, in {}, then renamed into place: \
         make {} writable by this user, with room for the output, or give another {flag}",
        dest.display(),
        parent.display(),
        parent.display()
    );
    if user_fixable {
        anyhow::Error::new(UserError(message))
    } else {
        anyhow::anyhow!(message)
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Flushes a file or directory entry to disk.
pub fn fsync(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_dead_processes_are_cleaned_or_restored() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("data");
        // PID 4194304 is above Linux's maximum, so it is never alive.
        fs::create_dir(root.path().join(".data.tmp-4194304")).unwrap();
        fs::create_dir(root.path().join(".data.old-4194304")).unwrap();
        fs::write(root.path().join(".data.old-4194304/train.bin"), "good").unwrap();
        let s = StagingDir::new(&dest).unwrap();
        assert_eq!(
            fs::read_to_string(dest.join("train.bin")).unwrap(),
            "good",
            "restored"
        );
        assert!(
            !root.path().join(".data.tmp-4194304").exists(),
            "stale staging removed"
        );
        drop(s);
        let names: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["data"]);
    }

    #[test]
    fn dropped_staging_leaves_nothing_and_commit_replaces() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("old"), "good").unwrap();
        {
            let s = StagingDir::new(&dest).unwrap();
            fs::write(s.path().join("half"), "x").unwrap();
        }
        let names: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["out"], "only the old output remains");
        assert_eq!(fs::read_to_string(dest.join("old")).unwrap(), "good");

        let s = StagingDir::new(&dest).unwrap();
        fs::write(s.path().join("new"), "y").unwrap();
        s.commit().unwrap();
        assert!(dest.join("new").exists() && !dest.join("old").exists());
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
    }
}
