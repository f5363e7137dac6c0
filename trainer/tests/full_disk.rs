//! A full checkpoint volume (issue 29, item 9) on a real filesystem: a tmpfs of 4 MiB, mounted
//! in a mount namespace of this test's own (`unshare --mount`), so that it goes away with the
//! test's process whatever happens to it (and a guard unmounts it before). Each write of a
//! checkpoint — the weights, the optimizer state, the manifest, the best/ copy — meets a full
//! volume in turn: `train` exits 3 (also through `launch`) with a message naming the folder, the
//! bytes a checkpoint needs and what is free, removes its partial write, and leaves every
//! checkpoint saved before byte for byte as it was; with room again, the training resumes.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;

use charlm_trainer::sys::figures::grouped;
use common::{json_lines, run, s, stderr, synthetic_data, tiny_train};

/// Set in the re-executed test process that runs inside the mount namespace.
const INSIDE: &str = "CHARLM_FULL_DISK_INSIDE";
const VOLUME_BYTES: u64 = 4 << 20;

#[test]
fn a_full_checkpoint_volume_exits_3_and_damages_nothing() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut unshare = Command::new("unshare");
    if !root {
        // An unprivileged user namespace may mount a tmpfs of its own.
        unshare.arg("--user").arg("--map-root-user");
    }
    let out = unshare
        .args(["--mount", "--propagation", "private"])
        .arg(std::env::current_exe().unwrap())
        .args(["full_disk_inside", "--exact", "--ignored", "--nocapture"])
        .env(INSIDE, "1")
        .output()
        .expect("run unshare (util-linux)");
    let text = format!("{}{}", common::stdout(&out), stderr(&out));
    assert!(
        out.status.success() && text.contains("1 passed"),
        "inside the mount namespace:\n{text}"
    );
}

/// A tmpfs mounted at a path, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, bytes: u64) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let c = |v: &str| CString::new(v).unwrap();
        let (src, dst, fs) = (c("tmpfs"), c(s(at)), c("tmpfs"));
        let opts = c(&format!("size={bytes},mode=0755"));
        // SAFETY: mount(2) with NUL-terminated strings we own.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                fs.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let p = CString::new(s(&self.0)).unwrap();
        // SAFETY: umount2(2) of the mount we made.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
}

fn free_bytes(path: &Path) -> u64 {
    let p = CString::new(s(path)).unwrap();
    // SAFETY: statvfs into a zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(p.as_ptr(), &mut st) }, 0);
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Every file under `dir` (but the lock's record, which each start rewrites) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if p.is_dir() {
                out.insert(format!("{rel}/"), vec![]);
                pending.push(p);
            } else if rel != "LOCK.json" {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

const PAGE: u64 = 4096;

fn pages(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE) * PAGE
}

/// Half of a file's pages, whole pages.
fn half(bytes: u64) -> u64 {
    pages(bytes) / 2 / PAGE * PAGE
}

#[test]
#[ignore = "run by a_full_checkpoint_volume_exits_3_and_damages_nothing inside a mount namespace"]
fn full_disk_inside() {
    if std::env::var_os(INSIDE).is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic_data(tmp.path(), 30_000);
    let volume = tmp.path().join("volume");
    let _mounted = Tmpfs::mount(&volume, VOLUME_BYTES);
    let ckpt = volume.join("ckpt");
    let train = |steps: &'static str, extra: &[&'static str]| {
        let mut flags = vec!["--max-steps", steps, "--checkpoint-every-minutes", "0"];
        flags.extend_from_slice(extra);
        tiny_train(s(&data), s(&ckpt), &flags)
    };
    let out = run(&train("2", &["--eval-every", "1"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let step2 = ckpt.join("step-000000002");
    let size = |f: &str| std::fs::metadata(step2.join(f)).unwrap().len();
    let (model, optimizer) = (size("model.safetensors"), size("optimizer.safetensors"));
    // Any new validation bpc is a new best: the best/ copy is written at the next evaluation.
    let best = ckpt.join("best/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&best).unwrap()).unwrap();
    m["val_bpc"] = 99.0.into();
    std::fs::write(&best, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let before = snapshot(&ckpt);

    // (what fails, room left on the volume, extra flags, through launch)
    let cases: [(&str, u64, &[&str], bool); 5] = [
        ("weights", half(model), &["--eval-every", "0"], false),
        (
            "optimizer",
            pages(model) + half(optimizer),
            &["--eval-every", "0"],
            false,
        ),
        (
            "manifest",
            pages(model) + pages(optimizer),
            &["--eval-every", "0"],
            false,
        ),
        ("best/", half(model), &["--eval-every", "1"], false),
        (
            "weights (launch)",
            half(model),
            &["--eval-every", "0"],
            true,
        ),
    ];
    for (what, room, extra, launched) in cases {
        let filler = volume.join("filler");
        let fill = free_bytes(&volume) - room;
        std::fs::write(&filler, vec![7u8; fill as usize]).unwrap();
        assert_eq!(
            free_bytes(&volume),
            room,
            "{what}: the filler left other room"
        );
        let args = train("3", extra);
        let out = if launched {
            let port = common::ranks::free_port().to_string();
            let mut l = vec![
                "launch",
                "--nproc-per-node",
                "1",
                "--master-port",
                &port,
                "--",
            ];
            l.extend_from_slice(&args);
            run(&l)
        } else {
            run(&args)
        };
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{what}: {err}");
        let free = free_bytes(&volume);
        // The last step saves best/ before its rolling checkpoint when the end-of-training
        // evaluation is a new best (the best on disk says 99 bpc): then best/ meets the full
        // volume first, with the same files and the same room.
        let best_dir = ckpt.join("best");
        let dest = if what == "best/"
            || err.contains(&format!("writing {} needs about", best_dir.display()))
        {
            best_dir
        } else {
            ckpt.join("step-000000003")
        };
        assert!(
            err.contains(&format!("writing {} needs about", dest.display()))
                && err.contains(&format!("and {} has ", ckpt.display()))
                && err.contains(&format!("({} bytes) free", grouped(free)))
                && err.contains("of weights")
                && err.contains("of optimizer state")
                && err.contains("checkpoints saved before are intact"),
            "{what}: {err}"
        );
        // The bytes a checkpoint needs: its tensors (the files less their small headers).
        let needs = err
            .split("needs about ")
            .nth(1)
            .and_then(|r| r.split(" bytes").next())
            .and_then(|r| r.rsplit('(').next())
            .map(|n| n.replace(',', "").parse::<u64>().unwrap())
            .unwrap_or_else(|| panic!("{what}: no byte count in {err}"));
        assert!(
            needs <= model + optimizer && needs + 4096 > model + optimizer,
            "{what}: {needs} vs files of {model} + {optimizer}"
        );
        if !launched {
            let error = json_lines(&out)
                .into_iter()
                .find(|v| v["event"] == "error")
                .unwrap_or_else(|| panic!("{what}: no error event"));
            assert_eq!(error["exit_code"], 3, "{what}: {error}");
        }
        assert_eq!(snapshot(&ckpt), before, "{what}: the folder changed");
        std::fs::remove_file(&filler).unwrap();
    }

    // With room again the training goes on from where it was.
    let out = run(&train("3", &["--eval-every", "0"]));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("resumed from {}", step2.display())),
        "{err}"
    );
    assert!(ckpt.join("step-000000003/manifest.json").exists());

    // `run` (prepare, launch, train) on the same wall: exit 3 and a message to make room, not
    // "the training failed; run the same command again".
    let texts = tmp.path().join("texts");
    std::fs::create_dir_all(&texts).unwrap();
    let docs: String = (0..400)
        .map(|i| format!("{i}+{i}\n{}\n\n", 2 * i))
        .collect();
    std::fs::write(texts.join("a.txt"), docs).unwrap();
    let base = volume.join("base");
    let run_to = |steps: &str| {
        let port = common::ranks::free_port().to_string();
        let mut cmd = Command::new(common::bin());
        cmd.args(["run", "--data", s(&texts), "--base-dir", s(&base)])
            .args([
                "--depth",
                "1",
                "--device-batch-size",
                "4",
                "--samples",
                "0",
                "--",
            ])
            .args(["--seq-len", "32", "--total-batch-size", "256"])
            .args(["--eval-tokens", "512"])
            .args(["--metrics-port", "0", "--threads", "1", "--device", "cpu"])
            .args(["--eval-every", "0", "--checkpoint-every-minutes", "0"])
            .args(["--max-steps", steps])
            .env("MASTER_PORT", port);
        common::without_seed_and_torchrun_variables(&mut cmd);
        cmd.output().unwrap()
    };
    std::fs::remove_dir_all(&ckpt).unwrap();
    let out = run_to("2");
    assert!(out.status.success(), "{}", stderr(&out));
    let d1 = base.join("checkpoints/d1");
    let before = snapshot(&d1);
    let filler = volume.join("filler");
    let fill = free_bytes(&volume) - half(model);
    std::fs::write(&filler, vec![7u8; fill as usize]).unwrap();
    let out = run_to("3");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!(
            "the checkpoint volume of {} is full",
            d1.display()
        )) && err.contains("make room there")
            && !err.contains("the training failed"),
        "{err}"
    );
    assert_eq!(snapshot(&d1), before, "run: the folder changed");
}
