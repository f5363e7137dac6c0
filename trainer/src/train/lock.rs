//! One training per checkpoint folder: rank 0 holds an exclusive lock on `LOCK.json` in it for
//! the training's life. The lock is the kernel's (flock(2)), not the file's existence, so a
//! training that crashes or is killed leaves nothing stale: its lock goes with its process. The
//! file records the holder (host, pid, since when) for the message a second training gets.
//!
//! flock is advisory and as good as the filesystem's support: local filesystems and block volumes
//! lock for real; NFS locks across clients through the server (not when mounted with `nolock` or
//! `local_lock`); filesystems without locks (some FUSE-based drivers) get a warning and no lock.
//! docs/training.md, "One training per folder", lists them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::user_bail;

pub const LOCK_FILE: &str = "LOCK.json";

/// Who holds (or last held) a folder's lock.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// When it took the lock: RFC 3339, UTC.
    pub since: String,
    pub since_unix_s: u64,
}

/// The held lock; dropping it (or the process ending, however it ends) releases it.
#[derive(Debug)]
pub struct FolderLock {
    _file: Option<File>,
}

/// Takes the lock of checkpoint folder `root` (which exists), or refuses (exit 2) naming the
/// training that holds it.
pub fn acquire(root: &Path) -> Result<FolderLock> {
    let path = root.join(LOCK_FILE);
    // Not truncated on open: the holder's record is what a second training reads.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o664)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; it blocks not (LOCK_NB).
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let who = serde_json::from_str::<Holder>(&text).map_or_else(
                // Just started, or on a filesystem whose locks forbid reading (SMB).
                |_| "a training whose record of itself cannot be read yet".into(),
                |h| describe(&h),
            );
            user_bail!(
                "--checkpoint-dir {} (CHARLM_CHECKPOINT_DIR) is in use by another training: {who} \
                 holds its lock ({}). A checkpoint folder belongs to one training; two would \
                 write the same step-* checkpoints. Wait for it to end (or stop it), or give \
                 this training another --checkpoint-dir",
                root.display(),
                path.display()
            );
        }
        // ENOLCK, EOPNOTSUPP, ENOSYS: a filesystem that cannot lock. Refusing would make it
        // unusable; the user learns that nothing guards the folder.
        eprintln!(
            "warning: cannot lock {} ({err}): its filesystem does not support flock, so a second \
             training writing into this --checkpoint-dir would not be noticed (docs/training.md, \
             \"One training per folder\")",
            path.display()
        );
        return Ok(FolderLock { _file: None });
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let me = Holder {
        host: hostname(),
        pid: std::process::id(),
        since: rfc3339(now),
        since_unix_s: now,
    };
    let record = serde_json::to_string(&me)? + "\n";
    let written = file
        .set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(record.as_bytes()))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        if matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ) {
            return Err(crate::sys::error::StorageFull(format!(
                "--checkpoint-dir {} (CHARLM_CHECKPOINT_DIR) is full ({e}): free space on its \
                 volume, give it more (the operator's spec.checkpoint.size), or give another \
                 --checkpoint-dir",
                root.display()
            ))
            .into());
        }
        return Err(anyhow::Error::new(e).context(format!("write {}", path.display())));
    }
    Ok(FolderLock { _file: Some(file) })
}

/// "pid 4242 on host node-7 since 2026-12-03T10:00:00Z (12 s ago)".
fn describe(h: &Holder) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ago = now.saturating_sub(h.since_unix_s);
    format!(
        "pid {} on host {} since {} ({} ago)",
        h.pid,
        h.host,
        h.since,
        crate::sys::figures::fmt_duration(ago as f64)
    )
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Seconds since 1970 as `YYYY-MM-DDTHH:MM:SSZ` (Howard Hinnant's days-to-civil algorithm).
fn rfc3339(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn a_second_lock_in_the_same_process_is_refused_and_released_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let first = acquire(root.path()).unwrap();
        let err = acquire(root.path()).unwrap_err();
        assert_eq!(crate::sys::error::exit_code(&err), 2);
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains(&hostname()),
            "{msg}"
        );
        drop(first);
        acquire(root.path()).unwrap();
    }
}
