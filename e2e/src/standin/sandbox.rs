//! The container side of the stand-in kubelet: a helper process (`standin-kubelet exec-container
//! LAUNCH.json`) that builds a container's view of the file system and then becomes its program.
//!
//! It runs in a private mount and UTS namespace (root is needed, and this machine's test runs are
//! root). Its root is a fresh tmpfs that mirrors the host's top-level directories with recursive
//! bind mounts, so the program sees this machine's binaries and libraries, while the pod's volumes
//! are bind-mounted at their container paths (`/work`, `/checkpoints`, `/dev/termination-log`,
//! `/etc/hosts`, ...) without touching the host: a missing mount point under a mirrored host
//! directory is made by replacing that directory, inside the namespace only, with a tmpfs that
//! mirrors its entries. Sources are resolved before the new root is entered, so a volume mounted
//! at `/work` never hides a source that lives under `/work` on the host. The image's programs are
//! mounted at [`IMAGE_BIN_DIR`], which leads PATH.
//!
//! Not isolated: network (pods share the host's, each binding its own 127.0.0.N address), pids,
//! users (processes run as root whatever the securityContext says), resources (no cgroup limits).

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The environment variable that marks every process this runner starts, naming its state
/// directory, so that a later runner can find and end leftovers of one that was killed.
pub const MARKER_ENV: &str = "CHARLM_STANDIN_KUBELET_STATE";

/// Where the image's programs appear inside the sandbox.
pub const IMAGE_BIN_DIR: &str = "/.standin/bin";
/// PATH when the container sets none (a typical image's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The file descriptor on which the helper reports a failure to start the program; on success it
/// is closed by exec (close-on-exec), so the runner reads end-of-file with nothing before it.
pub const STATUS_FD: i32 = 3;
/// The exit code of a helper that could not start the program (as a container runtime's).
pub const START_ERROR_EXIT: i32 = 128;

/// Everything the helper needs to start one container, written by the runner as JSON.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Launch {
    /// An empty directory on the host on which the sandbox's root tmpfs is mounted.
    pub root: PathBuf,
    pub hostname: String,
    /// Bind mounts, host source to container path, made in this order (parents first).
    pub mounts: Vec<BindMount>,
    /// Host directory with the programs that container images stand for.
    pub image_bin_dir: PathBuf,
    /// argv[0] as the container names it: a path, or a name looked up in PATH.
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// Sets up the sandbox and execs the program. Returns only on failure, with what went wrong.
pub fn exec(launch: &Launch) -> String {
    match enter(launch) {
        Ok(path) => {
            let mut cmd = std::process::Command::new(&path);
            cmd.arg0(&launch.program)
                .args(&launch.args)
                .env_clear()
                .envs(launch.env.iter().map(|(k, v)| (k, v)));
            // Keep the runner's mark, by which leftovers of a killed runner are found.
            if let Some(mark) = std::env::var_os(MARKER_ENV) {
                cmd.env(MARKER_ENV, mark);
            }
            let err = cmd.exec();
            format!("cannot execute {}: {err}", path.display())
        }
        Err(e) => e,
    }
}

/// Reports a start failure to the runner on [`STATUS_FD`] and to the container log (stderr).
pub fn report_start_failure(message: &str) {
    eprintln!("standin-kubelet: {message}");
    // SAFETY: STATUS_FD is the pipe the runner passed; writing to a closed fd fails harmlessly.
    let _ = unsafe {
        libc::write(
            STATUS_FD,
            message.as_ptr() as *const libc::c_void,
            message.len(),
        )
    };
}

/// Marks [`STATUS_FD`] close-on-exec, so a successful exec closes it.
pub fn close_status_fd_on_exec() {
    // SAFETY: plain fcntl on an fd number; an invalid fd only makes it fail.
    unsafe { libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
}

fn enter(launch: &Launch) -> Result<PathBuf, String> {
    // Resolve every host source first: once mounts go up, the host paths may be hidden.
    for m in &launch.mounts {
        if !m.source.exists() {
            return Err(format!(
                "volume source {} does not exist",
                m.source.display()
            ));
        }
    }
    sys(
        // SAFETY: unshare only changes this process's namespaces.
        unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS) },
        "unshare(mount, uts)",
    )?;
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE)
        .map_err(|e| format!("making / private: {e}"))?;

    let mut fs = SandboxFs::new(&launch.root)?;
    for m in &launch.mounts {
        fs.bind(&m.source, &m.target, m.read_only)
            .map_err(|e| format!("mounting {} at {}: {e}", m.source.display(), m.target))?;
    }
    fs.bind(&launch.image_bin_dir, IMAGE_BIN_DIR, true)
        .map_err(|e| {
            format!(
                "mounting the image bin dir {}: {e}",
                launch.image_bin_dir.display()
            )
        })?;
    let workdir = if launch.working_dir.is_empty() {
        "/"
    } else {
        &launch.working_dir
    };
    fs.ensure(workdir, true)
        .map_err(|e| format!("working directory {workdir}: {e}"))?;

    let name = CString::new(launch.hostname.as_str()).map_err(|e| e.to_string())?;
    sys(
        // SAFETY: the pointer and length describe `name`.
        unsafe { libc::sethostname(name.as_ptr(), launch.hostname.len()) },
        "sethostname",
    )?;
    let root = cstring(&launch.root)?;
    // SAFETY: chroot into the tmpfs built above.
    sys(unsafe { libc::chroot(root.as_ptr()) }, "chroot")?;
    std::env::set_current_dir(workdir).map_err(|e| format!("chdir {workdir}: {e}"))?;

    let path_var = launch
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    resolve_program(&launch.program, path_var).ok_or_else(|| {
        format!(
            "program {:?} not found (PATH {path_var}; the image's programs come from {} at {IMAGE_BIN_DIR})",
            launch.program,
            launch.image_bin_dir.display()
        )
    })
}

/// Finds the program inside the sandbox the way a container runtime would, with one addition for
/// images: an absolute path that does not exist here is looked up by its file name in
/// [`IMAGE_BIN_DIR`] (an image's `/usr/local/bin/charlm-trainer` is our `charlm-trainer`).
fn resolve_program(program: &str, path_var: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        if executable(&p) {
            return Some(p);
        }
        let in_image = Path::new(IMAGE_BIN_DIR).join(p.file_name()?);
        return executable(&in_image).then_some(in_image);
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
}

/// The sandbox's root under construction, on the host side (before chroot).
struct SandboxFs {
    root: PathBuf,
    /// Sandbox directories that belong to the sandbox (tmpfs made here, or volumes): creating an
    /// entry in them changes nothing on the host's own directories.
    owned: HashSet<PathBuf>,
    volumes: Vec<PathBuf>,
}

impl SandboxFs {
    fn new(root: &Path) -> Result<SandboxFs, String> {
        mount(Some(OsStr::new("tmpfs")), root, Some("tmpfs"), 0)
            .map_err(|e| format!("tmpfs root: {e}"))?;
        mirror(Path::new("/"), root).map_err(|e| format!("mirroring /: {e}"))?;
        Ok(SandboxFs {
            root: root.to_path_buf(),
            owned: HashSet::from([root.to_path_buf()]),
            volumes: Vec::new(),
        })
    }

    fn bind(&mut self, source: &Path, target: &str, read_only: bool) -> Result<(), String> {
        let is_dir = source.is_dir();
        let at = self.ensure(target, is_dir)?;
        mount(
            Some(source.as_os_str()),
            &at,
            None,
            libc::MS_BIND | libc::MS_REC,
        )
        .map_err(|e| e.to_string())?;
        if read_only {
            mount(
                None,
                &at,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
            )
            .map_err(|e| format!("read-only remount: {e}"))?;
        }
        self.volumes.push(at);
        Ok(())
    }

    /// The host-side path of container path `target`, created (as a directory or an empty file)
    /// if missing, following symbolic links as the sandbox will see them.
    fn ensure(&mut self, target: &str, dir: bool) -> Result<PathBuf, String> {
        let mut pending: Vec<String> = components(target);
        pending.reverse();
        let mut cur = self.root.clone();
        let mut hops = 0;
        while let Some(name) = pending.pop() {
            if name == ".." {
                if cur != self.root {
                    cur.pop();
                }
                continue;
            }
            let next = cur.join(&name);
            match fs::symlink_metadata(&next) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        return Err(format!("too many symbolic links in {target}"));
                    }
                    let link = fs::read_link(&next).map_err(|e| e.to_string())?;
                    // An absolute link points into the sandbox's root, not the host's.
                    if link.is_absolute() {
                        cur = self.root.clone();
                    }
                    let mut rest: Vec<String> = components(&link.to_string_lossy());
                    rest.reverse();
                    pending.extend(rest);
                }
                Ok(_) => cur = next,
                Err(_) => {
                    if !self.is_owned(&cur) {
                        self.splice(&cur)?;
                    }
                    let last = pending.is_empty();
                    if last && !dir {
                        fs::File::create(&next).map_err(|e| e.to_string())?;
                    } else {
                        fs::create_dir(&next).map_err(|e| e.to_string())?;
                    }
                    if self.owned.contains(&cur) {
                        self.owned.insert(next.clone());
                    }
                    cur = next;
                }
            }
        }
        Ok(cur)
    }

    fn is_owned(&self, dir: &Path) -> bool {
        self.owned.contains(dir) || self.volumes.iter().any(|v| dir.starts_with(v))
    }

    /// Replaces a mirrored host directory, inside the namespace only, with a tmpfs mirroring its
    /// entries, so that new entries can be made in it.
    fn splice(&mut self, dir: &Path) -> Result<(), String> {
        let host = Path::new("/").join(dir.strip_prefix(&self.root).map_err(|e| e.to_string())?);
        mount(Some(OsStr::new("tmpfs")), dir, Some("tmpfs"), 0)
            .map_err(|e| format!("tmpfs on {}: {e}", dir.display()))?;
        mirror(&host, dir).map_err(|e| format!("mirroring {}: {e}", host.display()))?;
        self.owned.insert(dir.to_path_buf());
        Ok(())
    }
}

/// The names along a path, ".." kept (symbolic links may use it), "." and the root dropped.
fn components(path: &str) -> Vec<String> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_string()),
            _ => None,
        })
        .collect()
}

/// Makes `into` (a fresh tmpfs) look like host directory `from`: symbolic links copied, directories
/// and files bind-mounted (recursively, so /proc, /dev/pts, ... come along).
fn mirror(from: &Path, into: &Path) -> std::io::Result<()> {
    fs::set_permissions(into, fs::metadata(from)?.permissions())?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let source = entry.path();
        let target = into.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&source)?, &target)?;
            continue;
        }
        if kind.is_dir() {
            fs::create_dir(&target)?;
        } else {
            fs::File::create(&target)?;
        }
        if let Err(e) = mount(
            Some(source.as_os_str()),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
        ) {
            // An entry that cannot be mirrored (e.g. a special file of the host) stays an empty
            // placeholder; say so in the container log rather than failing the container.
            let _ = writeln!(
                std::io::stderr(),
                "standin-kubelet: not mirrored {}: {e}",
                source.display()
            );
        }
    }
    Ok(())
}

fn cstring(p: impl AsRef<OsStr>) -> Result<CString, String> {
    CString::new(p.as_ref().as_bytes()).map_err(|e| e.to_string())
}

fn sys(rc: i32, what: &str) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

fn mount(
    source: Option<&OsStr>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> Result<(), String> {
    let source = source.map(cstring).transpose()?;
    let target = cstring(target)?;
    let fstype = fstype.map(cstring).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: all pointers are null or point at NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            std::ptr::null(),
        )
    };
    sys(rc, "mount")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_drop_root_and_dots() {
        assert_eq!(
            components("/var/./run//secrets/"),
            ["var", "run", "secrets"]
        );
        assert_eq!(components("../run/lock"), ["..", "run", "lock"]);
        assert_eq!(components("/"), Vec::<String>::new());
    }

    #[test]
    fn absolute_program_missing_here_is_taken_from_the_image_dir_by_name() {
        // Nothing exists at IMAGE_BIN_DIR outside a sandbox, so only the PATH lookup can succeed.
        assert_eq!(
            resolve_program("/no/such/charlm-trainer", DEFAULT_PATH),
            None
        );
        assert_eq!(
            resolve_program("sh", DEFAULT_PATH)
                .unwrap()
                .file_name()
                .unwrap(),
            "sh"
        );
        assert_eq!(resolve_program("no-such-program-xyz", DEFAULT_PATH), None);
    }
}
