//! What every subcommand's flags share: the naming rule of their environment variables, the
//! value checks (ranges, devices, log formats) that run while the command line is parsed, and the
//! parse errors as a user should read them.
//!
//! A flag is declared once, in its command's `Args`, as
//! `#[arg(long, value_parser = flags::…, default_value…)]` with a doc comment that says what it
//! means, its allowed values or range, and what `0` or absence does. Its variable is not written
//! there: [`name_variables`] gives every flag of every subcommand `CHARLM_<FLAG>` (from its long
//! name), and [`resolve_aliases`] lets the names a seed or torchrun user already sets
//! ([`ALIASES`]) stand in for it. The check in `value_parser` runs for the command line and the
//! environment alike, so a bad value exits 2 before any work starts, and [`explain`] names the
//! variable the user set when it came from the environment. `trainer/tests/cli.rs` holds every
//! flag of every subcommand to this.

use std::ffi::OsString;
use std::fmt::Display;
use std::io::IsTerminal;
use std::str::FromStr;

use anyhow::Result;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::Command;
use serde::Serialize;
use tch::Device;

use crate::user_bail;

/// The environment variable of `--flag` (`--dist-timeout-s` ↔ `CHARLM_DIST_TIMEOUT_S`).
pub fn env_name(long: &str) -> String {
    format!("CHARLM_{}", long.to_uppercase().replace('-', "_"))
}

/// Other names of a flag's variable, for people who bring them: `(subcommand, flag, variable,
/// whose name)`. `run` takes the seed's run.sh knobs, `launch` torchrun's rendezvous variables
/// (what torchrun, Kubeflow's PyTorchJob and the operator set). Only where the flag means what the
/// name meant there: `train` reads no `DEPTH`, so a shell that exports one for `run` cannot
/// change a worker's depth behind the operator's back.
pub const ALIASES: [(&str, &str, &str, &str); 9] = [
    ("run", "depth", "DEPTH", "the seed's run.sh"),
    ("run", "hours", "TRAINING_HOURS", "the seed's run.sh"),
    (
        "run",
        "nproc-per-node",
        "NPROC_PER_NODE",
        "the seed's run.sh and torchrun",
    ),
    (
        "run",
        "device-batch-size",
        "DEVICE_BATCH_SIZE",
        "the seed's run.sh",
    ),
    ("launch", "nproc-per-node", "NPROC_PER_NODE", "torchrun"),
    ("launch", "nnodes", "NNODES", "torchrun"),
    ("launch", "node-rank", "NODE_RANK", "torchrun"),
    ("launch", "master-addr", "MASTER_ADDR", "torchrun"),
    ("launch", "master-port", "MASTER_PORT", "torchrun"),
];

/// Gives every flag of `cmd` and of its subcommands its variable, [`env_name`] of its long name,
/// and says in its help which other name ([`ALIASES`]) it also reads.
pub fn name_variables(cmd: Command) -> Command {
    let sub = cmd.get_name().to_string();
    cmd.mut_args(|arg| {
        let Some(long) = arg.get_long().map(str::to_string) else {
            return arg;
        };
        let primary = env_name(&long);
        let mut arg = arg.env(primary.clone());
        for (_, _, alias, whose) in ALIASES.iter().filter(|a| a.0 == sub && a.1 == long) {
            let note = |help: String| {
                let stop = if help.ends_with('.') { "" } else { "." };
                format!(
                    "{help}{stop} Also read from {alias} ({whose} name) when {primary} is unset."
                )
            };
            if let Some(help) = arg.get_help().map(|h| h.to_string()) {
                arg = arg.help(note(help));
            }
            if let Some(help) = arg.get_long_help().map(|h| h.to_string()) {
                arg = arg.long_help(note(help));
            }
        }
        arg
    })
    .mut_subcommands(name_variables)
}

/// Makes the flags of the subcommand `argv` invokes read their alias ([`ALIASES`]) where it is
/// set and `CHARLM_<FLAG>` is not, so that a bad value's message names what the user set. Both
/// set to different values is an error that names both: neither silently wins.
pub fn resolve_aliases(cmd: Command, argv: &[OsString]) -> Result<Command, String> {
    let Some(sub) = invoked(&cmd, argv).map(|s| s.get_name().to_string()) else {
        return Ok(cmd);
    };
    let mut cmd = cmd;
    for &(_, long, alias, whose) in ALIASES.iter().filter(|a| a.0 == sub) {
        let primary = env_name(long);
        let Some(value) = std::env::var_os(alias) else {
            continue;
        };
        match std::env::var_os(&primary) {
            Some(other) if other != value => {
                return Err(format!(
                    "{alias}={value:?} ({whose} name) and {primary}={other:?} both set --{long} \
                     of `{sub}`, to different values: unset one of them"
                ))
            }
            Some(_) => {}
            None => {
                cmd = cmd.mut_subcommand(&sub, |c| {
                    c.mut_args(|a| {
                        if a.get_long() == Some(long) {
                            a.env(alias)
                        } else {
                            a
                        }
                    })
                })
            }
        }
    }
    Ok(cmd)
}

/// The subcommand `argv` invokes (`argv[0]` is the program).
fn invoked<'c>(cli: &'c Command, argv: &[OsString]) -> Option<&'c Command> {
    argv.iter()
        .skip(1)
        .find_map(|a| cli.find_subcommand(a.to_string_lossy().as_ref()))
}

/// Whole numbers from `lo` to `hi` (both included): `value_parser = flags::int(1, 128)`.
pub fn int<T>(lo: T, hi: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
{
    move |s: &str| whole(s, lo, Some(hi))
}

/// Whole numbers of `lo` or more: `value_parser = flags::at_least(1u64)`.
pub fn at_least<T>(lo: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
{
    move |s: &str| whole(s, lo, None)
}

fn whole<T: FromStr + PartialOrd + Display + Copy>(
    s: &str,
    lo: T,
    hi: Option<T>,
) -> Result<T, String> {
    let range = match hi {
        Some(hi) => format!("use {lo} to {hi}"),
        None => format!("use {lo} or more"),
    };
    let v: T = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number; {range}"))?;
    if v < lo || hi.is_some_and(|hi| v > hi) {
        return Err(range);
    }
    Ok(v)
}

fn float(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` is not a finite number")),
    }
}

/// A number above 0 (hours, learning rates, minutes, tolerances).
pub fn positive(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v <= 0.0 {
        return Err("use a number above 0".into());
    }
    Ok(v)
}

/// A number of 0 or more (0 has a meaning the flag's help gives).
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v < 0.0 {
        return Err("use 0 or more".into());
    }
    Ok(v)
}

/// A share strictly between 0 and 1.
pub fn open_fraction(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v <= 0.0 || v >= 1.0 {
        return Err("use a number above 0 and below 1".into());
    }
    Ok(v)
}

/// A share from 0 to 1, both included.
pub fn fraction(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if !(0.0..=1.0).contains(&v) {
        return Err("use a number from 0 to 1".into());
    }
    Ok(v)
}

/// The deepest model any subcommand builds (width 64 × depth).
pub const MAX_DEPTH: i64 = 128;

/// `--depth`: 1 to [`MAX_DEPTH`].
pub fn depth(s: &str) -> Result<i64, String> {
    int(1, MAX_DEPTH)(s)
}

/// The longest sequence `--seq-len` accepts (the contract's, which the CRD's `seqLen` rule uses).
pub const MAX_SEQ_LEN: i64 = charlm_contract::MAX_SEQ_LEN;

/// `--seq-len`: 2 to [`MAX_SEQ_LEN`] tokens.
pub fn seq_len(s: &str) -> Result<i64, String> {
    int(charlm_contract::MIN_SEQ_LEN, MAX_SEQ_LEN)(s)
}

/// `auto` or a count of 1 or more (`--gpus`, `--nproc-per-node`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Count {
    /// What this machine has: one per visible GPU, or the CPU.
    Auto,
    N(u32),
}

impl FromStr for Count {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "auto" {
            return Ok(Self::Auto);
        }
        whole(s, 1u32, None)
            .map(Self::N)
            .map_err(|e| format!("{e}, or `auto`"))
    }
}

impl Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::N(n) => write!(f, "{n}"),
        }
    }
}

/// CUDA GPUs this process sees (0 without CUDA).
pub fn visible_gpus() -> u32 {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as u32
    } else {
        0
    }
}

/// Where a command computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when a GPU is visible (one per local rank), else the CPU.
    Auto,
    Cpu,
    /// A CUDA GPU; an error when none is visible.
    Cuda,
}

impl DeviceChoice {
    /// The device of the process with `local_rank` on this node.
    pub fn resolve(self, local_rank: usize) -> Result<Device> {
        let gpus = if tch::Cuda::is_available() {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        };
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto if gpus == 0 => Ok(Device::Cpu),
            Self::Cuda if gpus == 0 => user_bail!(
                "--device cuda (CHARLM_DEVICE) but no CUDA GPU is visible: use --device cpu, or \
                 auto (CUDA when present, else CPU)"
            ),
            _ if local_rank >= gpus => user_bail!(
                "local rank {local_rank} has no GPU: only {gpus} visible; start fewer processes \
                 per node (--nproc-per-node)"
            ),
            _ => Ok(Device::Cuda(local_rank)),
        }
    }
}

/// What goes to stdout and stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `human` when stdout is a terminal, else `json`.
    Auto,
    /// Human lines on stderr only; nothing on stdout.
    Human,
    /// The JSON Lines event stream on stdout (docs/contract.md), human lines on stderr.
    Json,
}

impl LogFormat {
    /// Whether the JSON Lines stream goes to stdout.
    pub fn json(self) -> bool {
        match self {
            Self::Json => true,
            Self::Human => false,
            Self::Auto => !std::io::stdout().is_terminal(),
        }
    }
}

/// The subcommands that take the workers' command after `--`, and those a worker runs.
const LAUNCH: &str = "launch";
const WORKER_COMMANDS: [&str; 3] = ["train", "bench", "sample"];

/// A parse error as the user should read it, or `None` where clap's own message says it well:
/// a bad value from the environment names its variable, a bad value from the command line its
/// flag, and `launch train …` without `--` shows the command line that works.
pub fn explain(cli: &clap::Command, argv: &[OsString], err: &clap::Error) -> Option<String> {
    let argv: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let (sub_at, sub) = argv
        .iter()
        .enumerate()
        .skip(1)
        .find_map(|(i, a)| cli.find_subcommand(a).map(|s| (i, s)))?;
    let after = &argv[sub_at + 1..];
    if sub.get_name() == LAUNCH {
        if let Some(hint) = launch_hint(&argv[..=sub_at], after, err.kind()) {
            return Some(hint);
        }
    }
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let text = |kind| match err.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let shown = text(ContextKind::InvalidArg)?;
    let value = text(ContextKind::InvalidValue).unwrap_or_default();
    let long = shown
        .split([' ', '='])
        .next()?
        .trim_start_matches('-')
        .to_string();
    let arg = sub.get_arguments().find(|a| a.get_long() == Some(&long))?;
    let detail = match err.kind() {
        ErrorKind::InvalidValue => match err.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(valid)) => format!("use one of {}", valid.join(", ")),
            _ => "not an accepted value".to_string(),
        },
        _ => std::error::Error::source(err).map_or_else(|| "not valid".into(), |e| e.to_string()),
    };
    let mut names = vec![long.clone()];
    names.extend(
        arg.get_all_aliases()
            .unwrap_or_default()
            .iter()
            .map(|s| s.to_string()),
    );
    let on_command_line = after.iter().take_while(|a| *a != "--").any(|a| {
        names.iter().any(|n| {
            let flag = format!("--{n}");
            *a == flag || a.starts_with(&format!("{flag}="))
        })
    });
    let from_env = arg
        .get_env()
        .filter(|name| !on_command_line && std::env::var_os(name).is_some());
    let origin = match from_env {
        Some(name) => format!(
            "{}={value:?} (the environment variable of --{long})",
            name.to_string_lossy()
        ),
        None => format!("--{long} {value}"),
    };
    Some(format!(
        "{origin}: {detail}; `charlm-trainer {} --help` describes every flag",
        sub.get_name()
    ))
}

/// `launch [options] train …` without `--`: the command with `--` put where it belongs.
fn launch_hint(head: &[String], after: &[String], kind: ErrorKind) -> Option<String> {
    if after.iter().any(|a| a == "--")
        || !matches!(
            kind,
            ErrorKind::UnknownArgument
                | ErrorKind::MissingRequiredArgument
                | ErrorKind::InvalidSubcommand
        )
    {
        return None;
    }
    let at = after
        .iter()
        .position(|a| WORKER_COMMANDS.contains(&a.as_str()))?;
    let mut fixed: Vec<String> = head.iter().skip(1).cloned().collect();
    fixed.insert(0, "charlm-trainer".into());
    fixed.extend(after[..at].iter().cloned());
    fixed.push("--".into());
    fixed.extend(after[at..].iter().cloned());
    Some(format!(
        "launch starts its workers with what follows `--`, and `{}` came before any: run `{}`",
        after[at],
        fixed.join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cli() -> Command {
        Command::new("charlm-trainer")
            .subcommand(
                Command::new("train")
                    .arg(
                        Arg::new("depth")
                            .long("depth")
                            .env("CHARLM_TEST_FLAGS_DEPTH")
                            .value_parser(depth)
                            .default_value("12"),
                    )
                    .arg(
                        Arg::new("max_steps")
                            .long("max-steps")
                            .alias("num-iterations")
                            .value_parser(at_least(1i64)),
                    )
                    .allow_negative_numbers(true),
            )
            .subcommand(
                Command::new("launch")
                    .arg(Arg::new("nnodes").long("nnodes"))
                    .arg(Arg::new("worker").last(true).required(true).num_args(1..)),
            )
    }

    fn explained(args: &[&str]) -> Option<String> {
        let argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        let err = cli().try_get_matches_from(&argv).unwrap_err();
        explain(&cli(), &argv, &err)
    }

    #[test]
    fn ranges_read_as_ranges_and_bad_numbers_say_so() {
        assert_eq!(depth("128"), Ok(128));
        assert_eq!(depth("0").unwrap_err(), "use 1 to 128");
        assert!(depth("x").unwrap_err().contains("not a whole number"));
        assert_eq!(at_least(1i64)("0").unwrap_err(), "use 1 or more");
        assert_eq!(positive("0").unwrap_err(), "use a number above 0");
        assert!(positive("nan").is_err() && non_negative("-1").is_err());
        assert!(open_fraction("1").is_err() && fraction("1") == Ok(1.0));
        assert_eq!(env_name("dist-timeout-s"), "CHARLM_DIST_TIMEOUT_S");
    }

    #[test]
    fn a_bad_value_names_its_flag_or_its_variable() {
        let msg = explained(&["t", "train", "--depth", "1000"]).unwrap();
        assert!(msg.starts_with("--depth 1000: use 1 to 128"), "{msg}");
        let msg = explained(&["t", "train", "--num-iterations", "-3"]).unwrap();
        assert!(msg.starts_with("--max-steps -3: use 1 or more"), "{msg}");
        std::env::set_var("CHARLM_TEST_FLAGS_DEPTH", "0");
        let msg = explained(&["t", "train"]).unwrap();
        std::env::remove_var("CHARLM_TEST_FLAGS_DEPTH");
        assert!(
            msg.starts_with("CHARLM_TEST_FLAGS_DEPTH=\"0\" (the environment variable of --depth)"),
            "{msg}"
        );
    }

    #[test]
    fn launch_without_the_separator_gets_the_command_that_works() {
        let msg = explained(&["t", "launch", "--nnodes", "1", "train", "--depth", "2"]).unwrap();
        assert!(
            msg.ends_with("run `charlm-trainer launch --nnodes 1 -- train --depth 2`"),
            "{msg}"
        );
    }
}
