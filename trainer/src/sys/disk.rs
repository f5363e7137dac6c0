//! How much room a filesystem has, for messages about a full checkpoint volume.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::figures::grouped;

/// Bytes of the filesystem holding a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    /// What an unprivileged writer may still use (`f_bavail`).
    pub free: u64,
    pub total: u64,
}

/// The room on the filesystem of `path`, or `None` when it cannot be asked (a missing path).
pub fn space(path: &Path) -> Option<Space> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we own from a NUL-terminated path; nothing is kept.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    Some(Space {
        free: st.f_bavail as u64 * unit,
        total: st.f_blocks as u64 * unit,
    })
}

/// 5242880 → "5.0 MiB (5,242,880 bytes)": readable, and exact for whoever compares.
pub fn fmt_bytes(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    format!("{} ({} bytes)", fmt_size(bytes), grouped(bytes))
}

/// 5242880 → "5.0 MiB".
pub fn fmt_size(bytes: u64) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < units.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} bytes"),
        _ => format!("{v:.1} {}", units[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_easily_and_exactly() {
        assert_eq!(fmt_bytes(512), "512 bytes");
        assert_eq!(fmt_bytes(5 << 20), "5.0 MiB (5,242,880 bytes)");
        assert_eq!(fmt_bytes(1536), "1.5 KiB (1,536 bytes)");
        assert_eq!(fmt_size(3 << 30), "3.0 GiB");
        let here = space(Path::new(".")).unwrap();
        assert!(here.total >= here.free && here.total > 0);
        assert_eq!(space(Path::new("/no/such/place")), None);
    }
}
