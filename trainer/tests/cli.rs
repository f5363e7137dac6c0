//! The command line as a newcomer meets it (issues 20 and 29), through the real binary on CPU: one
//! validation for every subcommand (exit 2 and a message naming the flag or variable, never a
//! panic), the `--help` of every flag, the one naming rule of the variables and their aliases,
//! and the JSON Lines stream of docs/contract.md under `train`, `launch` and `run`, each event
//! checked field by field against that page.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use common::{s, stderr, stdout, synthetic_data, tiny_train};

const SUBCOMMANDS: [&str; 8] = [
    "prepare", "generate", "train", "launch", "sample", "bench", "plan", "run",
];

fn trainer(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(common::bin());
    cmd.args(args).env_remove("WORLD_SIZE").env_remove("RANK");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("start charlm-trainer")
}

/// Exit 2, no panic, and a message holding each of `wanted`.
fn refused(out: &Output, wanted: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    for w in wanted {
        assert!(err.contains(w), "missing {w:?} in: {err}");
    }
}

#[test]
fn bad_values_exit_2_naming_the_flag_on_every_subcommand() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["sample", "--checkpoint", "x", "--device", "banana"],
            &["--device banana", "auto, cpu, cuda"],
        ),
        (&["bench", "--device", "banana"], &["--device banana"]),
        (
            &["bench", "--depth", "1000"],
            &["--depth 1000: use 1 to 128"],
        ),
        (
            &["train", "--data", "x", "--max-steps", "1", "--depth", "0"],
            &["--depth 0"],
        ),
        (
            &["sample", "--checkpoint", "x", "--temperature", "-1"],
            &["--temperature -1: use 0 or more"],
        ),
        (
            &["sample", "--checkpoint", "x", "--top-k", "0"],
            &["--top-k 0: use 1 to 18"],
        ),
        (
            &["sample", "--checkpoint", "x", "--max-tokens", "0"],
            &["--max-tokens 0"],
        ),
        (
            &[
                "train",
                "--data",
                "x",
                "--max-steps",
                "1",
                "--log-every",
                "0",
            ],
            &["--log-every 0: use 1 or more"],
        ),
        (
            &["train", "--data", "x", "--max-steps", "0"],
            &["--max-steps 0"],
        ),
        (
            &["train", "--data", "x", "--hours", "-2"],
            &["--hours -2: use a number above 0"],
        ),
        (
            &[
                "train",
                "--data",
                "x",
                "--max-steps",
                "1",
                "--keep-checkpoints",
                "0",
            ],
            &["--keep-checkpoints 0"],
        ),
        (
            &["train", "--data", "x", "--max-steps", "1", "--seq-len", "1"],
            &["--seq-len 1: use 2 to 65536"],
        ),
        (
            &[
                "train",
                "--data",
                "x",
                "--max-steps",
                "1",
                "--warmdown-ratio",
                "1.5",
            ],
            &["--warmdown-ratio 1.5"],
        ),
        (
            &[
                "train",
                "--data",
                "x",
                "--max-steps",
                "1",
                "--device-batch-size",
                "0",
            ],
            &["--device-batch-size 0"],
        ),
        (
            &[
                "prepare",
                "--input",
                "a",
                "--output",
                "b",
                "--val-fraction",
                "1",
            ],
            &["--val-fraction 1"],
        ),
        (
            &["generate", "--output", "o", "--chars", "0"],
            &["--chars 0"],
        ),
        (
            &["launch", "--nproc-per-node", "0", "--", "train"],
            &["--nproc-per-node 0"],
        ),
        (
            &["launch", "--master-port", "0", "--", "train"],
            &["--master-port 0: use 1 to 65535"],
        ),
        (&["bench", "--steps", "0"], &["--steps 0"]),
    ];
    for (args, wanted) in cases {
        refused(&trainer(args, &[]), wanted);
    }
}

#[test]
fn a_bad_value_from_the_environment_names_the_variable() {
    let cases: &[VariableCase] = &[
        (
            &["train", "--data", "x", "--max-steps", "1"],
            ("CHARLM_DEPTH", "0"),
            "--depth",
        ),
        (
            &["train", "--data", "x", "--max-steps", "1"],
            ("CHARLM_DIST_TIMEOUT_S", "soon"),
            "--dist-timeout-s",
        ),
        (
            &["sample", "--checkpoint", "x"],
            ("CHARLM_TOP_K", "0"),
            "--top-k",
        ),
        (
            &["sample", "--checkpoint", "x"],
            ("CHARLM_DEVICE", "banana"),
            "--device",
        ),
        (
            &["prepare", "--input", "a", "--output", "b"],
            ("CHARLM_VAL_FRACTION", "2"),
            "--val-fraction",
        ),
        (
            &["generate", "--output", "o"],
            ("CHARLM_CHARS", "-5"),
            "--chars",
        ),
        (&["bench"], ("CHARLM_DEPTH", "1000"), "--depth"),
        (
            &["launch", "--", "train"],
            ("NPROC_PER_NODE", "zero"),
            "--nproc-per-node",
        ),
    ];
    refused_naming_the_variable(cases);
    // A flag on the command line wins over its variable, and is what the message names.
    let out = trainer(
        &["train", "--data", "x", "--max-steps", "1", "--depth", "999"],
        &[("CHARLM_DEPTH", "0")],
    );
    refused(&out, &["--depth 999"]);
    // A cross-flag check names both the flag and its variable.
    let out = trainer(&["train", "--data", "x"], &[]);
    refused(
        &out,
        &[
            "--hours H (CHARLM_HOURS)",
            "--max-steps N (CHARLM_MAX_STEPS",
        ],
    );
}

/// (arguments, a variable and its bad value, the flag it stands for)
type VariableCase<'a> = (&'a [&'a str], (&'a str, &'a str), &'a str);

/// Each bad value is refused with a message naming the variable, its value and its flag.
fn refused_naming_the_variable(cases: &[VariableCase]) {
    for (args, (name, value), flag) in cases {
        let want = format!("{name}=\"{value}\" (the environment variable of {flag})");
        refused(&trainer(args, &[(name, value)]), &[&want]);
    }
}

#[test]
fn one_naming_rule_with_the_seeds_and_torchruns_names_as_aliases() {
    // CHARLM_<FLAG> for flags that had another variable, or none.
    let cases: &[VariableCase] = &[
        (
            &["plan", "--data", "x"],
            ("CHARLM_PRICE_PER_GPU_HOUR", "-1"),
            "--price-per-gpu-hour",
        ),
        (&["run"], ("CHARLM_SAMPLES", "many"), "--samples"),
        (&["run"], ("CHARLM_DEPTH", "0"), "--depth"),
        (&["run"], ("CHARLM_HOURS", "-1"), "--hours"),
        (
            &["launch", "--", "train"],
            ("CHARLM_NPROC_PER_NODE", "zero"),
            "--nproc-per-node",
        ),
        (
            &["launch", "--", "train"],
            ("CHARLM_MASTER_PORT", "0"),
            "--master-port",
        ),
        // The seed's names for run, torchrun's for launch.
        (&["run"], ("DEPTH", "0"), "--depth"),
        (&["run"], ("TRAINING_HOURS", "-1"), "--hours"),
        (&["launch", "--", "train"], ("NNODES", "0"), "--nnodes"),
    ];
    refused_naming_the_variable(cases);
    // Both names set and different: neither wins silently.
    for (args, a, b) in [
        (&["run"][..], ("DEPTH", "3"), ("CHARLM_DEPTH", "4")),
        (&["run"][..], ("TRAINING_HOURS", "2"), ("CHARLM_HOURS", "1")),
        (
            &["launch", "--", "train"][..],
            ("NPROC_PER_NODE", "2"),
            ("CHARLM_NPROC_PER_NODE", "3"),
        ),
    ] {
        let out = trainer(args, &[a, b]);
        refused(
            &out,
            &[
                &format!("{}=\"{}\"", a.0, a.1),
                &format!("{}=\"{}\"", b.0, b.1),
                "unset one",
            ],
        );
    }
    // The same value under both names is one setting, not a conflict: the check goes on to
    // the value itself.
    let out = trainer(&["run"], &[("DEPTH", "0"), ("CHARLM_DEPTH", "0")]);
    refused(&out, &["CHARLM_DEPTH=\"0\""]);
    // A seed name is run's only: train (what the operator's pods run) reads no DEPTH.
    let out = trainer(
        &["train", "--data", "x", "--max-steps", "1"],
        &[("DEPTH", "0")],
    );
    assert!(!stderr(&out).contains("DEPTH"), "{}", stderr(&out));
}

#[test]
fn impossible_sizes_and_devices_are_refused_before_anything_is_allocated() {
    // 100 billion parameters: the estimate refuses it in an instant instead of filling the RAM.
    let out = trainer(
        &["bench", "--depth", "128", "--device", "cpu", "--steps", "1"],
        &[("CHARLM_MEMORY_LIMIT_GIB", "4")],
    );
    refused(
        &out,
        &["depth 128", "needs about", "CHARLM_MEMORY_LIMIT_GIB"],
    );
    let out = trainer(
        &[
            "train",
            "--data",
            "x",
            "--max-steps",
            "1",
            "--depth",
            "128",
            "--device",
            "cpu",
            "--device-batch-size",
            "8",
            "--metrics-port",
            "0",
        ],
        &[("CHARLM_MEMORY_LIMIT_GIB", "4")],
    );
    refused(&out, &["depth 128", "--device-batch-size"]);
    if !tch::Cuda::is_available() {
        let out = trainer(&["sample", "--checkpoint", "x", "--device", "cuda"], &[]);
        refused(
            &out,
            &["--device cuda", "no CUDA GPU is visible", "--device cpu"],
        );
        let out = trainer(&["bench", "--device", "cuda"], &[]);
        refused(&out, &["no CUDA GPU is visible"]);
    }
}

#[test]
fn fp8_is_refused_on_a_cpu_with_the_fix() {
    let out = trainer(
        &[
            "bench",
            "--device",
            "cpu",
            "--precision",
            "fp8",
            "--steps",
            "1",
        ],
        &[],
    );
    refused(
        &out,
        &["--precision fp8", "FP8 tensor cores", "--precision bf16"],
    );
    // From the environment (what the operator sets from spec.precision), under train.
    let out = trainer(
        &[
            "train",
            "--data",
            "x",
            "--max-steps",
            "1",
            "--device",
            "cpu",
            "--metrics-port",
            "0",
        ],
        &[("CHARLM_PRECISION", "fp8")],
    );
    refused(&out, &["CHARLM_PRECISION", "--precision bf16"]);
    let out = trainer(&["bench", "--device", "cpu", "--precision", "fp16"], &[]);
    refused(&out, &["--precision fp16", "bf16", "fp8"]);
}

#[test]
fn launch_without_the_separator_shows_the_command_that_works() {
    let out = trainer(
        &["launch", "--nproc-per-node", "2", "train", "--depth", "4"],
        &[],
    );
    refused(
        &out,
        &["run `charlm-trainer launch --nproc-per-node 2 -- train --depth 4`"],
    );
}

/// `--help` blocks of a subcommand: flag name → its text (help, env, default, values).
fn help_blocks(sub: &str) -> BTreeMap<String, String> {
    let out = trainer(&[sub, "--help"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut blocks = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in stdout(&out).lines() {
        let t = line.trim_start();
        if t.starts_with("--") && line.starts_with("      --") {
            // `--name <NAME>  help...` (compact help keeps the text on the flag's line).
            let (spec, rest) = t.split_once("  ").unwrap_or((t, ""));
            let name = spec[2..].split([' ', '<', ',']).next().unwrap().to_string();
            current = Some(name.clone());
            let first = rest.trim();
            blocks.insert(
                name,
                if first.is_empty() {
                    String::new()
                } else {
                    format!("{first}\n")
                },
            );
        } else if line.starts_with("  -h, --help") || line.starts_with("  -V") {
            current = None;
        } else if let Some(name) = &current {
            let block = blocks.get_mut(name).unwrap();
            block.push_str(t);
            block.push('\n');
        }
    }
    blocks
}

#[test]
fn help_gives_every_flag_its_meaning_variable_default_and_range() {
    // Other names a flag reads, per subcommand (the seed's and torchrun's).
    let aliases = charlm_trainer::sys::flags::ALIASES;
    let required = ["data", "input", "output", "checkpoint"];
    let switches = ["profile", "check", "curve"];
    for sub in SUBCOMMANDS {
        let blocks = help_blocks(sub);
        assert!(blocks.len() >= 3, "{sub}: {blocks:?}");
        for (flag, text) in &blocks {
            // One rule for every flag of every subcommand: CHARLM_<FLAG>.
            let env = charlm_trainer::sys::flags::env_name(flag);
            let what = format!("{sub} --{flag}:\n{text}");
            assert!(text.contains(&format!("[env: {env}=")), "{what}");
            for (_, _, alias, _) in aliases.iter().filter(|a| a.0 == sub && a.1 == flag) {
                assert!(text.contains(&format!("Also read from {alias} ")), "{what}");
            }
            let meaning = text.lines().next().unwrap_or("");
            assert!(meaning.len() > 10 && !meaning.starts_with('['), "{what}");
            assert!(
                text.contains("[default: ")
                    || text.contains("Unset")
                    || required.contains(&flag.as_str())
                    || switches.contains(&flag.as_str()),
                "no default and no word on what absence does: {what}"
            );
        }
        if let Some(depth) = blocks.get("depth") {
            assert!(depth.contains("1 to 128"), "{sub}: {depth}");
        }
        if let Some(device) = blocks.get("device") {
            assert!(device.contains("auto") && device.contains("cpu") && device.contains("cuda"));
        }
    }
    // Every alias belongs to a flag of its subcommand.
    for (sub, flag, alias, _) in aliases {
        assert!(
            help_blocks(sub).contains_key(flag),
            "{alias}: {sub} --{flag}"
        );
    }
    // The names people bring from nanochat and torchrun.
    assert!(help_blocks("train")["max-steps"].contains("num-iterations"));
    let launch = help_blocks("launch");
    for alias in ["nproc_per_node", "node_rank", "master_addr", "master_port"] {
        assert!(launch.values().any(|t| t.contains(alias)), "{alias}");
    }
    // The flag on the command line takes every documented option; a default `--help` works.
    assert!(trainer(&["--help"], &[]).status.success());
}

/// The fields docs/contract.md lists for each event, from its `### \`name\`` tables.
fn documented_events() -> BTreeMap<String, BTreeSet<String>> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/contract.md"))
            .unwrap();
    let stream = &doc[doc
        .find("## The event stream")
        .expect("the stream's section")..];
    let stream = &stream[..stream[3..].find("\n## ").map_or(stream.len(), |i| i + 3)];
    let mut events = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in stream.lines() {
        if let Some(name) = line.strip_prefix("### `") {
            current = Some(name.trim_end_matches('`').to_string());
            events.insert(current.clone().unwrap(), BTreeSet::new());
        } else if let (Some(name), Some(rest)) = (&current, line.strip_prefix("| `")) {
            let field = rest.split('`').next().unwrap().to_string();
            events.get_mut(name).unwrap().insert(field);
        }
    }
    events
}

/// Checks every stdout line: an object of schema 1 whose fields are exactly those documented
/// for its event (plus `schema`, `event` and `rank`). Returns the lines.
fn check_stream(out: &Output, under_launch: bool) -> Vec<serde_json::Value> {
    let docs = documented_events();
    let text = stdout(out);
    assert!(!text.is_empty(), "no stream: {}", stderr(out));
    text.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            let obj = v.as_object().expect("an object");
            assert_eq!(v["schema"], 1, "{l}");
            let event = v["event"].as_str().expect("an event name");
            let want = docs
                .get(event)
                .unwrap_or_else(|| panic!("event {event} is not in docs/contract.md: {l}"));
            let have: BTreeSet<String> = obj
                .keys()
                .filter(|k| !["schema", "event", "rank"].contains(&k.as_str()))
                .cloned()
                .collect();
            assert_eq!(
                &have, want,
                "{event}: fields differ from docs/contract.md: {l}"
            );
            // launch's and run's own lines are about no rank.
            let own_launch_line =
                under_launch && ["launch", "restart", "error", "plan", "sample"].contains(&event);
            if !own_launch_line {
                assert!(v["rank"].is_u64(), "no rank: {l}");
            }
            v
        })
        .collect()
}

#[test]
fn train_writes_one_documented_stream_and_human_lines_with_units() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 40_000);
    let ckpt = root.path().join("ckpt");
    let out = trainer(
        &tiny_train(
            s(&data),
            s(&ckpt),
            &[
                "--num-iterations",
                "4",
                "--eval-every",
                "2",
                "--log-format",
                "json",
            ],
        ),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = check_stream(&out, false);
    let names: Vec<&str> = lines.iter().map(|v| v["event"].as_str().unwrap()).collect();
    assert_eq!(names.first(), Some(&"start"), "{names:?}");
    assert_eq!(names.last(), Some(&"end"), "{names:?}");
    for event in ["step", "eval", "checkpoint"] {
        assert!(names.contains(&event), "{event}: {names:?}");
    }
    // --num-iterations is --max-steps.
    assert_eq!(lines[0]["max_steps"], 4);
    let end = lines.last().unwrap();
    assert_eq!(
        (
            end["progress"]["step"].as_i64(),
            end["progress"]["complete"].as_bool()
        ),
        (Some(4), Some(true))
    );
    let last_step = lines.iter().rev().find(|v| v["event"] == "step").unwrap();
    assert_eq!(last_step["progress"], 1.0);
    assert!(last_step["train_loss"].as_f64().unwrap() > 0.0);
    let err = stderr(&out);
    for unit in [" nats |", " bpc", "100.0% |", " left", " tok/s"] {
        assert!(err.contains(unit), "{unit:?} in human lines: {err}");
    }

    // Human only: nothing on stdout.
    let quiet = trainer(
        &tiny_train(
            s(&data),
            s(&root.path().join("h")),
            &["--max-steps", "1", "--log-format", "human"],
        ),
        &[],
    );
    assert!(quiet.status.success(), "{}", stderr(&quiet));
    assert!(quiet.stdout.is_empty() && stderr(&quiet).contains("step      1/1"));

    // A failure ends the stream with its error event.
    let bad = trainer(
        &tiny_train(
            s(&root.path().join("none")),
            s(&ckpt),
            &["--max-steps", "1", "--log-format", "json"],
        ),
        &[],
    );
    assert_eq!(bad.status.code(), Some(2));
    let lines = check_stream(&bad, false);
    let last = lines.last().unwrap();
    assert_eq!(
        (&last["event"], &last["exit_code"], &last["rank"]),
        (&"error".into(), &2.into(), &0.into())
    );
}

#[test]
fn launch_with_torchrun_names_writes_one_stream_with_ranks() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 40_000);
    let ckpt = root.path().join("ckpt");
    let mut args = vec![
        "launch",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--node_rank",
        "0",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        "29641",
        "--",
    ];
    let train = tiny_train(
        s(&data),
        s(&ckpt),
        &["--max-steps", "2", "--eval-every", "2"],
    );
    args.extend(train);
    let out = trainer(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = check_stream(&out, true);
    assert_eq!(lines[0]["event"], "launch");
    assert_eq!(lines[0]["world_size"], 2);
    let start = lines.iter().find(|v| v["event"] == "start").unwrap();
    assert_eq!(
        (&start["rank"], &start["world_size"]),
        (&0.into(), &2.into())
    );
    let exits: Vec<_> = lines.iter().filter(|v| v["event"] == "exit").collect();
    assert_eq!(exits.len(), 2);
    assert!(exits.iter().all(|v| v["exit_code"] == 0));
    // Human lines stay on stderr, prefixed with their rank.
    assert!(
        stderr(&out).contains("[rank 0] step      2/2"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn run_keeps_stdout_one_stream_and_says_once_that_wandb_is_not_built_in() {
    let root = tempfile::tempdir().unwrap();
    let texts = root.path().join("base/data");
    std::fs::create_dir_all(&texts).unwrap();
    let docs: String = (0..400)
        .map(|i| format!("{i}+{i}\n{}\n\n", 2 * i))
        .collect();
    std::fs::write(texts.join("a.txt"), docs).unwrap();
    let base = root.path().join("base");
    let out = trainer(
        &[
            "run",
            "--base-dir",
            s(&base),
            "--depth",
            "1",
            "--samples",
            "2",
            "--",
            "--seq-len",
            "32",
            "--total-batch-size",
            "256",
            "--max-steps",
            "2",
            "--eval-every",
            "0",
            "--eval-tokens",
            "512",
            "--threads",
            "1",
            "--device",
            "cpu",
        ],
        &[
            ("WANDB_RUN", "seed-run"),
            ("MASTER_PORT", "29747"),
            ("CHARLM_METRICS_PORT", "0"),
        ],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    // stdout (a file here, not a terminal): every line an event of docs/contract.md.
    let lines = check_stream(&out, true);
    let names: Vec<&str> = lines.iter().map(|v| v["event"].as_str().unwrap()).collect();
    assert_eq!(names.first(), Some(&"plan"), "{names:?}");
    for event in ["launch", "start", "end", "exit"] {
        assert!(names.contains(&event), "{event}: {names:?}");
    }
    let samples: Vec<_> = lines.iter().filter(|v| v["event"] == "sample").collect();
    assert_eq!(samples.len(), 2, "{names:?}");
    assert!(samples[0]["checkpoint"]
        .as_str()
        .unwrap()
        .ends_with("checkpoints/d1/best"));
    assert_eq!(samples[1]["index"], 1);
    // The human text on stderr: W&B named once, with what is built in instead.
    assert_eq!(err.matches("Weights & Biases").count(), 1, "{err}");
    let board = base.join("tensorboard/seed-run");
    assert!(err.contains(s(&board)) && err.contains("/metrics"), "{err}");
    assert!(
        std::fs::read_dir(&board).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("tfevents")),
        "no TensorBoard events in {}",
        board.display()
    );
    assert!(err.contains("run: sample 1:"), "{err}");
}

#[test]
fn an_unwritable_checkpoint_dir_is_found_at_start() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 40_000);
    // Under a regular file no directory can be made, whoever runs the test (root included).
    let file = root.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let ckpt = file.join("ckpt");
    let out = trainer(&tiny_train(s(&data), s(&ckpt), &["--max-steps", "50"]), &[]);
    refused(
        &out,
        &[
            "--checkpoint-dir",
            "cannot be written",
            "another --checkpoint-dir",
        ],
    );
    assert!(
        !stderr(&out).contains("step "),
        "it trained first: {}",
        stderr(&out)
    );
}

#[test]
fn data_that_is_not_prepared_gets_the_command_that_works() {
    let root = tempfile::tempdir().unwrap();
    let ckpt = root.path().join("ckpt");
    let train = |data: &Path| trainer(&tiny_train(s(data), s(&ckpt), &["--max-steps", "1"]), &[]);
    let missing = root.path().join("nowhere");
    let out = train(&missing);
    refused(&out, &["--data", "does not exist"]);
    assert!(!stderr(&out).contains("manifest.json"), "{}", stderr(&out));

    // A folder of raw .txt files: the message's command must work as written.
    let raw = root.path().join("texts");
    std::fs::create_dir_all(raw.join("sub")).unwrap();
    let docs: String = (0..400)
        .map(|i| format!("{i}+{i}\n{}\n\n", 2 * i))
        .collect();
    std::fs::write(raw.join("sub/a.txt"), docs).unwrap();
    let out = train(&raw);
    refused(&out, &["holds raw .txt files"]);
    let err = stderr(&out);
    let command = err.split('`').nth(1).expect("a quoted command");
    let prepared = root.path().join("texts-prepared");
    assert_eq!(
        command,
        format!(
            "charlm-trainer prepare --input {} --output {}",
            raw.display(),
            prepared.display()
        )
    );
    let words: Vec<&str> = command.split(' ').skip(1).collect();
    let run = trainer(&[&words[..], &["--val-fraction", "0.2"]].concat(), &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let ok = trainer(
        &tiny_train(
            s(&prepared),
            s(&root.path().join("c")),
            &["--max-steps", "1"],
        ),
        &[],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));

    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    refused(
        &train(&empty),
        &["is empty", &format!("--output {}", empty.display())],
    );
}

#[test]
fn prepare_replaces_only_what_its_manifest_proves_it_wrote() {
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let docs: String = (0..200).map(|i| format!("{i}\n\n")).collect();
    std::fs::write(input.join("a.txt"), docs).unwrap();
    let prepare = |out: &Path| {
        trainer(
            &[
                "prepare",
                "--input",
                s(&input),
                "--output",
                s(out),
                "--val-fraction",
                "0.2",
            ],
            &[],
        )
    };
    for (file, content) in [("train.bin", "the user's own file"), ("notes.md", "notes")] {
        let dir = root.path().join(format!("has-{file}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(file), content).unwrap();
        refused(
            &prepare(&dir),
            &[
                &format!("--output {}", dir.display()),
                file,
                "nothing is replaced",
            ],
        );
        assert_eq!(std::fs::read_to_string(dir.join(file)).unwrap(), content);
    }
    // Its own output, proven by its manifest, is replaced.
    let own = root.path().join("own");
    assert!(prepare(&own).status.success());
    assert!(prepare(&own).status.success(), "replaces its own output");
    std::fs::write(own.join("train.bin"), "edited").unwrap();
    refused(
        &prepare(&own),
        &["train.bin is not the size its manifest records"],
    );

    // A filesystem error names the user's path and the fix, not the hidden staging directory.
    let file = root.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = prepare(&file.join("data"));
    refused(
        &out,
        &[
            &format!("cannot write --output {}", file.join("data").display()),
            "give another --output",
        ],
    );
    assert!(!stderr(&out).contains(".tmp-"), "{}", stderr(&out));
}

#[test]
fn bench_takes_the_total_batch_and_an_auto_micro_batch() {
    let base = [
        "bench",
        "--depth",
        "1",
        "--seq-len",
        "32",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--log-format",
        "json",
    ];
    let out = trainer(
        &[
            &base[..],
            &["--device-batch-size", "auto", "--total-batch-size", "256"],
        ]
        .concat(),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = check_stream(&out, false);
    let report = &lines[0];
    assert_eq!(report["event"], "bench");
    assert_eq!(report["total_batch_size"], 256);
    let (b, accum) = (
        report["device_batch_size"].as_i64().unwrap(),
        report["accum"].as_i64().unwrap(),
    );
    assert_eq!(b * accum * 32, 256);
    let out = trainer(
        &[
            &base[..],
            &[
                "--device-batch-size",
                "4",
                "--total-batch-size",
                "256",
                "--accum",
                "3",
            ],
        ]
        .concat(),
        &[],
    );
    refused(&out, &["--accum 3 disagrees with --total-batch-size 256"]);
}

#[test]
fn cpu_auto_keeps_a_step_short_and_a_raised_budget_explains_its_schedule() {
    let root = tempfile::tempdir().unwrap();
    let data = synthetic_data(root.path(), 200_000);
    let ckpt = root.path().join("ckpt");
    // Memory allows 256 sequences of depth 2 at 256 tokens here (the limit is lifted), which
    // would make steps of many seconds on two threads; `auto` holds a micro-batch to about a
    // second, and without --total-batch-size a step is one micro-batch.
    let run = |max_steps: &str| {
        trainer(
            &tiny_train(
                s(&data),
                s(&ckpt),
                &[
                    "--depth",
                    "2",
                    "--seq-len",
                    "256",
                    "--device-batch-size",
                    "auto",
                    "--total-batch-size",
                    "",
                    "--max-steps",
                    max_steps,
                    "--log-format",
                    "json",
                    "--threads",
                    "2",
                    // The 2025 schedule: no warm-up, decay to 0, so the multipliers below are
                    // the budget's alone.
                    "--recipe",
                    "nanochat-2025",
                ],
            )
            .into_iter()
            .filter(|a| !a.is_empty() && *a != "--total-batch-size")
            .collect::<Vec<_>>(),
            &[("CHARLM_MEMORY_LIMIT_GIB", "64")],
        )
    };
    let first = run("4");
    assert!(first.status.success(), "{}", stderr(&first));
    let start = &check_stream(&first, false)[0];
    let micro = start["device_batch_size"].as_i64().unwrap();
    let config = charlm_trainer::model::GptConfig::new(2, 256);
    let all = charlm_trainer::engine::autobatch::candidates(None);
    let quick = charlm_trainer::engine::autobatch::quick_on_cpu(&config, &all, 256, 2);
    assert_eq!(micro, quick, "{}", stderr(&first));
    assert!(micro < 256, "{micro}");
    assert_eq!(start["total_batch_size"].as_i64(), Some(micro * 256));

    // Finished at 4 steps, raised to 8: the schedule is explained, the multiplier is back at 1.
    let again = run("8");
    assert!(again.status.success(), "{}", stderr(&again));
    let err = stderr(&again);
    assert!(
        err.contains("note: the schedule follows the budget, which changed from --max-steps 4"),
        "{err}"
    );
    assert!(
        err.contains("multiplier is 1.00 (it was 0.00 under the old budget)"),
        "{err}"
    );
    let start = &check_stream(&again, false)[0];
    assert_eq!(
        (&start["step"], &start["lr_mult"]),
        (&4.into(), &1.0.into())
    );
}
